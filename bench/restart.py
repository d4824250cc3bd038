#!/usr/bin/env python3
"""What a restart costs: the catch-up after a clean stop, the catch-up after a crash
(everything killed with SIGKILL, from the checkpoint kept while running), the full
compare when no checkpoint can be trusted, and lsyncd's start (its init rsync), on one
tree and one rsync daemon on 127.0.0.1 (scratch on /dev/shm).

usage: bench/restart.py [--dirs N] [--files N] [--binary target/release/syncbus]
       [--no-lsyncd]
For each start: the duration the run logs ("full sync finished" / "catch-up
finished"), the wall time from the start until then, and the CPU seconds of every
process of the run (stages and their rsyncs) by then.
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

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "harness"))
from syncbench import session_stats  # noqa: E402  (the harness's /proc reading)


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


class Run:
    """One `syncbus run` (or lsyncd) in a session of its own, logging into `log`."""

    live = []  # started and not yet stopped: killed if the script fails

    def __init__(self, argv, log):
        self.log = log
        self.offset = os.path.getsize(log) if os.path.exists(log) else 0
        self.t0 = time.monotonic()
        with open(log, "a") as logf:
            self.p = subprocess.Popen(argv, stdout=logf, stderr=logf, start_new_session=True)
        Run.live.append(self)

    def done(self, pattern, settle=2.0):
        """Waits for `pattern`; if the run starts the same work again within `settle`
        s (a second catch-up when the dispatcher joined late), for that one too.
        Returns (the last matching line, wall s, CPU s, how many)."""
        line = wait_log(self.log, pattern, self.offset)
        wall = time.monotonic() - self.t0
        count = n = 1
        while settle > 0:
            deadline = time.time() + settle
            while time.time() < deadline:
                with open(self.log, errors="replace") as f:
                    f.seek(self.offset)
                    n = sum(1 for ln in f if re.search(pattern, ln))
                if n > count:
                    break
                time.sleep(0.05)
            if n <= count:
                break
            count = n
            wall = time.monotonic() - self.t0
        with open(self.log, errors="replace") as f:
            f.seek(self.offset)
            line = [ln for ln in f if re.search(pattern, ln)][-1]
        return line, wall, session_stats(self.p.pid)["cpu_s"], count

    def stop(self):
        """SIGTERM, a clean stop."""
        self.p.send_signal(signal.SIGTERM)
        self.p.wait(timeout=60)
        Run.live.remove(self)

    def crash(self):
        """SIGKILL to every process of the run, the stages before the supervisor (whose
        death would ask them to drain)."""
        for pid in session_stats(self.p.pid)["pids"]:
            if pid != self.p.pid:
                os.kill(pid, signal.SIGKILL)
        self.p.kill()
        self.p.wait(timeout=60)
        Run.live.remove(self)


def running_checkpoint(state):
    """`since_us` of the checkpoint kept while running, or 0."""
    try:
        with open(os.path.join(state, "checkpoint.toml")) as f:
            text = f.read()
    except OSError:
        return 0
    if 'kind = "running"' not in text:
        return 0
    return int(re.search(r"since_us = (\d+)", text).group(1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dirs", type=int, default=200)
    ap.add_argument("--files", type=int, default=250, help="files per directory")
    ap.add_argument("--binary", default="target/release/syncbus")
    ap.add_argument("--no-lsyncd", action="store_true")
    a = ap.parse_args()
    binary = os.path.abspath(a.binary)
    work = tempfile.mkdtemp(prefix="syncbus-restart-", dir="/dev/shm")
    src, dst = os.path.join(work, "src"), os.path.join(work, "dst")
    state = os.path.join(work, "state")
    os.makedirs(dst)
    for d in range(a.dirs):
        p = os.path.join(src, f"d{d:04}")
        os.makedirs(p)
        for i in range(a.files):
            with open(os.path.join(p, f"f{i:04}"), "w") as f:
                f.write(f"{d} {i}\n")
    made = time.monotonic()
    daemon, url = benchlib.start_daemon(work, dst, nodelay=True)
    config = os.path.join(work, "syncbus.toml")
    with open(config, "w") as f:
        f.write(f'[bus]\nruntime_dir = "{work}/run"\n[retry]\nstate_dir = "{state}"\n'
                f'[[root]]\nname = "r"\npath = "{src}"\n'
                f'[[target]]\nname = "t"\nurl = "{url}/"\n')
    log = os.path.join(work, "log")
    syncbus = [binary, "run", "--config", config]
    step = max(2, a.dirs // 10)
    gone = iter(d for d in range(a.dirs) if d % step)

    def change():
        """What happens while nothing runs: 10 files rewritten, a directory deleted."""
        for d in range(0, a.dirs, step):
            with open(os.path.join(src, f"d{d:04}", "f0000"), "w") as f:
                f.write(f"changed while stopped {time.time()}\n")
        shutil.rmtree(os.path.join(src, f"d{next(gone):04}"))

    def report(what, result):
        line, wall, cpu, n = result
        runs = f", {n} runs" if n > 1 else ""
        print(f"{what}: logged {duration(line):.2f} s{runs}; {wall:.2f} s from the start, "
              f"{cpu:.2f} CPU-s", flush=True)

    try:
        run = Run(syncbus, log)
        report(f"initial full sync ({a.dirs * a.files} files)", run.done(r"full sync finished"))
        # A long-running mirror, not one stopped right after the tree was made: a
        # catch-up also sends what changed in the 30 s before its checkpoint.
        time.sleep(max(0.0, made + 31 - time.monotonic()))
        run.stop()
        change()
        run = Run(syncbus, log)
        report("start after a clean stop (catch-up)", run.done(r"catch-up finished"))
        stats = wait_log(log, r"catch-up compared", run.offset)
        print(f"  [{re.search(r'entries=.*', stats).group(0).strip()}]")
        # Running: the checkpoint kept while running moves past the catch-up.
        after = time.time_ns() // 1000
        deadline = time.time() + 60
        while running_checkpoint(state) < after:
            if time.time() > deadline:
                sys.exit("no checkpoint kept while running")
            time.sleep(0.1)
        run.crash()
        change()
        run = Run(syncbus, log)
        report("start after a crash (SIGKILL to every process; catch-up)",
               run.done(r"catch-up finished"))
        run.stop()
        # No checkpoint to trust (a reboot, two-way roots, hooks): a full compare.
        os.remove(os.path.join(state, "checkpoint.toml"))
        change()
        run = Run(syncbus, log)
        report("start with no checkpoint to trust (full compare)",
               run.done(r"full sync finished"))
        run.stop()
        if not a.no_lsyncd:
            lua = os.path.join(work, "lsyncd.lua")
            with open(lua, "w") as f:
                f.write(f'settings {{ nodaemon = true, logfile = "{work}/lsyncd.log" }}\n'
                        f'sync {{ default.rsync, source = "{src}", target = "{url}/", '
                        f'delay = 0 }}\n')
            change()
            run = Run(["lsyncd", lua], os.path.join(work, "lsyncd.log"))
            _, wall, cpu, _ = run.done(r"Startup of .* finished", settle=0)
            print(f"lsyncd 2.2.3 start (its init rsync): {wall:.2f} s from the start, "
                  f"{cpu:.2f} CPU-s", flush=True)
            run.stop()
    finally:
        for run in list(Run.live):
            run.crash()
        daemon.terminate()
        daemon.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
