#!/usr/bin/env bash
# The local demo: installs rsync if missing, builds syncbus, and mirrors demo/src into
# demo/mirror with the embedded demo config. No remote server needed. Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v rsync >/dev/null; then
    echo "rsync is missing; installing it with apt-get" >&2
    if [ "$(id -u)" -eq 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rsync
    else
        sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rsync
    fi
fi
cargo build --release --quiet
exec ./target/release/syncbus demo --dir demo
