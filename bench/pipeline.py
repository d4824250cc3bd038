#!/usr/bin/env python3
"""Throughput of the bus alone: watcher -> filter -> dispatcher -> a no-op target.

    python3 bench/pipeline.py [--files 200000] [--dirs 20] [--syncbus target/release/syncbus]

Starts `syncbus run` with one root and a command target that reads the paths and
drops them (`dd of=/dev/null`, so no rsync is involved), writes --files new files into
--dirs directories that exist before the start, as fast as this script can, and follows
the delivery stream until every path was delivered. Prints one JSON line: files,
inotify events read (from `syncbus status`, read until it holds still: the watcher
posts at most once a second), seconds from the first write to the last delivery (the
deliveries' own end times, not when this script got round to reading them), events and
files per second, and loss (paths never delivered, gaps in the stream's seq). Scratch
is /dev/shm; needs pyzmq and msgpack.
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
import msgpack
import zmq


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=200_000)
    ap.add_argument("--dirs", type=int, default=20)
    ap.add_argument("--syncbus", default="target/release/syncbus")
    ap.add_argument("--timeout", type=float, default=300)
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="syncbus-pipeline-", dir="/dev/shm")
    src, run = os.path.join(work, "src"), os.path.join(work, "run")
    for d in range(args.dirs):
        os.makedirs(os.path.join(src, f"d{d:02d}"))
    config = os.path.join(work, "syncbus.toml")
    with open(config, "w") as f:
        f.write(
            f'[bus]\nruntime_dir = "{run}"\n[retry]\nstate_dir = "{work}/state"\n'
            '[metrics]\nlisten = "off"\n'
            f'[[root]]\nname = "r"\npath = "{src}"\n'
            '[[target]]\nname = "null"\ncommand = ["dd", "of=/dev/null", "status=none"]\n'
        )
    proc = subprocess.Popen([args.syncbus, "run", "--config", config],
                            stderr=open(os.path.join(work, "log"), "w"))
    try:
        return measure(args, work, src, run, config)
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(work, ignore_errors=True)


def measure(args, work, src, run, config) -> int:
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 1_000_000)
    sub.setsockopt(zmq.SUBSCRIBE, b"deliveries/")
    deadline = time.time() + 30
    while not os.path.exists(os.path.join(run, "deliveries.sock")):
        if time.time() > deadline:
            print("syncbus did not start", file=sys.stderr)
            return 1
        time.sleep(0.01)
    sub.connect("ipc://" + os.path.join(run, "deliveries.sock"))

    # Ready: the start compare delivered, and a sentinel made it through.
    delivered, gaps, last, last_end_us = set(), 0, {}, 0

    def drain(until: float) -> None:
        nonlocal gaps, last_end_us
        while time.time() < until:
            if not sub.poll(50):
                continue
            while True:
                try:
                    _t, payload = sub.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                m = msgpack.unpackb(payload, raw=False)
                key = m["target"]
                prev = last.get(key)
                if prev and prev[0] == m["epoch"] and m["seq"] != prev[1] + 1:
                    gaps += m["seq"] - prev[1] - 1
                last[key] = (m["epoch"], m["seq"])
                if m["ok"]:
                    delivered.update(p["path"] for p in m["paths"])
                    last_end_us = max(last_end_us, m["time_us"])
            return

    # Rewritten until it comes through: the first may predate the watches.
    sentinel = os.path.join(src, "ready")
    deadline = time.time() + 60
    while b"ready" not in delivered:
        if time.time() > deadline:
            print("the sentinel never arrived", file=sys.stderr)
            return 1
        with open(sentinel, "w") as f:
            f.write(str(time.time()))
        drain(time.time() + 0.5)
    delivered.clear()

    def events_now() -> int:
        return benchlib.status(args.syncbus, config)["roots"]["r"].get("events") or 0

    def events() -> int:
        # The watcher posts at most once a second and its file is rewritten once a
        # second after that: read until two reads 1.5 s apart agree.
        prev = events_now()
        while True:
            time.sleep(1.5)
            cur = events_now()
            if cur == prev:
                return cur
            prev = cur

    ev0 = events()
    want = set()
    t0 = time.time()
    for i in range(args.files):
        rel = f"d{i % args.dirs:02d}/f{i:07d}"
        with open(os.path.join(src, rel), "wb") as f:
            f.write(b"x")
        want.add(rel.encode())
    t_written = time.time()
    deadline = t0 + args.timeout
    while not want <= delivered and time.time() < deadline:
        drain(time.time() + 0.05)
    t_done = last_end_us / 1e6 if want <= delivered else time.time()
    ev = events() - ev0
    missing = len(want - delivered)
    secs = t_done - t0
    print(json.dumps({
        "files": args.files,
        "inotify_events": ev,
        "write_s": round(t_written - t0, 3),
        "converge_s": round(secs, 3),
        "files_per_s": round(args.files / secs),
        "events_per_s": round(ev / secs),
        "missing": missing,
        "stream_gaps": gaps,
    }))
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
