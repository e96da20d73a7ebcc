#!/usr/bin/env bash
# A one-host SLURM cluster for the tests (tests/slurm_cases.py) and for trying scripts/slurm.sh:
# slurmctld and slurmd on 127.0.0.1, the node named after this host with all its CPUs.
#
#   sudo scripts/slurm_local.sh start    # installs slurm-wlm and munge (Debian) if missing
#   export SLURM_CONF=/tmp/ptunifier-slurm/slurm.conf
#   sudo scripts/slurm_local.sh stop     # stops only the daemons that `start` started
#
# Everything (slurm.conf, state, logs, pid files) lives in $SLURM_LOCAL_DIR (/tmp/ptunifier-slurm);
# nothing under /etc is written. Two settings shorten a requeued job's wait for the tests:
# CRED_EXPIRE (default 10) is AuthInfo=cred_expire, how long it waits before it may start again
# (SLURM's default: 120 s), and the schedulers look at the queue every 5 s (defaults: 60 s, 30 s).
set -euo pipefail
DIR=${SLURM_LOCAL_DIR:-/tmp/ptunifier-slurm}
CRED_EXPIRE=${CRED_EXPIRE:-10}
export SLURM_CONF=$DIR/slurm.conf

install() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && return
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge
}

write_conf() {
    mkdir -p "$DIR/ctld" "$DIR/d" "$DIR/log"
    local node; node=$(hostname -s)
    cat > "$SLURM_CONF" <<EOF
ClusterName=ptunifier-local
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=$CRED_EXPIRE
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/d
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
SchedulerParameters=sched_interval=5,bf_interval=5
NodeName=$node NodeAddr=127.0.0.1 CPUs=$(nproc) State=UNKNOWN
PartitionName=local Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
    install
    getent hosts "$(hostname -s)" >/dev/null || {  # scripts/slurm.sh meets on the node's name
        echo "the host name $(hostname -s) does not resolve (add it to /etc/hosts)" >&2; exit 1; }
    write_conf
    if ! pgrep -x munged >/dev/null; then  # a munged already running is the host's: use it, leave it
        mkdir -p /run/munge && chown munge:munge /run/munge
        runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/ptunifier.pid
        cp /run/munge/ptunifier.pid "$DIR/munged.pid"
    fi
    alive "$DIR/slurmctld.pid" || /usr/sbin/slurmctld -f "$SLURM_CONF"
    alive "$DIR/slurmd.pid" || /usr/sbin/slurmd -f "$SLURM_CONF"
    for _ in $(seq 60); do  # the node is idle: jobs can start
        sinfo -h -o %t 2>/dev/null | grep -qx idle && { echo "SLURM up: export SLURM_CONF=$SLURM_CONF"; return; }
        sleep 1
    done
    echo "the local SLURM node did not become idle; see $DIR/log" >&2
    exit 1
}

stop() {
    for daemon in slurmd slurmctld munged; do
        local pidfile=$DIR/$daemon.pid
        if alive "$pidfile"; then
            local pid; pid=$(cat "$pidfile")
            kill "$pid"
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        fi
        rm -f "$pidfile"
    done
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
