# Sourced by the scripts in this directory. Installs Debian packages (never pip: a stock
# Debian 12 Python refuses it, "externally-managed-environment").

# apt_install PKG…: installs the packages named, with sudo unless root; nothing if none.
apt_install() {
    [ $# -gt 0 ] || return 0
    echo "installing with apt-get: $*" >&2
    local sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

# build_needs: the packages a build lacks. The bundled libzmq (zmq-sys → zeromq-src) is
# C++ and compiled by the cc crate: a C++ compiler, no cmake.
build_needs() {
    command -v c++ >/dev/null || echo g++
}
