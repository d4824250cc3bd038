#!/usr/bin/env python3
"""Memory of a running syncbus: summed RSS (what the harness reports) and summed PSS
(each shared page counted once) of all its processes, at start and at rest.

    python3 bench/memory.py [--dirs 20000] [--files 60000] [--syncbus target/release/syncbus]

Builds a tree of --dirs directories and --files files in /dev/shm, starts `syncbus run`
against a local rsync daemon, and samples every 50 ms from the start until 5 s after
every directory is watched (as `syncbus status` reports it, refreshed once a second;
the start's full compare may still run then). Prints one JSON line: the peak over that
time and the values at its end ("rest"), of the syncbus processes only (rsync children
are the transfer, not the tool). The stages are separate processes that map the same
binary and libraries, so summed RSS counts those pages once per process; PSS is the
memory they really take. A tree larger than the inotify watch limit gets a larger
limit for the run when run as root (restored after).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import benchlib


def tool_pids(root_pid):
    """The tool and its descendants."""
    kids = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                ppid = int(open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            kids.setdefault(ppid, []).append(int(p))
    out, todo = [], [root_pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def mem(pids, exe):
    rss = pss = 0
    for p in pids:
        try:
            if os.readlink(f"/proc/{p}/exe") != exe:
                continue  # rsync children are the transfer, not the tool
            for line in open(f"/proc/{p}/smaps_rollup"):
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except OSError:
            pass
    return rss / 1024, pss / 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dirs", type=int, default=20_000)
    ap.add_argument("--files", type=int, default=60_000)
    ap.add_argument("--syncbus", default="target/release/syncbus")
    args = ap.parse_args()
    exe = os.path.realpath(args.syncbus)
    work = tempfile.mkdtemp(prefix="syncbus-memory-", dir="/dev/shm")
    src, dst = os.path.join(work, "src"), os.path.join(work, "dst")
    os.makedirs(dst)
    dirs = [os.path.join(src, f"a{i // 100:04d}", f"b{i % 100:02d}") for i in range(args.dirs)]
    for d in dirs:
        os.makedirs(d, exist_ok=True)
    for i in range(args.files):
        with open(os.path.join(dirs[i % len(dirs)], f"f{i}"), "wb") as f:
            f.write(b"x" * 100)
    daemon, url = benchlib.start_daemon(work, dst)
    with open(os.path.join(work, "c.toml"), "w") as f:
        f.write(f'[bus]\nruntime_dir = "{work}/run"\n[retry]\nstate_dir = "{work}/state"\n'
                f'[[root]]\nname = "r"\npath = "{src}"\n'
                f'[[target]]\nname = "t"\nurl = "{url}"\n')
    # One watch per directory: a tree larger than the limit needs a larger limit (as
    # root, for this run only; restored below).
    limit_file = "/proc/sys/fs/inotify/max_user_watches"
    old_limit = int(open(limit_file).read())
    if args.dirs + 10_000 > old_limit and os.geteuid() == 0:
        with open(limit_file, "w") as f:
            f.write(str(max(old_limit, args.dirs * 2)))
    t0 = time.time()
    tool = subprocess.Popen([exe, "run", "--config", os.path.join(work, "c.toml")],
                            stderr=open(os.path.join(work, "log"), "w"))
    try:
        return measure(args, exe, work, dirs, tool, t0)
    finally:
        tool.terminate()
        tool.wait()
        daemon.terminate()
        daemon.wait()
        if int(open(limit_file).read()) != old_limit:
            with open(limit_file, "w") as f:
                f.write(str(old_limit))
        shutil.rmtree(work, ignore_errors=True)


def measure(args, exe, work, dirs, tool, t0) -> int:
    peak_rss = peak_pss = 0.0
    ready = None
    config = os.path.join(work, "c.toml")
    want = len(set(os.path.dirname(d) for d in dirs)) + len(dirs) + 1
    deadline = t0 + 600
    rest_until = None
    # Sampled every 50 ms from the start until 5 s after every directory is watched
    # (the start's full compare may still run then): the peak covers both.
    while time.time() < (rest_until or deadline):
        rss, pss = mem(tool_pids(tool.pid), exe)
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        if ready is None:
            # Ready: every directory watched, as the watcher itself reports it.
            r = benchlib.status(exe, config).get("roots", {}).get("r", {})
            watches = r.get("watches") or 0
            if watches >= want:
                ready = time.time() - t0
                rest_until = time.time() + 5
        time.sleep(0.05)
    rss, pss = mem(tool_pids(tool.pid), exe)
    per_stage = {}
    for p in tool_pids(tool.pid):
        try:
            if os.readlink(f"/proc/{p}/exe") == exe:
                name = open(f"/proc/{p}/cmdline").read().split("\0")[1]
                per_stage[name] = round(mem([p], exe)[1], 1)
        except (OSError, IndexError):
            pass
    print(json.dumps({
        "dirs": args.dirs, "files": args.files, "watches_live_s": ready and round(ready, 2),
        "processes": len(per_stage),
        "peak_rss_mib": round(peak_rss, 1), "peak_pss_mib": round(peak_pss, 1),
        "rest_rss_mib": round(rss, 1), "rest_pss_mib": round(pss, 1),
        "rest_pss_mib_per_process": per_stage,
    }))
    return 0 if ready else 1

if __name__ == "__main__":
    sys.exit(main())
