#!/usr/bin/env bash
# Bring up a real single-machine SLURM test cluster with two emulated nodes (n1, n2).
#
# Idempotent: a second run leaves one healthy cluster; if the generated config
# changed, the SLURM daemons this script started are restarted.
# Needs root (Debian 12, no systemd). See README.md beside this file.
#
# Environment overrides:
#   TESTCLUSTER_STATE_DIR  pids of what this script started (default /run/tune-launch-testcluster)
#   TESTCLUSTER_LOG_DIR    daemon logs                     (default /var/log/slurm)
#   TESTCLUSTER_MEM_MB     RealMemory per node in MiB      (default: (MemTotal - 2 GiB) / 2)
#   TESTCLUSTER_TIMEOUT    seconds to wait for idle nodes  (default 60)
#   TESTCLUSTER_NO_INSTALL=1  never call apt-get (fail if packages are missing)
set -euo pipefail

STATE_DIR=${TESTCLUSTER_STATE_DIR:-/run/tune-launch-testcluster}
LOG_DIR=${TESTCLUSTER_LOG_DIR:-/var/log/slurm}
TIMEOUT=${TESTCLUSTER_TIMEOUT:-60}
CONF_DIR=/etc/slurm
RUN_DIR=/run/slurm
CTLD_SPOOL=/var/spool/slurmctld
SLURMD_SPOOL=/var/spool/slurmd
MYSQL_SOCK=/run/mysqld/mysqld.sock
DB_NAME=slurm_acct_db
DB_USER=slurm
DB_PASS=tune-launch-testcluster
CLUSTER_NAME=tunelaunch
NODES=(n1 n2)
PACKAGES=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)

START_TS=$(date +%s)

log() { printf '[testcluster %3ds] %s\n' "$(($(date +%s) - START_TS))" "$*" >&2; }

die() {
    printf '[testcluster] ERROR: %s\n' "$*" >&2
    exit 1
}

# ---------------------------------------------------------------- helpers

# comm name (as in /proc/PID/comm) expected for each component
comm_of() {
    case "$1" in
        munged) echo munged ;;
        mariadb) echo mariadbd ;;
        slurmdbd) echo slurmdbd ;;
        slurmctld) echo slurmctld ;;
        slurmd-*) echo slurmd ;;
        *) die "unknown component $1" ;;
    esac
}

# pid_alive PID COMM: true if PID runs a process named COMM
pid_alive() {
    local pid=$1 comm=$2
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ -r /proc/$pid/comm ]] || return 1
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$comm" ]]
}

# pid recorded in a pid file, if that process is alive with the right name
pidfile_pid() {
    local file=$1 comm=$2 pid
    [[ -r $file ]] || return 1
    pid=$(tr -dc '0-9' <"$file")
    pid_alive "$pid" "$comm" || return 1
    echo "$pid"
}

# is component NAME running and started by us?
ours() {
    pidfile_pid "$STATE_DIR/$1.pid" "$(comm_of "$1")" >/dev/null
}

record() { # record NAME PID
    echo "$2" >"$STATE_DIR/$1.pid"
    log "started $1 (pid $2)"
}

# wait_for SECONDS DESCRIPTION CMD...: poll CMD until it succeeds
wait_for() {
    local secs=$1 what=$2
    shift 2
    local deadline=$(($(date +%s) + secs))
    until "$@" >/dev/null 2>&1; do
        if (($(date +%s) >= deadline)); then
            log "timed out after ${secs}s waiting for $what"
            return 1
        fi
        sleep 0.5
    done
}

# pid written by a self-daemonizing program into its own pid file
wait_pidfile() { # FILE COMM SECS
    local file=$1 comm=$2 secs=$3 pid
    local deadline=$(($(date +%s) + secs))
    while :; do
        if pid=$(pidfile_pid "$file" "$comm"); then
            echo "$pid"
            return 0
        fi
        (($(date +%s) >= deadline)) && return 1
        sleep 0.2
    done
}

stop_ours() { # NAME: stop a component we started (TERM, then KILL after 20 s)
    local name=$1 comm pid i
    comm=$(comm_of "$name")
    if pid=$(pidfile_pid "$STATE_DIR/$name.pid" "$comm"); then
        log "stopping $name (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do
            pid_alive "$pid" "$comm" || break
            sleep 0.2
        done
        if pid_alive "$pid" "$comm"; then
            log "$name did not stop after TERM, sending KILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.5
        fi
    fi
    rm -f "$STATE_DIR/$name.pid"
}

dump_logs() {
    local f
    for f in "$LOG_DIR"/slurmctld.log "$LOG_DIR"/slurmdbd.log "$LOG_DIR"/slurmd-n1.log \
        "$LOG_DIR"/slurmd-n2.log "$LOG_DIR"/mariadb.log /var/log/munge/munged.log; do
        [[ -r $f ]] || continue
        printf '\n----- tail of %s -----\n' "$f" >&2
        tail -n 25 "$f" >&2 || true
    done
}

fail() {
    printf '[testcluster] ERROR: %s\n' "$*" >&2
    dump_logs
    printf '[testcluster] ERROR: %s (log tails above)\n' "$*" >&2
    exit 1
}

# ---------------------------------------------------------------- checks

[[ $(id -u) -eq 0 ]] || die "must run as root"
mkdir -p "$STATE_DIR" "$LOG_DIR" "$RUN_DIR" "$CONF_DIR" "$CTLD_SPOOL"
for n in "${NODES[@]}"; do mkdir -p "$SLURMD_SPOOL/$n"; done

# ---------------------------------------------------------------- install

missing=()
for p in "${PACKAGES[@]}"; do
    if [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)" != "install ok installed" ]]; then
        missing+=("$p")
    fi
done
if ((${#missing[@]})); then
    [[ ${TESTCLUSTER_NO_INSTALL:-0} == 1 ]] && die "missing packages: ${missing[*]}"
    log "installing ${missing[*]}"
    # Keep package scripts from starting services (no init system here; we start them ourselves).
    made_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt_ok=1
    apt-get update -qq || apt_ok=0
    if ((apt_ok)); then
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || apt_ok=0
    fi
    ((made_policy)) && rm -f /usr/sbin/policy-rc.d
    ((apt_ok)) || die "apt-get install ${missing[*]} failed"
    log "installed"
fi

# ---------------------------------------------------------------- config

HOST=$(hostname -s)
if [[ -n ${TESTCLUSTER_MEM_MB:-} ]]; then
    MEM_MB=$TESTCLUSTER_MEM_MB
else
    total_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
    MEM_MB=$(((total_mb - 2048) / 2))
    ((MEM_MB >= 512)) || MEM_MB=512
fi

write_if_changed() { # FILE MODE < content
    local file=$1 mode=$2 tmp
    tmp=$(mktemp "$file.XXXXXX")
    cat >"$tmp"
    chmod "$mode" "$tmp"
    if [[ -f $file ]] && cmp -s "$tmp" "$file"; then
        rm -f "$tmp"
    else
        mv -f "$tmp" "$file"
        log "wrote $file"
    fi
}

write_if_changed "$CONF_DIR/slurm.conf" 644 <<EOF
# Generated by tune-launch cluster/testcluster/up.sh -- do not edit, re-run up.sh.
ClusterName=$CLUSTER_NAME
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
# Requeued jobs wait for the credential to expire before restarting (default 120 s).
AuthInfo=cred_expire=10
CredType=cred/munge
StateSaveLocation=$CTLD_SPOOL
SlurmdSpoolDir=$SLURMD_SPOOL/%n
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd-%n.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
# Pending jobs whose BeginTime passed (e.g. requeued ones) start on the next periodic pass.
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
PreemptType=preempt/none
PreemptMode=OFF
ReturnToService=2
JobRequeue=1
KillWait=5
InactiveLimit=0
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=60
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobCompType=jobcomp/none
NodeName=n[1-2] NodeHostname=$HOST NodeAddr=127.0.0.1 Port=17001-17002 CPUs=2 RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
EOF

# slurmdbd refuses a config readable by others
write_if_changed "$CONF_DIR/slurmdbd.conf" 600 <<EOF
# Generated by tune-launch cluster/testcluster/up.sh -- do not edit, re-run up.sh.
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
PidFile=$RUN_DIR/slurmdbd.pid
LogFile=$LOG_DIR/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=$DB_NAME
StorageUser=$DB_USER
StoragePass=$DB_PASS
EOF

CONF_SHA=$(cat "$CONF_DIR/slurm.conf" "$CONF_DIR/slurmdbd.conf" | sha256sum | cut -d' ' -f1)
OLD_SHA=$(cat "$STATE_DIR/config.sha256" 2>/dev/null || true)

# ---------------------------------------------------------------- restart on config change

slurm_parts=(slurmdbd slurmctld)
for n in "${NODES[@]}"; do slurm_parts+=("slurmd-$n"); done

any_ours=0
for c in "${slurm_parts[@]}"; do ours "$c" && any_ours=1; done
if ((any_ours)) && [[ $CONF_SHA != "$OLD_SHA" ]]; then
    log "configuration changed since the daemons were started: restarting SLURM daemons"
    for ((i = ${#slurm_parts[@]} - 1; i >= 0; i--)); do stop_ours "${slurm_parts[i]}"; done
fi

# a running daemon that is not ours, with a different config, is not something we may restart
foreign_pid() { # NAME PIDFILE: pid of a running instance not started by us
    local name=$1 file=$2 comm pid
    comm=$(comm_of "$name")
    ours "$name" && return 1
    pid=$(pidfile_pid "$file" "$comm") && {
        echo "$pid"
        return 0
    }
    return 1
}

# ---------------------------------------------------------------- munge

munge_ok() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

if munge_ok; then
    ours munged || log "munged already running (not started by up.sh), reusing it"
else
    rm -f "$STATE_DIR/munged.pid"
    mkdir -p /run/munge
    chown munge:munge /run/munge
    chmod 755 /run/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating munge key"
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
        chown munge:munge /etc/munge/munge.key
        chmod 400 /etc/munge/munge.key
    fi
    runuser -u munge -- /usr/sbin/munged --force </dev/null >>"$LOG_DIR/munged.stderr" 2>&1 ||
        fail "munged failed to start"
    pid=$(wait_pidfile /run/munge/munged.pid munged 10) || fail "munged did not write its pid file"
    record munged "$pid"
    wait_for 10 munge munge_ok || fail "munge does not work"
fi

# ---------------------------------------------------------------- mariadb

db_ok() { mariadb-admin --socket="$MYSQL_SOCK" ping >/dev/null 2>&1; }

if db_ok; then
    ours mariadb || log "mariadb already running (not started by up.sh), reusing it"
else
    rm -f "$STATE_DIR/mariadb.pid"
    mkdir -p /run/mysqld
    chown mysql:mysql /run/mysqld
    if [[ ! -d /var/lib/mysql/mysql ]]; then
        log "initialising mariadb data directory"
        mariadb-install-db --user=mysql --datadir=/var/lib/mysql >>"$LOG_DIR/mariadb.log" 2>&1 ||
            fail "mariadb-install-db failed"
    fi
    setsid /usr/sbin/mariadbd --user=mysql --skip-networking --socket="$MYSQL_SOCK" \
        --pid-file=/run/mysqld/mysqld.pid --log-error="$LOG_DIR/mariadb.log" \
        </dev/null >>"$LOG_DIR/mariadb.log" 2>&1 &
    disown || true
    wait_for 60 mariadb db_ok || fail "mariadb did not start"
    pid=$(wait_pidfile /run/mysqld/mysqld.pid mariadbd 10) || fail "mariadb did not write its pid file"
    record mariadb "$pid"
fi

mariadb --socket="$MYSQL_SOCK" -uroot <<EOF || fail "could not create the accounting database"
CREATE DATABASE IF NOT EXISTS $DB_NAME;
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
ALTER USER '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL PRIVILEGES ON $DB_NAME.* TO '$DB_USER'@'localhost';
FLUSH PRIVILEGES;
EOF

# ---------------------------------------------------------------- slurm daemons

check_foreign() { # NAME PIDFILE -> 0 if an instance not started by us runs (reused)
    local pid
    if pid=$(foreign_pid "$1" "$2"); then
        # we cannot know which config it runs with, nor may we stop it: reuse it, loudly
        log "WARNING: $1 (pid $pid) runs but was not started by up.sh; reusing it as is"
        return 0
    fi
    return 1
}

dbd_ok() { sacctmgr -n -P show cluster format=cluster >/dev/null 2>&1; }

if ! ours slurmdbd && ! check_foreign slurmdbd "$RUN_DIR/slurmdbd.pid"; then
    slurmdbd </dev/null >>"$LOG_DIR/slurmdbd.stderr" 2>&1 || fail "slurmdbd failed to start"
    pid=$(wait_pidfile "$RUN_DIR/slurmdbd.pid" slurmdbd 15) || fail "slurmdbd did not start"
    record slurmdbd "$pid"
fi
wait_for 30 slurmdbd dbd_ok || fail "slurmdbd does not answer (sacctmgr show cluster)"
if ! sacctmgr -n -P show cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER_NAME"; then
    sacctmgr -i add cluster "$CLUSTER_NAME" >/dev/null || fail "sacctmgr add cluster failed"
    log "registered cluster $CLUSTER_NAME in slurmdbd"
fi

ctld_ok() { scontrol ping 2>/dev/null | grep -q 'is UP'; }

if ! ours slurmctld && ! check_foreign slurmctld "$RUN_DIR/slurmctld.pid"; then
    slurmctld </dev/null >>"$LOG_DIR/slurmctld.stderr" 2>&1 || fail "slurmctld failed to start"
    pid=$(wait_pidfile "$RUN_DIR/slurmctld.pid" slurmctld 15) || fail "slurmctld did not start"
    record slurmctld "$pid"
fi
wait_for 30 slurmctld ctld_ok || fail "slurmctld does not answer (scontrol ping)"

for n in "${NODES[@]}"; do
    if ! ours "slurmd-$n" && ! check_foreign "slurmd-$n" "$RUN_DIR/slurmd-$n.pid"; then
        slurmd -N "$n" </dev/null >>"$LOG_DIR/slurmd-$n.stderr" 2>&1 || fail "slurmd -N $n failed to start"
        pid=$(wait_pidfile "$RUN_DIR/slurmd-$n.pid" slurmd 15) || fail "slurmd -N $n did not start"
        record "slurmd-$n" "$pid"
    fi
done

echo "$CONF_SHA" >"$STATE_DIR/config.sha256"

# ---------------------------------------------------------------- wait for the nodes

# healthy: idle, or busy with jobs (a re-run while others use the cluster)
nodes_ready() {
    local out
    out=$(sinfo -h -N -p debug -o '%N %t' 2>/dev/null) || return 1
    local n state
    for n in "${NODES[@]}"; do
        state=$(awk -v n="$n" '$1 == n {print $2}' <<<"$out")
        case "$state" in
            idle | mix | alloc | comp) ;;
            *) return 1 ;;
        esac
    done
}

resumed=0
deadline=$(($(date +%s) + TIMEOUT))
until nodes_ready; do
    if ((!resumed)) && sinfo -h -N -p debug -o '%t' 2>/dev/null | grep -Eq 'drain|drng|down'; then
        # a node left drained/down by an earlier run: with our own slurmd answering, resume it
        sleep 3
        if ! nodes_ready; then
            log "resuming drained/down nodes: $(sinfo -h -N -p debug -o '%N=%t' | tr '\n' ' ')"
            scontrol update NodeName="n[1-2]" State=RESUME >/dev/null 2>&1 || true
            resumed=1
        fi
    fi
    if (($(date +%s) >= deadline)); then
        printf '\n[testcluster] sinfo:\n' >&2
        sinfo -N -l >&2 || true
        scontrol show node >&2 || true
        fail "nodes not idle after ${TIMEOUT}s"
    fi
    sleep 0.5
done

log "cluster up: $(sinfo -h -N -p debug -o '%N=%t' | tr '\n' ' ')"
