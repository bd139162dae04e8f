#!/usr/bin/env bash
# Stop what cluster/testcluster/up.sh started (and only that), using the pids it recorded.
# Idempotent: with nothing recorded or nothing running it does nothing and exits 0.
# Jobs still in the queue are cancelled first, so no job step outlives its slurmd.
# State (job ids, accounting database, config) is kept: up.sh starts the same cluster again.
set -euo pipefail

STATE_DIR=${TESTCLUSTER_STATE_DIR:-/run/tune-launch-testcluster}

log() { printf '[testcluster] %s\n' "$*" >&2; }

comm_of() {
    case "$1" in
        munged) echo munged ;;
        mariadb) echo mariadbd ;;
        slurmdbd) echo slurmdbd ;;
        slurmctld) echo slurmctld ;;
        slurmd-*) echo slurmd ;;
        *) return 1 ;;
    esac
}

pid_alive() { # PID COMM
    [[ $1 =~ ^[0-9]+$ ]] || return 1
    [[ "$(cat "/proc/$1/comm" 2>/dev/null)" == "$2" ]]
}

recorded_pid() { # NAME -> pid if recorded and alive with the right name
    local file=$STATE_DIR/$1.pid pid comm
    [[ -r $file ]] || return 1
    comm=$(comm_of "$1") || return 1
    pid=$(tr -dc '0-9' <"$file")
    pid_alive "$pid" "$comm" || return 1
    echo "$pid"
}

stop() { # NAME
    local name=$1 pid comm i
    comm=$(comm_of "$name")
    if pid=$(recorded_pid "$name"); then
        log "stopping $name (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do # 20 s
            pid_alive "$pid" "$comm" || break
            sleep 0.2
        done
        if pid_alive "$pid" "$comm"; then
            log "$name (pid $pid) ignored TERM for 20 s, sending KILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$STATE_DIR/$name.pid"
}

[[ $(id -u) -eq 0 ]] || {
    log "ERROR: must run as root"
    exit 1
}
[[ -d $STATE_DIR ]] || {
    log "nothing recorded in $STATE_DIR: nothing to stop"
    exit 0
}

# Cancel remaining jobs while our controller and slurmds still run.
if recorded_pid slurmctld >/dev/null && command -v squeue >/dev/null; then
    jobs=$(squeue -h -o %i 2>/dev/null || true)
    if [[ -n $jobs ]]; then
        log "cancelling jobs: $(tr '\n' ' ' <<<"$jobs")"
        # shellcheck disable=SC2086 # one id per word
        scancel $jobs 2>/dev/null || true
        for ((i = 0; i < 60; i++)); do # KillWait=5, so this is normally quick
            [[ -z "$(squeue -h -t running,completing -o %i 2>/dev/null || true)" ]] && break
            sleep 0.5
        done
    fi
fi

shopt -s nullglob
for f in "$STATE_DIR"/slurmd-*.pid; do
    name=${f##*/}
    stop "${name%.pid}"
done
for name in slurmctld slurmdbd mariadb munged; do
    stop "$name"
done
rm -f "$STATE_DIR/config.sha256"
rmdir "$STATE_DIR" 2>/dev/null || true
log "stopped"
