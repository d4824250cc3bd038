#!/usr/bin/env python3
"""What a restart costs: the catch-up after a clean stop against the full compare after
a crash, on one tree and one rsync daemon on 127.0.0.1 (scratch on /dev/shm).

usage: bench/restart.py [--dirs N] [--files N] [--binary target/release/syncbus]
Prints the duration each run logs ("full sync finished" / "catch-up finished").
"""
import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import benchlib


def wait_log(path, pattern, after, timeout=600):
    """The first line matching `pattern` past byte offset `after`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        with open(path, errors="replace") as f:
            f.seek(after)
            for line in f:
                if re.search(pattern, line):
                    return line
        time.sleep(0.05)
    sys.exit(f"timed out waiting for {pattern!r} in {path}")


def duration(line):
    return int(re.search(r"duration_ms=(\d+)", line).group(1)) / 1000


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dirs", type=int, default=200)
    ap.add_argument("--files", type=int, default=250, help="files per directory")
    ap.add_argument("--binary", default="target/release/syncbus")
    a = ap.parse_args()
    binary = os.path.abspath(a.binary)
    work = tempfile.mkdtemp(prefix="syncbus-restart-", dir="/dev/shm")
    src, dst = os.path.join(work, "src"), os.path.join(work, "dst")
    os.makedirs(dst)
    for d in range(a.dirs):
        p = os.path.join(src, f"d{d:04}")
        os.makedirs(p)
        for i in range(a.files):
            with open(os.path.join(p, f"f{i:04}"), "w") as f:
                f.write(f"{d} {i}\n")
    daemon, url = benchlib.start_daemon(work, dst, nodelay=True)
    config = os.path.join(work, "syncbus.toml")
    with open(config, "w") as f:
        f.write(f'[bus]\nruntime_dir = "{work}/run"\n[retry]\nstate_dir = "{work}/state"\n'
                f'[[root]]\nname = "r"\npath = "{src}"\n'
                f'[[target]]\nname = "t"\nurl = "{url}/"\n')
    log = os.path.join(work, "log")
    logf = open(log, "a")

    def run_once(done_pattern):
        start = os.path.getsize(log)
        p = subprocess.Popen([binary, "run", "--config", config], stdout=logf, stderr=logf)
        line = wait_log(log, done_pattern, start)
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=60)
        return line

    try:
        first = run_once(r"full sync finished")
        print(f"initial full sync ({a.dirs * a.files} files): {duration(first):.2f} s")
        # Clean stop; a few changes while stopped; the start is a catch-up.
        for d in range(0, a.dirs, max(1, a.dirs // 10)):
            with open(os.path.join(src, f"d{d:04}", "f0000"), "w") as f:
                f.write("changed while stopped\n")
        shutil.rmtree(os.path.join(src, "d0001"))
        line = run_once(r"catch-up finished")
        stats = wait_log(log, r"catch-up compared", 0)
        print(f"start after a clean stop (catch-up): {duration(line):.2f} s  "
              f"[{re.search(r'entries=.*', stats).group(0).strip()}]")
        # As after a crash: no checkpoint, so a full compare.
        os.remove(os.path.join(work, "state", "checkpoint.toml"))
        line = run_once(r"full sync finished")
        print(f"start after a crash (full compare, nothing changed): {duration(line):.2f} s")
    finally:
        daemon.terminate()
        daemon.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
