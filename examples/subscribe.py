#!/usr/bin/env python3
"""Follow what syncbus mirrors: a subscriber of its change stream, or of its delivery
stream (docs/wire-format.md).

    pip install pyzmq msgpack
    python3 examples/subscribe.py --runtime-dir /run/syncbus [--stream deliveries] [--count N]

Prints one line per change, `<root> <op> <path>`, or per delivered path,
`<target> <root> delivered <path> lag=<ms>` (paths are bytes; shown with backslash
escapes where they are not UTF-8), and warns when messages were lost (a gap in `seq`,
or a new `epoch`: the publisher restarted). Stops after --count lines.
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
    ap.add_argument("--stream", choices=["changes", "deliveries"], default="changes")
    ap.add_argument("--count", type=int, help="exit after this many changes")
    args = ap.parse_args()

    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 100_000)
    if args.stream == "changes":
        topic = f"changes/{args.root}/" if args.root else "changes/"
    else:
        topic = "deliveries/"
    sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
    sub.connect("ipc://" + os.path.join(args.runtime_dir, f"{args.stream}.sock"))
    print("subscribed", flush=True)

    last = {}  # root -> (epoch, seq)
    seen = 0
    while args.count is None or seen < args.count:
        _topic, payload = sub.recv_multipart()
        msg = msgpack.unpackb(payload, raw=False)
        if msg["version"] != 1:
            print(f"unknown wire version {msg['version']}", file=sys.stderr)
            continue
        # Sequence numbers count per root (changes) or per target (deliveries).
        key = msg["root"] if args.stream == "changes" else msg["target"]
        epoch, seq = msg["epoch"], msg["seq"]
        prev = last.get(key)
        if prev and prev[0] != epoch:
            print(f"# {key}: the publisher restarted; lines may be missing", flush=True)
        elif prev and seq != prev[1] + 1:
            print(f"# {key}: {seq - prev[1] - 1} message(s) lost", flush=True)
        last[key] = (epoch, seq)
        if args.stream == "deliveries":
            if args.root and msg["root"] != args.root:
                continue
            for p in msg["paths"]:
                state = "delivered" if msg["ok"] else f"FAILED ({msg['error']})"
                lag = (msg["time_us"] - p["since_us"]) // 1000 if p["since_us"] else "?"
                print(f"{msg['target']} {msg['root']} {state} {show(p['path'])} lag={lag}",
                      flush=True)
                seen += 1
            continue
        root = msg["root"]
        for c in msg["changes"]:
            line = f"{root} {c['op']} {show(c['path'])}"
            if c.get("from") is not None:
                line += f" (from {show(c['from'])})"
            print(line, flush=True)
            seen += 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
