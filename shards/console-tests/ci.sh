#!/usr/bin/env bash
# Runs the web console's browser tests the way CI does: Debian's Chromium and
# NSS tools (certutil, for the HTTPS test's CA; both installed when missing and
# allowed), `npm ci` for the pinned playwright-core,
# the relay binary built by cargo, then `npm test`. Screenshots of each view are
# written to target/console-screenshots/ (SCREENSHOT_DIR overrides it; the
# docs' own are refreshed with SCREENSHOT_DIR=docs/screenshots).
#
#   bash shards/console-tests/ci.sh
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)

chromium_bin=${CHROMIUM_BIN:-/usr/bin/chromium}
if [ ! -x "$chromium_bin" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing Debian's chromium"
        apt-get update
        DEBIAN_FRONTEND=noninteractive apt-get install -y chromium
    else
        echo "console tests: $chromium_bin is missing; install Debian's chromium (apt-get install chromium)" >&2
        exit 1
    fi
fi
"$chromium_bin" --version

# The HTTPS test trusts its test CA through an NSS database (certutil) and
# makes its certificates with openssl.
if ! command -v certutil >/dev/null || ! command -v openssl >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing Debian's libnss3-tools and openssl"
        apt-get update
        DEBIAN_FRONTEND=noninteractive apt-get install -y libnss3-tools openssl
    else
        echo "console tests: certutil or openssl is missing; install libnss3-tools and openssl" >&2
        exit 1
    fi
fi

command -v node >/dev/null || { echo "console tests: node is missing" >&2; exit 1; }
node --version

(cd "$root" && cargo build -p relay-shards --bin relay)
target_dir=${CARGO_TARGET_DIR:-$root/target}
export RELAY_BIN=${RELAY_BIN:-$target_dir/debug/relay}
export CHROMIUM_BIN=$chromium_bin
# A relative SCREENSHOT_DIR is taken from where this script was started.
if [ -n "${SCREENSHOT_DIR:-}" ] && [ "${SCREENSHOT_DIR#/}" = "$SCREENSHOT_DIR" ]; then
    export SCREENSHOT_DIR=$PWD/$SCREENSHOT_DIR
fi

cd "$here"
npm ci --no-audit --no-fund
npm test
