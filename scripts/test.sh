#!/usr/bin/env bash
# The whole test suite, as README says and .ci/run runs it: installs what the tests need
# from the distribution's packages if missing, then `cargo test --workspace --locked`
# (extra arguments go to cargo test).
#
# Needed: rsync (every system test runs a real rsync daemon), python3-zmq and
# python3-msgpack (a test runs examples/subscribe.py), a C++ compiler (the bundled
# libzmq), openssh-server and its client (ssh targets run against a real sshd on
# 127.0.0.1).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need=($(build_needs))
command -v rsync >/dev/null || need+=(rsync)
[ -x /usr/sbin/sshd ] && command -v ssh-keygen >/dev/null || need+=(openssh-server)
if ! python3 -c 'import zmq, msgpack' 2>/dev/null &&
    ! /usr/bin/python3 -c 'import zmq, msgpack' 2>/dev/null; then
    need+=(python3-zmq python3-msgpack)
fi
apt_install "${need[@]}"
# The modules are the distribution's, in /usr/bin/python3. When another python3 comes
# first in PATH (pyenv, a venv) and lacks them, the tests get the distribution's.
if ! python3 -c 'import zmq, msgpack' 2>/dev/null; then
    shim=target/python3-shim
    mkdir -p "$shim" && ln -sf /usr/bin/python3 "$shim/python3"
    echo "$(command -v python3) lacks zmq or msgpack: the tests use /usr/bin/python3" >&2
    export PATH="$PWD/$shim:$PATH"
fi
exec cargo test --workspace --locked "$@"
