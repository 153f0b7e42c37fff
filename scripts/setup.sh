#!/usr/bin/env bash
# Prepare this machine (Debian 12) to run and test hookgate: system packages, RabbitMQ and PostgreSQL
# answering on 127.0.0.1, and the virtual environment .venv with hookgate installed in it.
# Idempotent and non-interactive: it only installs, starts or changes what is missing, and says so.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PACKAGES=(rabbitmq-server postgresql python3-venv python3-dev build-essential wrk)
PG_TEST_URL="${HOOKGATE_TEST_PG_ADMIN_URL:-postgresql://postgres@127.0.0.1:5432/postgres}"
HBA_MARKER="# added by hookgate scripts/setup.sh: password-less TCP for the test suite"

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

# System changes need root; a machine that already has everything needs no privileges at all.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@"
    else
        die "'$*' needs root: run this script as root"
    fi
}

as_postgres() { as_root runuser -u postgres -- "$@"; }

port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

install_packages() {
    if ! command -v dpkg-query >/dev/null 2>&1; then
        say "not a Debian system: skipping system packages (needed: ${PACKAGES[*]})"
        return
    fi
    local missing=() package
    for package in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' || missing+=("$package")
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        say "system packages present: ${PACKAGES[*]}"
        return
    fi
    say "installing ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${missing[@]}"
}

start_rabbitmq() {
    if port_open 5672; then
        say "RabbitMQ answers on 127.0.0.1:5672"
        return
    fi
    if ! as_root rabbitmqctl -q ping >/dev/null 2>&1; then
        say "starting RabbitMQ (rabbitmq-server -detached)"
        as_root rabbitmq-server -detached
    fi
    say "waiting for RabbitMQ to finish starting"
    as_root rabbitmqctl -q await_startup --timeout 120
    local _
    for _ in $(seq 60); do port_open 5672 && break; sleep 1; done
    port_open 5672 || die "RabbitMQ started but does not answer on 127.0.0.1:5672"
    say "RabbitMQ answers on 127.0.0.1:5672"
}

# The gateway reads hookgate_queue_messages_unacknowledged from RabbitMQ's management API; the
# tests point HOOKGATE_BROKER_MANAGEMENT_URL at it.
enable_rabbitmq_management() {
    if ! port_open 15672; then
        say "enabling RabbitMQ's management plugin"
        as_root rabbitmq-plugins enable rabbitmq_management >/dev/null
        local _
        for _ in $(seq 60); do port_open 15672 && break; sleep 1; done
        port_open 15672 || die "the management plugin is enabled but nothing answers on 127.0.0.1:15672"
    fi
    say "RabbitMQ's management API answers on 127.0.0.1:15672"
}

start_postgresql() {
    if port_open 5432; then
        say "PostgreSQL answers on 127.0.0.1:5432"
        return
    fi
    local version
    version="$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)"
    [ -n "$version" ] || die "no PostgreSQL cluster in /etc/postgresql"
    say "starting PostgreSQL $version/main"
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start
    local _
    for _ in $(seq 60); do port_open 5432 && break; sleep 1; done
    port_open 5432 || die "PostgreSQL started but does not answer on 127.0.0.1:5432"
    say "PostgreSQL answers on 127.0.0.1:5432"
}

pg_reachable() { PGCONNECT_TIMEOUT=5 psql -w -q -At "$PG_TEST_URL" -c 'SELECT 1' </dev/null >/dev/null 2>&1; }

# The tests connect as the postgres role over TCP without a password. A fresh Debian cluster
# allows that only through the Unix socket (peer), so a trust rule for exactly that role from
# 127.0.0.1 is put first in pg_hba.conf. Suitable for development and CI machines only: set
# HOOKGATE_TEST_PG_ADMIN_URL to a URL with a password instead, and nothing is changed.
allow_test_connections() {
    if pg_reachable; then
        say "PostgreSQL accepts the tests' connection"
        return
    fi
    [ -z "${HOOKGATE_TEST_PG_ADMIN_URL:-}" ] || die "cannot connect to HOOKGATE_TEST_PG_ADMIN_URL"
    local hba
    hba="$(as_postgres psql -q -At -c 'SHOW hba_file' </dev/null)"
    if ! as_root grep -qF "$HBA_MARKER" "$hba"; then
        say "allowing password-less TCP logins for role postgres from 127.0.0.1 in $hba"
        local current
        current="$(as_root cat "$hba")"
        # Rewritten in place (not replaced) so the file keeps its owner and mode; first match wins.
        printf '%s\nhost all postgres 127.0.0.1/32 trust\n%s\n' "$HBA_MARKER" "$current" | as_root tee "$hba" >/dev/null
        as_postgres psql -q -At -c 'SELECT pg_reload_conf()' </dev/null >/dev/null
    fi
    pg_reachable || die "PostgreSQL still refuses postgres@127.0.0.1 without a password"
    say "PostgreSQL accepts the tests' connection"
}

find_python() {
    local candidate
    for candidate in ${PYTHON:-} python3.13 python3.12 python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            command -v "$candidate"
            return
        fi
    done
    die "no Python 3.11 or newer with venv and ensurepip found (set PYTHON=/path/to/python3)"
}

setup_venv() {
    if .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        say "virtual environment .venv exists ($(.venv/bin/python -V))"
    else
        local python
        python="$(find_python)"
        say "creating .venv with $python ($("$python" -V))"
        "$python" -m venv --clear .venv
    fi
    # pip runs again only when pyproject.toml changed since the last successful install.
    local stamp=.venv/.hookgate-installed wanted
    wanted="$(sha256sum pyproject.toml | cut -d' ' -f1)"
    if [ -x .venv/bin/hookgate ] && [ "$(cat "$stamp" 2>/dev/null)" = "$wanted" ]; then
        say "hookgate and its test dependencies are installed in .venv"
        return
    fi
    say "installing hookgate and its test dependencies into .venv (pip install -e '.[test]')"
    .venv/bin/python -m pip install --disable-pip-version-check --progress-bar off -q -e '.[test]'
    printf '%s\n' "$wanted" >"$stamp"
}

install_packages
start_rabbitmq
enable_rabbitmq_management
start_postgresql
allow_test_connections
setup_venv
say "done: run the gateway with .venv/bin/hookgate up, the tests with ./scripts/test.sh"
