#!/usr/bin/env bash
# Runs the shared harness against syncbus and lsyncd (delay 0) in one go, plus the
# floor (one plain rsync), the one-directory burst and the bus-alone throughput, and
# writes the results into BENCHMARKS.md (the section between the `bench:latest`
# markers: tables, the commands, machine and versions).
#
#   bench/run.sh [WORKLOADS]        default: all (burst,latency,editor,tree-ops,bigfile,scale)
#
# Needs rsync, lsyncd, pyzmq and msgpack. Scratch is /dev/shm so the shared disk's noise
# stays out (FINDINGS.md). Takes 10-20 minutes; raw results stay in bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
WL=${1:-all}
OUT=bench/results/$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$OUT"
H=../shared/bench
cargo build --release --quiet
SB=(python3 "$H/syncbench.py" --scratch /dev/shm --timeout 300 --settle 20)
SYNCBUS=(--config-template bench/syncbus.toml --start "$PWD/target/release/syncbus run --config {config}")
LSYNCD=(--config-template "$H/peers/lsyncd-delay0.lua" --start 'lsyncd {config}')
{
    echo "${SB[*]} --workload $WL --name syncbus --config-template bench/syncbus.toml --start '$PWD/target/release/syncbus run --config {config}'"
    echo "${SB[*]} --workload $WL --name lsyncd-delay0 --config-template $H/peers/lsyncd-delay0.lua --start 'lsyncd {config}'"
    echo "${SB[*]} --workload burst --burst-dirs 1 --name '<tool> 1 dir' …  (both tools)"
    echo "${SB[*]} --workload burst --oracle --name oracle"
    echo "python3 bench/pipeline.py --files 200000"
    echo "python3 bench/memory.py --dirs 20000 --files 60000; python3 bench/memory.py --dirs 200000 --files 600000"
} > "$OUT/commands.txt"

"${SB[@]}" --workload "$WL" --name syncbus "${SYNCBUS[@]}" --json "$OUT/all.jsonl" | tee "$OUT/syncbus.txt"
"${SB[@]}" --workload "$WL" --name lsyncd-delay0 "${LSYNCD[@]}" --json "$OUT/all.jsonl" | tee "$OUT/lsyncd.txt"
"${SB[@]}" --workload burst --burst-dirs 1 --name "syncbus 1 dir" "${SYNCBUS[@]}" --json "$OUT/all.jsonl" | tee -a "$OUT/syncbus.txt"
"${SB[@]}" --workload burst --burst-dirs 1 --name "lsyncd-delay0 1 dir" "${LSYNCD[@]}" --json "$OUT/all.jsonl" | tee -a "$OUT/lsyncd.txt"
"${SB[@]}" --workload burst --oracle --name oracle --json "$OUT/all.jsonl" | tee "$OUT/oracle.txt"
python3 bench/pipeline.py --syncbus target/release/syncbus --files 200000 > "$OUT/pipeline.json"
for scale in "20000 60000" "200000 600000"; do
    set -- $scale
    python3 bench/memory.py --syncbus target/release/syncbus --dirs "$1" --files "$2" >> "$OUT/memory.jsonl"
done
python3 bench/report.py "$OUT" BENCHMARKS.md
echo "results in $OUT; BENCHMARKS.md updated" >&2
