#!/usr/bin/env bash
# The package as a user meets it: installs dist/syncbus_<version>_<arch>.deb on this
# machine with dpkg -i, checks what it put where, removes it (the conffile stays) and
# purges it (everything goes). Runs as root (through sudo otherwise). Refuses where a
# syncbus package or /etc/syncbus already exists.
#
# A purge deletes /var/lib/syncbus. Where that exists already (the test suite run as
# root leaves one-liners' journals there, and a run may be using them right now), the
# test sees /var/lib through a throw-away overlay in a mount namespace of its own: the
# package's files land for real, the state dir and the dpkg database it changes do not.
#
#   scripts/test-package.sh [DEB]      default: the one scripts/package.sh built
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || exec sudo "$0" "$@"
. scripts/lib.sh
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
deb=${1:-dist/syncbus_${version}_$(dpkg --print-architecture).deb}

if [ -z "${SYNCBUS_TEST_PACKAGE_OVERLAY:-}" ]; then
    if dpkg-query -W -f='${Status}' syncbus 2>/dev/null | grep -q ' installed$'; then
        echo "a syncbus package is installed already; not touching it" >&2
        exit 1
    fi
    if [ -e /etc/syncbus ]; then
        echo "/etc/syncbus exists and is not the package's; not testing here" >&2
        exit 1
    fi
    need=()
    command -v rsync >/dev/null || need+=(rsync) # Depends: dpkg -i installs none
    command -v man >/dev/null || need+=(man-db)
    command -v readelf >/dev/null || need+=(binutils)
    apt_install "${need[@]}"
    if [ -e /var/lib/syncbus ]; then
        echo "/var/lib/syncbus exists: testing under an overlay of /var/lib" >&2
        tmp=$(mktemp -d)
        trap 'rm -rf "$tmp"' EXIT
        mkdir "$tmp/upper" "$tmp/work"
        SYNCBUS_TEST_PACKAGE_OVERLAY=1 unshare -m sh -ec '
            mount -t overlay overlay -o "lowerdir=/var/lib,upperdir=$1/upper,workdir=$1/work" /var/lib
            rm -rf /var/lib/syncbus
            exec "$2" "$3"' sh "$tmp" "$0" "$deb"
        exit 0
    fi
fi

fail() { echo "test-package: $*" >&2; exit 1; }
installed=
cleanup() { [ -z "$installed" ] || dpkg --purge syncbus >/dev/null || true; }
trap cleanup EXIT

dpkg -i "$deb"
installed=1

out=$(syncbus --version)
[ "$out" = "syncbus $version" ] || fail "syncbus --version says '$out'"
[ "$(command -v syncbus)" = /usr/bin/syncbus ] || fail "syncbus is $(command -v syncbus)"
[ "$(man -w syncbus)" = /usr/share/man/man1/syncbus.1.gz ] || fail "man -w syncbus: $(man -w syncbus)"
man -w syncbus-check-config >/dev/null || fail "no man page for syncbus-check-config"
syncbus check-config --no-environment /etc/syncbus/syncbus.example.toml
dpkg-query -W -f='${Conffiles}\n' syncbus | grep -q '^ /etc/syncbus/syncbus.example.toml ' ||
    fail "the example config is not a conffile"
# Stripped: no debug sections, no symbol table.
! readelf -S /usr/bin/syncbus | grep -Eq '\.(debug_[a-z]+|symtab)\b' || fail "/usr/bin/syncbus is not stripped"
for unit in syncbus.service syncbus.target syncbus-watcher.service syncbus-dispatcher.service; do
    [ -f "/usr/lib/systemd/system/$unit" ] || fail "$unit missing"
done
grep -q '^ExecStart=/usr/bin/syncbus run ' /usr/lib/systemd/system/syncbus.service ||
    fail "syncbus.service does not run /usr/bin/syncbus"
! grep -rq /usr/local/bin /usr/lib/systemd/system/syncbus* || fail "a unit names /usr/local/bin"
systemd-analyze verify /usr/lib/systemd/system/syncbus*.service /usr/lib/systemd/system/syncbus.target
for unit in /usr/lib/systemd/system/syncbus*.service; do # exposure at most 3.0 (internal scale: 30)
    systemd-analyze security --offline=yes --threshold=30 "$unit" >/dev/null || fail "$unit: exposure above 3.0"
done
bash -c '. /usr/share/bash-completion/completions/syncbus && complete -p syncbus' >/dev/null ||
    fail "the bash completion does not load"
[ -s /usr/share/zsh/vendor-completions/_syncbus ] || fail "no zsh completion"
[ -s /usr/share/fish/vendor_completions.d/syncbus.fish ] || fail "no fish completion"
[ "$(stat -c %a /var/lib/syncbus)" = 700 ] || fail "/var/lib/syncbus is not 0700"
[ -f /usr/lib/tmpfiles.d/syncbus.conf ] || fail "no tmpfiles.d entry for /run/syncbus"
grep -q '^License: LGPL-3+ with static-linking exception' /usr/share/doc/syncbus/copyright ||
    fail "copyright does not state libzmq's licence"
zgrep -q 'GNU LESSER GENERAL PUBLIC LICENSE' /usr/share/doc/syncbus/third-party-licenses.txt.gz ||
    fail "third-party-licenses lacks the LGPL text"
for f in changelog.gz changelog.Debian.gz; do
    [ -s "/usr/share/doc/syncbus/$f" ] || fail "no $f"
done

dpkg -r syncbus
[ ! -e /usr/bin/syncbus ] || fail "dpkg -r left /usr/bin/syncbus"
[ -f /etc/syncbus/syncbus.example.toml ] || fail "dpkg -r removed the conffile"
dpkg --purge syncbus
installed=
for p in /etc/syncbus /var/lib/syncbus /usr/share/doc/syncbus /usr/lib/systemd/system/syncbus.service; do
    [ ! -e "$p" ] || fail "dpkg --purge left $p"
done
echo "test-package: $deb installs, works and goes away again" >&2
