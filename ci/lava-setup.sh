#!/usr/bin/env bash
# A LAVA lab on this machine, for the `lava` box kind (tests/test_lava.py, configs/testboxes.toml's
# lab-qemu): Debian's lava-server and lava-dispatcher with one qemu device, everything bound to
# 127.0.0.1, no systemd needed.
#
#   bash ci/lava-setup.sh start    # install if needed, set up once, start what is not running
#   bash ci/lava-setup.sh stop     # stop what this script started (by its PID files)
#   bash ci/lava-setup.sh status
#
# All state lives under $KSERIES_LAVA_DIR (default /var/tmp/kseries-lava, which the postgres and
# lavaserver users can reach; /root cannot be): its own PostgreSQL cluster, the settings (given to
# LAVA through LAVA_JSON_SETTINGS, so /etc/lava-server is left as the package made it), the
# device dictionary, job output, logs, PID files and the API token (mode 600). `start` writes
# $DIR/lava.env (URL, token file, device type) for the tests to read. Safe to run twice: each
# step is skipped when done, and `start` holds $DIR/.lock.
set -euo pipefail

DIR=${KSERIES_LAVA_DIR:-/var/tmp/kseries-lava}
PY=/usr/bin/python3 # LAVA's tools need Debian's python3, not whatever python3 is on PATH
PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
WORKER=kseries-worker
DEVICE=kseries-qemu-01
USER_NAME=kseries
SERVICES=(gunicorn publisher scheduler worker)

say() { echo "lava-setup: $*"; }
die() {
    echo "lava-setup: error: $*" >&2
    exit 1
}

started_at() { # PID: the process's start time (field 22 of /proc/PID/stat), so a reused PID is not ours
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    set -- $stat
    echo "${20}"
}

alive() { # NAME: the service's PID file names a live process, the one this script started
    local pid when
    [[ -f $DIR/run/$1.pid ]] || return 1
    read -r pid when <"$DIR/run/$1.pid"
    [[ -n $pid && -n $when && $(started_at "$pid") == "$when" ]]
}

pg_alive() { [[ -f $DIR/pg/postmaster.pid ]] && su postgres -s /bin/sh -c "$PG_BIN/pg_ctl -D $DIR/pg status" >/dev/null 2>&1; }

free_port() { # a port on 127.0.0.1 nobody listens on, picked by the OS
    $PY -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

port_free() { ! $PY -c 'import socket, sys; s = socket.socket(); s.settimeout(1); sys.exit(s.connect_ex(("127.0.0.1", int(sys.argv[1]))) != 0)' "$1"; }

lava() { # lava-server manage with our settings, as root
    env "${LAVA_ENV[@]}" lava-server manage "$@"
}

install_packages() {
    local missing=()
    for pkg in lava-server lava-dispatcher postgresql qemu-system-x86; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if ((${#missing[@]})); then
        say "installing ${missing[*]} (PostgreSQL is not running, so the postinst makes no database)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    PG_BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
}

choose_ports() { # keep the recorded ports while they are free (or ours); else pick new ones
    local name port
    [[ -f $DIR/ports.env ]] && source "$DIR/ports.env"
    # The web port is the one configs/testboxes.toml's lab-qemu names, unless it is taken.
    WEB_PORT=${KSERIES_LAVA_PORT:-8787}
    for name in PG_PORT WEB_PORT PUB_PORT EVENT_PORT; do
        port=${!name:-}
        if [[ -z $port ]] || ! port_free "$port"; then
            port=$(free_port)
            port_free "$port" || die "port $port on 127.0.0.1 is taken"
            [[ $name == WEB_PORT ]] && say "port ${!name} is taken: the server gets $port (put url = \"http://127.0.0.1:$port\" under [box.lab-qemu.lava] in configs/local.toml)"
            printf -v "$name" %s "$port"
        fi
    done
    printf 'PG_PORT=%s\nWEB_PORT=%s\nPUB_PORT=%s\nEVENT_PORT=%s\n' \
        "$PG_PORT" "$WEB_PORT" "$PUB_PORT" "$EVENT_PORT" >"$DIR/ports.env.new"
    mv "$DIR/ports.env.new" "$DIR/ports.env"
}

secret() { # FILE: a random secret made once, mode 600
    [[ -s $1 ]] || (umask 077 && $PY -c 'import secrets; print(secrets.token_urlsafe(32))' >"$1.new" && mv "$1.new" "$1")
    cat "$1"
}

start_postgres() {
    if [[ ! -f $DIR/pg/PG_VERSION ]]; then
        say "making a PostgreSQL cluster in $DIR/pg"
        rm -rf "$DIR/pg"
        install -d -o postgres -g postgres -m 700 "$DIR/pg"
        su postgres -s /bin/sh -c "$PG_BIN/initdb -D $DIR/pg -U postgres --auth-local=peer --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8" >"$DIR/log/initdb.log"
    fi
    install -d -o postgres -g postgres -m 755 "$DIR/run/pg" "$DIR/log/pg"
    if ! pg_alive; then
        su postgres -s /bin/sh -c "$PG_BIN/pg_ctl -D $DIR/pg -l $DIR/log/pg/postgres.log -w -o \"-c listen_addresses=127.0.0.1 -p $PG_PORT -k $DIR/run/pg\" start" >/dev/null 9>&-
    fi
    local password
    password=$(secret "$DIR/db-password")
    su postgres -s /bin/sh -c "psql -q -h $DIR/run/pg -p $PG_PORT -v ON_ERROR_STOP=1" <<EOF >/dev/null
DO \$\$ BEGIN
  CREATE ROLE lavaserver LOGIN PASSWORD '$password';
EXCEPTION WHEN duplicate_object THEN ALTER ROLE lavaserver PASSWORD '$password';
END \$\$;
SELECT 'CREATE DATABASE lavaserver OWNER lavaserver TEMPLATE template0 ENCODING ''UTF8'' LC_COLLATE ''C.UTF-8'' LC_CTYPE ''C.UTF-8'''
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'lavaserver')\gexec
EOF
}

write_settings() {
    local password key
    password=$(secret "$DIR/db-password")
    key=$(secret "$DIR/secret-key")
    (umask 077 && cat >"$DIR/settings.json.new" <<EOF
{
  "DATABASES": {"default": {"ENGINE": "django.db.backends.postgresql", "NAME": "lavaserver",
    "USER": "lavaserver", "PASSWORD": "$password", "HOST": "127.0.0.1", "PORT": $PG_PORT}},
  "SECRET_KEY": "$key",
  "ALLOWED_HOSTS": ["127.0.0.1", "localhost"],
  "EVENT_NOTIFICATION": true,
  "INTERNAL_EVENT_SOCKET": "ipc://$DIR/run/lava/events",
  "EVENT_SOCKET": "tcp://127.0.0.1:$EVENT_PORT",
  "MEDIA_ROOT": "$DIR/media",
  "DEVICES_PATH": "$DIR/devices",
  "HEALTH_CHECKS_PATH": "$DIR/health-checks",
  "DISPATCHER_CONFIG_PATH": "$DIR/dispatcher.d",
  "DJANGO_LOGFILE": "$DIR/log/django.log"
}
EOF
    )
    mv "$DIR/settings.json.new" "$DIR/settings.json"
    LAVA_ENV=("KSERIES_LAVA=$DIR" "LAVA_JSON_SETTINGS=$(base64 -w0 "$DIR/settings.json")")
}

set_up_lab() {
    if [[ ! -f $DIR/migrated ]]; then
        say "creating LAVA's tables (lava-server manage migrate)"
        lava migrate --noinput >"$DIR/log/migrate.log"
        touch "$DIR/migrated"
    fi
    if ! lava users details "$USER_NAME" >/dev/null 2>&1; then
        lava users add "$USER_NAME" --superuser --staff --passwd "$(secret "$DIR/user-password")" >/dev/null
    fi
    if [[ ! -s $DIR/token ]]; then
        local token
        token=$(secret "$DIR/token.new")
        lava tokens add --user "$USER_NAME" --description kseries --secret "$token" >/dev/null
        mv "$DIR/token.new" "$DIR/token"
    fi
    lava device-types details qemu >/dev/null 2>&1 || lava device-types add qemu >/dev/null
    if ! lava workers details "$WORKER" >/dev/null 2>&1; then
        lava workers add "$WORKER" --description "kseries: this machine" >/dev/null
    fi
    lava workers details "$WORKER" | sed -n 's/^token *: *//p' >"$DIR/worker/token.new"
    chmod 600 "$DIR/worker/token.new" && mv "$DIR/worker/token.new" "$DIR/worker/token"
    # The qemu device: TCG (this machine's /dev/kvm cannot run an ordinary guest); the CPU, memory
    # and command line come from each job's context.
    cat >"$DIR/devices/$DEVICE.jinja2.new" <<'EOF'
{% extends 'qemu.jinja2' %}
{% set no_kvm = True %}
{% set mac_addr = '52:54:00:12:34:5a' %}
{% set arch = 'amd64' %}
EOF
    mv "$DIR/devices/$DEVICE.jinja2.new" "$DIR/devices/$DEVICE.jinja2"
    if ! lava devices details "$DEVICE" >/dev/null 2>&1; then
        lava devices add --device-type qemu --worker "$WORKER" "$DEVICE" >/dev/null
    fi
    lava devices update --health GOOD "$DEVICE" >/dev/null
    chown -R lavaserver:lavaserver "$DIR/media" "$DIR/devices"
}

launch() { # NAME COMMAND...: start it in its own session, keep its PID
    local name=$1
    shift
    if alive "$name"; then
        return
    fi
    setsid env "${LAVA_ENV[@]}" "$@" </dev/null >>"$DIR/log/$name.out" 2>&1 9>&- &
    echo "$! $(started_at $!)" >"$DIR/run/$name.pid"
    say "started $name (pid $!)"
}

start_services() {
    # gunicorn and the scheduler write their logs (django.log too) as lavaserver
    find "$DIR/log" -maxdepth 1 -type f -exec chown lavaserver:lavaserver {} +
    chown lavaserver:lavaserver "$DIR/log"
    install -d -o lavaserver -g lavaserver -m 755 "$DIR/run/lava" # the publisher's event socket
    # gunicorn binds exactly where it is told; the publisher binds every interface unless told.
    launch gunicorn /usr/bin/gunicorn3 lava_server.wsgi --bind "127.0.0.1:$WEB_PORT" \
        -u lavaserver -g lavaserver --workers 2 --timeout 120 --log-level INFO \
        --log-file "$DIR/log/gunicorn.log"
    launch publisher lava-server manage lava-publisher --host 127.0.0.1 --port "$PUB_PORT" \
        --level INFO --log-file "$DIR/log/publisher.log"
    launch scheduler lava-server manage lava-scheduler --level INFO \
        --log-file "$DIR/log/scheduler.log" --event-url "tcp://127.0.0.1:$EVENT_PORT"
    # A 2 s ping and the event stream: without them a job waits ~30 s in the queue.
    launch worker /usr/bin/lava-worker --name "$WORKER" --url "http://127.0.0.1:$WEB_PORT/" \
        --ws-url "ws://127.0.0.1:$PUB_PORT/ws/" --token-file "$DIR/worker/token" \
        --worker-dir "$DIR/worker" --ping-interval 2 --job-log-interval 1 --level INFO \
        --log-file "$DIR/log/worker.log"
}

wait_ready() { # the REST API answers and the worker has pinged the device healthy
    local url="http://127.0.0.1:$WEB_PORT/api/v0.2/devices/$DEVICE/" i
    for i in $(seq 1 120); do
        if $PY - "$url" "$DIR/token" <<'EOF' 2>/dev/null; then
import json, sys, urllib.request
request = urllib.request.Request(sys.argv[1], headers={"Authorization": "Token " + open(sys.argv[2]).read().strip()})
device = json.load(urllib.request.urlopen(request, timeout=5))
# Idle or busy with someone's job; Unknown is what an incomplete job leaves, and LAVA still
# schedules on it (this lab has no health check to turn it Good again)
sys.exit(device["health"] not in ("Good", "Unknown"))
EOF
            return 0
        fi
        for name in "${SERVICES[@]}"; do
            if ! alive "$name"; then
                echo "lava-setup: $name died; see $DIR/log/$name.out and $DIR/log/$name.log" >&2
                return 1
            fi
        done
        sleep 1
    done
    echo "lava-setup: the device $DEVICE is not healthy after 120 s; see $DIR/log/" >&2
    return 1
}

start() {
    [[ $(id -u) == 0 ]] || die "run as root (apt, the postgres and lavaserver users)"
    local started=$SECONDS
    install -d -m 755 "$DIR" "$DIR/run" "$DIR/log" "$DIR/worker" "$DIR/devices" "$DIR/health-checks" "$DIR/dispatcher.d" "$DIR/media"
    exec 9>"$DIR/.lock"
    flock 9
    install_packages
    local down=0 name
    for name in "${SERVICES[@]}"; do alive "$name" || down=1; done
    pg_alive || down=1
    if ((down)); then
        stop_services # start from a clean slate: new ports must reach every service
        choose_ports
    else
        source "$DIR/ports.env"
    fi
    if ((down)) || [[ ! -f $DIR/lava.env ]]; then
        trap 'stop_services' ERR # a failed start leaves nothing of it running
        start_postgres
        write_settings
        set_up_lab
        start_services
        trap - ERR
        wait_ready || { stop_services && die "LAVA did not come up"; }
    else
        wait_ready || die "LAVA runs, but is not ready" # all up already: only look
    fi
    cat >"$DIR/lava.env.new" <<EOF
LAVA_URL=http://127.0.0.1:$WEB_PORT
LAVA_TOKEN_FILE=$DIR/token
LAVA_DEVICE_TYPE=qemu
LAVA_DEVICE=$DEVICE
LAVA_WORKER=$WORKER
EOF
    mv "$DIR/lava.env.new" "$DIR/lava.env"
    say "LAVA is up at http://127.0.0.1:$WEB_PORT (device $DEVICE healthy) in $((SECONDS - started)) s; token in $DIR/token"
}

stop_services() {
    local name pid
    for name in worker scheduler publisher gunicorn; do
        if alive "$name"; then
            read -r pid _ <"$DIR/run/$name.pid"
            kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
            for _ in $(seq 1 50); do [[ -d /proc/$pid ]] || break; sleep 0.2; done
            [[ -d /proc/$pid ]] && kill -KILL -- "-$pid" 2>/dev/null
            say "stopped $name (pid $pid)"
        fi
        rm -f "$DIR/run/$name.pid"
    done
    if [[ -n $PG_BIN ]] && pg_alive; then
        su postgres -s /bin/sh -c "$PG_BIN/pg_ctl -D $DIR/pg -m fast -w stop" >/dev/null
        say "stopped PostgreSQL ($DIR/pg)"
    fi
}

status() {
    local name
    for name in "${SERVICES[@]}"; do
        if alive "$name"; then echo "$name: running (pid $(cut -d' ' -f1 "$DIR/run/$name.pid"))"; else echo "$name: stopped"; fi
    done
    if [[ -n $PG_BIN ]] && pg_alive; then echo "postgres: running"; else echo "postgres: stopped"; fi
    [[ -f $DIR/lava.env ]] && cat "$DIR/lava.env"
    return 0
}

case ${1:-start} in
start) start ;;
stop) [[ -d $DIR ]] && stop_services ;;
status) status ;;
*) die "usage: $0 [start|stop|status]" ;;
esac
