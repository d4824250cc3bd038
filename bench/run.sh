#!/usr/bin/env bash
# Runs the black-box harness (bench/harness/syncbench.py) against syncbus and lsyncd
# (delay 0) in one go, plus the floor (one plain rsync), the one-directory burst, the bus
# alone and memory growth, and writes the results into BENCHMARKS.md (the section
# between the `bench:latest` markers: tables, the commands, machine and versions).
#
#   bench/run.sh [WORKLOADS]        default: all (burst,latency,editor,tree-ops,bigfile,scale)
#
# Needs rsync, lsyncd, pyzmq and msgpack. Scratch is /dev/shm so the shared disk's noise
# stays out (FINDINGS.md). Latency runs 3 times per tool, the rest once. Takes 15-25
# minutes; the raw results go to bench/results/<time>/. A step that fails is noted in
# its `failures` file and the others still run.
set -uo pipefail
cd "$(dirname "$0")/.."
WL=${1:-all}
OUT=bench/results/$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$OUT"
git describe --always --dirty > "$OUT/version.txt"
cargo build --release --quiet || exit 1
H=bench/harness
SB=(python3 "$H/syncbench.py" --scratch /dev/shm --timeout 300 --settle 20)
START_SB="$(printf %q "$PWD/target/release/syncbus") run --config {config}"
SYNCBUS=(--config-template bench/syncbus.toml --start "$START_SB")
LSYNCD=(--config-template "$H/lsyncd-delay0.lua" --start 'lsyncd {config}')

step() { # step LOG CMD…: runs one measurement, keeps going if it fails
    local log=$1; shift
    printf '%q ' "$@" >> "$OUT/commands.txt"; echo >> "$OUT/commands.txt"
    "$@" | tee -a "$OUT/$log" || echo "failed: $*" >> "$OUT/failures"
}

: > "$OUT/commands.txt"
[ "$WL" = all ] && WL=burst,latency,editor,tree-ops,bigfile,scale
WL_REST=$(tr ',' '\n' <<< "$WL" | grep -vx latency | paste -sd, -)
for tool in syncbus lsyncd-delay0; do
    if [ $tool = syncbus ]; then args=("${SYNCBUS[@]}"); else args=("${LSYNCD[@]}"); fi
    [ -z "$WL_REST" ] ||
        step $tool.txt "${SB[@]}" --workload "$WL_REST" --name $tool "${args[@]}" --json "$OUT/all.jsonl"
    case ,$WL, in *,latency,*)
        step $tool.txt "${SB[@]}" --workload latency --repeat 3 --name $tool "${args[@]}" --json "$OUT/all.jsonl"
    esac
    step $tool.txt "${SB[@]}" --workload burst --burst-dirs 1 --name "$tool 1 dir" "${args[@]}" --json "$OUT/all.jsonl"
done
step oracle.txt "${SB[@]}" --workload burst --oracle --name oracle --json "$OUT/all.jsonl"
step pipeline.txt python3 bench/pipeline.py --syncbus target/release/syncbus --files 200000
grep '^{' "$OUT/pipeline.txt" | tail -1 > "$OUT/pipeline.json"
for scale in "20000 60000" "200000 600000"; do
    set -- $scale
    step memory.txt python3 bench/memory.py --syncbus target/release/syncbus --dirs "$1" --files "$2"
done
grep '^{' "$OUT/memory.txt" > "$OUT/memory.jsonl"
python3 bench/report.py "$OUT" BENCHMARKS.md
echo "results in $OUT; BENCHMARKS.md updated" >&2
[ ! -e "$OUT/failures" ] || { cat "$OUT/failures" >&2; exit 1; }
