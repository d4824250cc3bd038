#!/usr/bin/env bash
# The local demo: installs rsync (and a C++ compiler for the bundled libzmq) if missing,
# builds syncbus, and mirrors demo/src into demo/mirror with the embedded demo config.
# No remote server needed. Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need=($(build_needs))
command -v rsync >/dev/null || need+=(rsync)
apt_install "${need[@]}"
echo "building syncbus (cargo build --release; the first build takes a few minutes on 2 cores)" >&2
cargo build --release --locked
echo "starting the demo: edit files in demo/src and watch demo/mirror follow" >&2
exec ./target/release/syncbus demo --dir demo
