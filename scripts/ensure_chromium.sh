#!/usr/bin/env bash
# Make sure headless Chromium and its WebDriver are installed from Debian packages, for the dashboard's
# browser tests (tests/api/test_dashboard.py). Quiet and a no-op when both are already there.
#
#   scripts/ensure_chromium.sh      # exit 0: /usr/bin/chromium and /usr/bin/chromedriver exist
#
# Nothing is downloaded outside apt: Selenium is pointed at /usr/bin/chromedriver, so Selenium Manager
# never fetches a browser or driver. Exit status 2 means "cannot install here" (not root and no sudo,
# or no apt-get): the tests skip with that reason. Any other failure exits 1.
set -euo pipefail

CHROMIUM=${SPINQUANT_CHROMIUM:-/usr/bin/chromium}
DRIVER=${SPINQUANT_CHROMEDRIVER:-/usr/bin/chromedriver}

if [ -x "$CHROMIUM" ] && [ -x "$DRIVER" ]; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_chromium: $CHROMIUM or $DRIVER is missing and apt-get is not available;" \
         "install Chromium and its chromedriver (Debian: chromium chromium-driver)" >&2
    exit 2
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
else
    echo "ensure_chromium: chromium/chromedriver are not installed, and installing them needs root" \
         "(no passwordless sudo); run: sudo apt-get install chromium chromium-driver" >&2
    exit 2
fi

echo "ensure_chromium: installing chromium and chromium-driver (Debian packages)..." >&2
# Serialise concurrent runs (two test sessions starting at once) on apt's own lock.
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 update -qq
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq \
    --no-install-recommends chromium chromium-driver >/dev/null

if [ ! -x "$CHROMIUM" ] || [ ! -x "$DRIVER" ]; then
    echo "ensure_chromium: installed the packages but $CHROMIUM or $DRIVER is still missing" >&2
    exit 1
fi
echo "ensure_chromium: $("$CHROMIUM" --version 2>/dev/null || echo chromium), $("$DRIVER" --version 2>/dev/null | cut -d' ' -f1-2)" >&2
