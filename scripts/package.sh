#!/usr/bin/env bash
# Builds the Debian package dist/syncbus_<version>_<arch>.deb from this checkout with
# dpkg-deb (no debhelper, no source package): the release binary (stripped by the
# release profile), both unit shapes, tmpfiles.d for /run/syncbus, /var/lib/syncbus
# (made by postinst), the example config as a conffile, man pages and bash/zsh/fish
# completions generated from the CLI (`syncbus generate-docs`), copyright with every
# statically linked component, and the changelogs. The packaging files are in
# deploy/debian/. A warm target/release is reused; from cold the release build takes
# several minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need=($(build_needs))
command -v dpkg-shlibdeps >/dev/null || need+=(dpkg-dev)
apt_install "${need[@]}"

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
deb_version=$(sed -n '1s/^syncbus (\([^)]*\)).*/\1/p' deploy/debian/changelog)
if [ "$deb_version" != "$version" ]; then
    echo "deploy/debian/changelog is at $deb_version, Cargo.toml at $version: add an entry" >&2
    exit 1
fi
arch=$(dpkg --print-architecture)
deb=dist/syncbus_${version}_${arch}.deb

echo "building the release binary (cargo build --release --locked)" >&2
cargo build --release --locked
bin=target/release/syncbus

echo "assembling $deb" >&2
work=target/deb
root=$work/root
rm -rf "$work" && mkdir -p "$root/DEBIAN" dist
install -D -m 0755 "$bin" "$root/usr/bin/syncbus"

# The units as deploy/systemd has them, with the packaged binary's path.
for unit in deploy/systemd/*.service deploy/systemd/*.target; do
    install -D -m 0644 /dev/null "$root/usr/lib/systemd/system/${unit##*/}"
    sed 's#/usr/local/bin/syncbus#/usr/bin/syncbus#g' "$unit" > "$root/usr/lib/systemd/system/${unit##*/}"
done
install -D -m 0644 deploy/debian/syncbus.tmpfiles "$root/usr/lib/tmpfiles.d/syncbus.conf"
install -D -m 0644 deploy/debian/lintian-overrides "$root/usr/share/lintian/overrides/syncbus"
install -D -m 0644 deploy/syncbus.example.toml "$root/etc/syncbus/syncbus.example.toml"

# Man pages and completions, written by clap's generators from the CLI definition.
"$bin" generate-docs "$work/generated" >/dev/null
install -d "$root/usr/share/man/man1"
for page in "$work"/generated/man1/*.1; do
    gzip -9n < "$page" > "$root/usr/share/man/man1/${page##*/}.gz"
done
install -D -m 0644 "$work/generated/completions/syncbus.bash" \
    "$root/usr/share/bash-completion/completions/syncbus"
install -D -m 0644 "$work/generated/completions/_syncbus" \
    "$root/usr/share/zsh/vendor-completions/_syncbus"
install -D -m 0644 "$work/generated/completions/syncbus.fish" \
    "$root/usr/share/fish/vendor_completions.d/syncbus.fish"

# Documentation, copyright and the licences of everything linked in.
doc=$root/usr/share/doc/syncbus
install -d "$doc/examples/supervisor"
gzip -9n < CHANGELOG.md > "$doc/changelog.gz"
gzip -9n < deploy/debian/changelog > "$doc/changelog.Debian.gz"
gzip -9n < README.md > "$doc/README.md.gz"
for conf in deploy/supervisor/*.conf; do
    sed 's#/usr/local/bin/syncbus#/usr/bin/syncbus#g' "$conf" > "$doc/examples/supervisor/${conf##*/}"
done
# The crates linked into the binary (normal dependencies, this target), not the
# workspace's own, nor proc-macros (they run in the compiler only).
host=$(rustc -vV | sed -n 's/^host: //p')
cargo tree --locked -e normal -p syncbus --target "$host" --prefix none --format '{p}|{l}' |
    sed 's/ (\*)$//' | grep -v -e '(/' -e '(proc-macro)' | sort -u > "$work/crates"
registry=("${CARGO_HOME:-$HOME/.cargo}"/registry/src/*)
{
    while IFS='|' read -r crate license; do
        printf ' %s: %s\n' "$crate" "$license"
    done < "$work/crates"
} > "$work/crates.copyright"
sed -e "/^@CRATES@$/{r $work/crates.copyright" -e 'd}' deploy/debian/copyright > "$doc/copyright"
zeromq=$(sed -n '/^name = "zeromq-src"$/{n;s/^version = "\(.*\)"$/\1/p}' Cargo.lock)
{
    echo "Licence texts of the components statically linked into /usr/bin/syncbus."
    echo "syncbus itself: see copyright (MIT or Apache-2.0)."
    echo
    section() { # section TITLE FILE…
        printf '%s\n%s\n' "======== $1" ""
        shift
        for f in "$@"; do printf -- '-------- %s\n\n' "${f##*/}"; cat "$f"; echo; done
    }
    for dir in "${registry[@]}"; do
        z=$dir/zeromq-src-$zeromq/vendor
        [ -d "$z" ] || continue
        section "libzmq (from zeromq-src $zeromq): LGPL-3.0-or-later with a static-linking exception" \
            "$z/COPYING.LESSER" "$z/COPYING" "$z/AUTHORS" "$z/external/sha1/license.txt"
        break
    done
    while IFS='|' read -r crate license; do
        name=${crate% v*} ver=${crate##* v}
        files=()
        for dir in "${registry[@]}"; do
            [ -d "$dir/$name-$ver" ] || continue
            while IFS= read -r -d '' f; do files+=("$f"); done < <(
                find "$dir/$name-$ver" -maxdepth 1 -type f \( -iname 'licen[cs]e*' -o \
                    -iname 'copying*' -o -iname 'notice*' -o -iname 'unlicense*' \) -print0 | sort -z)
            break
        done
        if [ ${#files[@]} -eq 0 ]; then
            section "$name $ver: $license (the crate ships no licence file)"
        else
            section "$name $ver: $license" "${files[@]}"
        fi
    done < "$work/crates"
} | gzip -9n > "$doc/third-party-licenses.txt.gz"

# Control files.
shlibs=$(mkdir -p "$work/shlibs/debian" && cd "$work/shlibs" &&
    printf 'Source: syncbus\n\nPackage: syncbus\nArchitecture: any\n' > debian/control &&
    dpkg-shlibdeps -O "$OLDPWD/$root/usr/bin/syncbus" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@SIZE@/$size/" \
    -e "s/@DEPENDS@/$shlibs/" deploy/debian/control > "$root/DEBIAN/control"
install -m 0644 deploy/debian/conffiles "$root/DEBIAN/conffiles"
install -m 0755 deploy/debian/postinst deploy/debian/prerm deploy/debian/postrm "$root/DEBIAN/"
(cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z |
    xargs -0 md5sum) > "$root/DEBIAN/md5sums"
chmod 0644 "$root/DEBIAN/md5sums"
# Same tree, same archive: every mtime is the last commit's.
epoch=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
find "$root" -exec touch -h -d "@$epoch" {} +
SOURCE_DATE_EPOCH=$epoch dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "$deb"
