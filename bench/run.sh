#!/usr/bin/env bash
# Runs the shared harness against syncbus and lsyncd (delay 0) in one go and prints the
# tables. usage: bench/run.sh [OUTDIR] [WORKLOADS]   (needs: rsync, lsyncd)
# Scratch is /dev/shm so the shared disk's noise stays out (see FINDINGS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-$(mktemp -d)}; mkdir -p "$OUT"
WL=${2:-burst,latency,editor,tree-ops}
H=../shared/bench
cargo build --release --quiet
SB=(python3 "$H/syncbench.py" --scratch /dev/shm --timeout 120 --settle 20 --workload "$WL")
"${SB[@]}" --name syncbus --config-template bench/syncbus.toml \
    --start "$PWD/target/release/syncbus run --config {config}" --json "$OUT/syncbus.jsonl" | tee "$OUT/syncbus.txt"
"${SB[@]}" --name lsyncd-delay0 --config-template "$H/peers/lsyncd-delay0.lua" \
    --start 'lsyncd {config}' --json "$OUT/lsyncd.jsonl" | tee "$OUT/lsyncd.txt"
python3 "$H/syncbench.py" --summarize "$OUT/syncbus.jsonl" "$OUT/lsyncd.jsonl"
echo "results in $OUT" >&2
