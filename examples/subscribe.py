#!/usr/bin/env python3
"""Follow what syncbus mirrors: a subscriber of its change stream (docs/wire-format.md).

    pip install pyzmq msgpack
    python3 examples/subscribe.py --runtime-dir /run/syncbus [--root www] [--count N]

Prints one line per change: `<root> <op> <path>` (paths are bytes; shown with
backslash escapes where they are not UTF-8), and warns when messages were lost (a gap
in `seq` or a new `epoch`: the filter restarted). Stops after --count changes.
"""
import argparse
import os
import sys

import msgpack
import zmq


def show(path: bytes) -> str:
    return path.decode("utf-8", errors="backslashreplace") or "."


def main() -> int:
    ap = argparse.ArgumentParser(description="Print syncbus's change stream.")
    ap.add_argument("--runtime-dir", required=True, help="the config's bus.runtime_dir")
    ap.add_argument("--root", help="only this root (default: every root)")
    ap.add_argument("--count", type=int, help="exit after this many changes")
    args = ap.parse_args()

    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 100_000)
    topic = f"changes/{args.root}/" if args.root else "changes/"
    sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
    sub.connect("ipc://" + os.path.join(args.runtime_dir, "changes.sock"))
    print("subscribed", flush=True)

    last = {}  # root -> (epoch, seq)
    seen = 0
    while args.count is None or seen < args.count:
        _topic, payload = sub.recv_multipart()
        msg = msgpack.unpackb(payload, raw=False)
        if msg["version"] != 1:
            print(f"unknown wire version {msg['version']}", file=sys.stderr)
            continue
        root, epoch, seq = msg["root"], msg["epoch"], msg["seq"]
        prev = last.get(root)
        if prev and prev[0] != epoch:
            print(f"# {root}: the filter restarted; treat the root as unknown", flush=True)
        elif prev and seq != prev[1] + 1:
            print(f"# {root}: {seq - prev[1] - 1} message(s) lost", flush=True)
        last[root] = (epoch, seq)
        for c in msg["changes"]:
            line = f"{root} {c['op']} {show(c['path'])}"
            if c.get("from") is not None:
                line += f" (from {show(c['from'])})"
            print(line, flush=True)
            seen += 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
