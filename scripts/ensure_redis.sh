#!/usr/bin/env bash
# Make sure `redis-server` is on PATH, installing the Debian package when it is not.
# Quiet and a no-op when already installed. It never starts the system Redis service:
# scripts/stack.py runs its own redis-server on a free port.
set -euo pipefail

if command -v redis-server >/dev/null 2>&1; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_redis: redis-server is not installed and apt-get is not available;" \
         "install Redis (>= 6) so that redis-server is on PATH" >&2
    exit 1
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
else
    echo "ensure_redis: redis-server is not installed, and installing it needs root (no sudo found);" \
         "run: apt-get install redis-server" >&2
    exit 1
fi

echo "ensure_redis: installing redis-server (Debian package)..." >&2
# policy-rc.d exit code 101 keeps the package's maintainer scripts from starting the service.
POLICY=/usr/sbin/policy-rc.d
ADDED_POLICY=0
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$POLICY" >/dev/null
    "${SUDO[@]}" chmod +x "$POLICY"
    ADDED_POLICY=1
fi
cleanup() { if [ "$ADDED_POLICY" -eq 1 ]; then "${SUDO[@]}" rm -f "$POLICY"; fi; }
trap cleanup EXIT

"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null

if ! command -v redis-server >/dev/null 2>&1; then
    echo "ensure_redis: installed the redis-server package but redis-server is still not on PATH" >&2
    exit 1
fi
echo "ensure_redis: $(redis-server --version | cut -d' ' -f1-3)" >&2
