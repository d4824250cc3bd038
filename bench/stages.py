#!/usr/bin/env python3
"""CPU per syncbus process for a burst, against a local rsync daemon on /dev/shm.

    python3 bench/stages.py [target/release/syncbus]     N=10000 D=100 (files, new dirs)
    PERF=1 python3 bench/stages.py                       also `perf record -a` the burst

Prints each stage's own CPU-seconds and, for the dispatcher, those of its rsync
children, from /proc before and after the burst.
"""
import os, subprocess, time, sys, shutil

import benchlib
W = "/dev/shm/prof"
shutil.rmtree(W, ignore_errors=True)
os.makedirs(W + "/src"); os.makedirs(W + "/dst")
d, url = benchlib.start_daemon(W, W + "/dst")
open(W + "/c.toml", "w").write(f'[bus]\nruntime_dir = "{W}/run"\n[retry]\nstate_dir = "{W}/state"\n[metrics]\nlisten = "off"\n[[root]]\nname = "b"\npath = "{W}/src"\n[[target]]\nname = "d"\nurl = "{url}"\n')
exe = os.path.realpath(sys.argv[1] if len(sys.argv) > 1 else "target/release/syncbus")
env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "info"))
p = subprocess.Popen([exe, "run", "--config", W + "/c.toml"], stderr=open(W + "/log", "w"), env=env)
perf = None


def cleanup():
    for proc in (perf, p, d):
        if proc and proc.poll() is None:
            proc.terminate()
            proc.wait()


import atexit
atexit.register(cleanup)
def ready():
    open(W + "/src/.ready", "w").write("x")
    t = time.time()
    while not os.path.exists(W + "/dst/.ready"):
        time.sleep(0.005)
        if time.time() - t > 30: raise SystemExit("not ready")
ready(); time.sleep(1)
def cpu():
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit(): continue
        try:
            cmd = open(f"/proc/{pid}/cmdline").read().split("\0")
            st = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError: continue
        if cmd and cmd[0] == exe:
            hz = os.sysconf("SC_CLK_TCK")
            out[cmd[1]] = (int(st[11]) + int(st[12])) / hz
            out[cmd[1] + "+children"] = (int(st[13]) + int(st[14])) / hz
    return out
perf = subprocess.Popen(["perf", "record", "-q", "-a", "-g", "-F", "4000", "-o", "/dev/shm/perf.data"], stderr=subprocess.DEVNULL) if os.environ.get("PERF") else None
time.sleep(0.3)
c0 = cpu(); t0 = time.time()
N, D = int(os.environ.get("N", 10000)), int(os.environ.get("D", 100))
for i in range(D):
    os.makedirs(f"{W}/src/d{i:03d}", exist_ok=True)
for i in range(N):
    with open(f"{W}/src/d{i % D:03d}/f{i:05d}", "wb") as f: f.write(b"x" * 1024)
tw = time.time() - t0
last = f"{W}/dst/d{(N-1) % D:03d}/f{N-1:05d}"
deadline = time.time() + 120
while True:
    # rsync's temp files (.name.XXXXXX) are not there yet.
    n = sum(1 for _, _, fs in os.walk(W + "/dst") for f in fs if not f.startswith("."))
    if n >= N: break
    if time.time() > deadline: raise SystemExit(f"not converged: {n} of {N}")
    time.sleep(0.01)
tc = time.time() - t0
time.sleep(0.5)
c1 = cpu()
if perf:
    perf.send_signal(2); perf.wait()
print(f"write {tw:.2f}s converge {tc:.2f}s")
for k in sorted(c1):
    if c1[k]-c0.get(k,0) > 0: print(f"  {k:12s} {c1[k]-c0.get(k,0):.3f} cpu-s")
print(f"  total        {sum(c1.values())-sum(c0.values()):.3f}")
print(f"  daemon       {sum(int(x) for x in open(f'/proc/{d.pid}/stat').read().rsplit(')',1)[1].split()[11:15])/os.sysconf('SC_CLK_TCK'):.3f} (incl. children)")
cleanup()
shutil.rmtree(W, ignore_errors=True)
