#!/usr/bin/env bash
# A throwaway local PostgreSQL server for the test suite (CI runs it; so can a developer).
#
#   eval "$(scripts/ci_postgres.sh)"    # start (or reuse) it; prints: export SPINQUANT_TEST_POSTGRES_URL=...
#   scripts/ci_postgres.sh stop         # stop it and delete its data
#   scripts/ci_postgres.sh halt         # stop the server, keep its data (the fault tests: a database outage)
#   scripts/ci_postgres.sh resume       # start a halted server again on its port
#
# Installs PostgreSQL with apt-get when no initdb/pg_ctl is found (root on Debian). As root the server
# runs as the `postgres` OS user (created if missing; root cannot run initdb), otherwise as the caller.
# Data, socket, log, port and password live in $SPINQUANT_PG_STATE (default /tmp/spinquant-ci-postgres-<uid>).
# Idempotent: a second start prints the same URL without restarting. Only the export line goes to stdout;
# every log line goes to stderr. Durability is off (fsync=off): it is a test server.
set -euo pipefail

STATE=$(realpath -m "${SPINQUANT_PG_STATE:-${TMPDIR:-/tmp}/spinquant-ci-postgres-$(id -u)}")
SELF=$(realpath "$0")
cd /  # the server's OS user may not be able to enter the caller's directory
DATA=$STATE/data
LOG=$STATE/server.log
FIRST_PORT=${SPINQUANT_PG_PORT:-55432}
DB_USER=spinquant
DB_NAME=spinquant

log() { printf 'ci_postgres: %s\n' "$*" >&2; }
trap 'log "ERROR: unexpected failure at line $LINENO (exit $?)"' ERR
die() { log "ERROR: $*"; [[ -f $LOG ]] && { log "server log ($LOG):"; tail -n 30 "$LOG" >&2 || true; }; exit 1; }

find_bindir() {
    local d
    if command -v pg_config >/dev/null 2>&1; then
        d=$(pg_config --bindir 2>/dev/null || true)
        if [[ -n $d && -x $d/initdb && -x $d/pg_ctl ]]; then echo "$d"; return 0; fi
    fi
    # Debian keeps the server binaries out of PATH, one folder per major version: take the newest.
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        if [[ -x $d/initdb && -x $d/pg_ctl && -x $d/postgres ]]; then echo "$d"; return 0; fi
    done
    if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
        dirname "$(readlink -f "$(command -v initdb)")"; return 0
    fi
    return 1
}

install_postgres() {
    [[ $(id -u) -eq 0 ]] || die "PostgreSQL is not installed and installing it needs root (apt-get install postgresql)"
    command -v apt-get >/dev/null 2>&1 || die "PostgreSQL is not installed and there is no apt-get to install it"
    log "PostgreSQL not found: installing it with apt-get (takes a minute)"
    export DEBIAN_FRONTEND=noninteractive
    local apt=(apt-get install -y -qq --no-install-recommends -o Dpkg::Options::=--force-confdef
               -o Dpkg::Options::=--force-confold)
    apt-get update -qq >&2 || die "apt-get update failed"
    # The packaged 'main' cluster is not needed (we run our own): turn it off before the server package
    # would create and start it (the same steps as the official postgres Docker image).
    "${apt[@]}" postgresql-common >&2 || die "apt-get install postgresql-common failed"
    sed -ri 's/^#?\s*(create_main_cluster)\s*=.*$/\1 = false/' /etc/postgresql-common/createcluster.conf || true
    "${apt[@]}" postgresql >&2 || die "apt-get install postgresql failed"
}

BIN=$(find_bindir || true)

# Who owns and runs the server.
if [[ $(id -u) -eq 0 ]]; then
    OWNER=postgres
    as_owner() { runuser -u "$OWNER" -- "$@"; }
else
    OWNER=$(id -un)
    as_owner() { "$@"; }
fi

pg_running() { [[ -n $BIN && -f $DATA/PG_VERSION ]] && as_owner "$BIN/pg_ctl" status -D "$DATA" >/dev/null 2>&1; }

server_start() {  # $1: the port
    as_owner "$BIN/pg_ctl" start -D "$DATA" -l "$LOG" -w -t 60 -o "-p $1 -k $STATE -c listen_addresses=127.0.0.1 \
-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=50" >&2 \
        || die "pg_ctl start failed"
}

if [[ ${1:-start} == halt ]]; then
    [[ -f $STATE/ready ]] || die "no server was made in $STATE"
    pg_running && { as_owner "$BIN/pg_ctl" stop -D "$DATA" -m fast -w >&2 || die "pg_ctl stop failed"; }
    log "halted (data kept in $DATA)"
    exit 0
fi
if [[ ${1:-start} == resume ]]; then
    [[ -f $STATE/ready ]] || die "no server was made in $STATE"
    pg_running || server_start "$(cat "$STATE/port")"
    log "resumed on port $(cat "$STATE/port")"
    exit 0
fi

if [[ ${1:-start} == stop ]]; then
    if pg_running; then
        log "stopping the server in $DATA"
        as_owner "$BIN/pg_ctl" stop -D "$DATA" -m fast -w >&2 || die "pg_ctl stop failed"
    else
        log "no server running in $DATA"
    fi
    rm -rf "$STATE"
    exit 0
fi
[[ ${1:-start} == start ]] || die "usage: $SELF [start|stop|halt|resume]"

if [[ -z $BIN ]]; then
    install_postgres
    BIN=$(find_bindir) || die "PostgreSQL was installed but no initdb/pg_ctl was found under /usr/lib/postgresql"
fi

if [[ $OWNER == postgres ]] && ! id postgres >/dev/null 2>&1; then
    log "creating the postgres OS user"
    useradd --system --user-group --home-dir /var/lib/postgresql --no-create-home --shell /bin/bash postgres \
        || die "could not create the postgres user"
fi

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

url() { echo "postgresql+psycopg://$DB_USER:$(cat "$STATE/password")@127.0.0.1:$(cat "$STATE/port")/$DB_NAME"; }

if pg_running && [[ -s $STATE/port && -s $STATE/password && -f $STATE/ready ]]; then
    log "reusing the server on port $(cat "$STATE/port") ($DATA)"
    echo "export SPINQUANT_TEST_POSTGRES_URL='$(url)'"
    exit 0
fi

# Anything half-made (a crash, an interrupted first run) is thrown away and built again.
if pg_running; then
    as_owner "$BIN/pg_ctl" stop -D "$DATA" -m immediate -w >&2 || true
fi
rm -rf "$STATE"
mkdir -p "$STATE"
chmod 700 "$STATE"
[[ $OWNER == "$(id -un)" ]] || chown "$OWNER:" "$STATE"

port=$FIRST_PORT
while ! port_free "$port"; do
    port=$((port + 1))
    (( port < FIRST_PORT + 100 )) || die "no free port in $FIRST_PORT-$((FIRST_PORT + 99))"
done
password=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
printf '%s\n' "$port" > "$STATE/port"
(umask 077; printf '%s\n' "$password" > "$STATE/password")

log "initdb ($($BIN/postgres --version)) in $DATA as $OWNER"
as_owner "$BIN/initdb" -D "$DATA" -U "$OWNER" -E UTF8 --locale=C --no-sync \
    --auth-local=trust --auth-host=scram-sha-256 >"$STATE/initdb.log" 2>&1 \
    || { cat "$STATE/initdb.log" >&2; die "initdb failed"; }

log "starting on 127.0.0.1:$port"
server_start "$port"

as_owner "$BIN/psql" -X -q -h "$STATE" -p "$port" -U "$OWNER" -d postgres -v ON_ERROR_STOP=1 \
    -c "CREATE ROLE $DB_USER LOGIN PASSWORD '$password'" \
    -c "CREATE DATABASE $DB_NAME OWNER $DB_USER" >&2 || die "could not create role/database $DB_NAME"
touch "$STATE/ready"
log "ready: database $DB_NAME, user $DB_USER, port $port (stop: $SELF stop)"
echo "export SPINQUANT_TEST_POSTGRES_URL='$(url)'"
