#!/usr/bin/env bash
# Builds the relay's Debian package from a staged tree with dpkg-deb.
#
#   packaging/build-deb.sh                      cargo build --release, then package
#   packaging/build-deb.sh --binary PATH        package an already built `relay`
#   packaging/build-deb.sh --out DIR            where the .deb goes (default target/debian)
#   packaging/build-deb.sh --compression gzip   dpkg-deb's -Z (default xz; gzip is faster)
#
# Prints the path of the .deb on its last line. Needs dpkg-deb (package dpkg)
# and, to shrink the binary, strip (binutils).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
binary=""
out="$root/target/debian"
compression=xz
while [ $# -gt 0 ]; do
    case "$1" in
        --binary) binary=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --compression) compression=$2; shift 2 ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "build-deb: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

for tool in dpkg-deb dpkg; do
    command -v "$tool" >/dev/null || { echo "build-deb: $tool is missing (apt-get install dpkg)" >&2; exit 1; }
done

if [ -z "$binary" ]; then
    (cd "$root" && cargo build --release --locked -p relay-shards --bin relay)
    binary="$root/target/release/relay"
fi
[ -x "$binary" ] || { echo "build-deb: $binary is not an executable" >&2; exit 1; }

version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' "$root/Cargo.toml")
[ -n "$version" ] || { echo "build-deb: no version in Cargo.toml" >&2; exit 1; }
arch=$(dpkg --print-architecture)

stage=$(mktemp -d "${TMPDIR:-/tmp}/relay-deb.XXXXXX")
trap 'rm -rf "$stage"' EXIT
pkg="$stage/relay"

install -D -m 0755 "$binary" "$pkg/usr/bin/relay"
if command -v strip >/dev/null; then
    strip --strip-debug "$pkg/usr/bin/relay"
fi
install -D -m 0644 "$root/packaging/relay.service" "$pkg/usr/lib/systemd/system/relay.service"
install -D -m 0644 "$root/packaging/relay.sysusers" "$pkg/usr/lib/sysusers.d/relay.conf"
install -D -m 0640 "$root/packaging/relay.toml" "$pkg/etc/relay/relay.toml"
install -D -m 0640 "$root/packaging/relay.default" "$pkg/etc/default/relay"
install -d -m 0755 "$pkg/etc/relay/rules"
install -m 0644 "$root"/config/rules/*.rhai "$pkg/etc/relay/rules/"
doc="$pkg/usr/share/doc/relay"
install -d -m 0755 "$doc"
install -m 0644 "$root/README.md" "$doc/README.md"
for f in "$root"/docs/*.md; do
    install -m 0644 "$f" "$doc/"
done
install -D -m 0644 "$root/packaging/relay-alerts.yml" "$doc/examples/relay-alerts.yml"
cat >"$doc/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: relay

Files: *
License: Apache-2.0
 On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.
COPYRIGHT

install -d -m 0755 "$pkg/DEBIAN"
for script in postinst prerm postrm; do
    install -m 0755 "$root/packaging/debian/$script" "$pkg/DEBIAN/$script"
done
(cd "$pkg" && find etc -type f | sort | sed 's|^|/|') >"$pkg/DEBIAN/conffiles"
size=$(du -sk --exclude=DEBIAN "$pkg" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@SIZE@/$size/" \
    -e "s/@DEPENDS@/libc6 (>= 2.34), libgcc-s1, zlib1g, procps/" \
    "$root/packaging/debian/control.in" >"$pkg/DEBIAN/control"

mkdir -p "$out"
deb="$out/relay_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Z"$compression" --build "$pkg" "$deb" >&2
echo "$deb"
