#!/usr/bin/env bash
# Start a real single-node Slurm (munged + slurmctld + slurmd) on this machine, for the `slurm`
# tests and for trying `executor="slurm"` without a cluster. Needs root (apt and the daemons).
#
#   bash executors/slurm/start-slurm.sh        # install if needed, configure, start, wait for idle
#   bash executors/slurm/stop-slurm.sh         # stop what this script started
#
# Idempotent: when the daemons it started are still running and the node answers, it only reports.
# Everything it writes (config, state, spool, pid files, logs) is under $PYHF_DIST_SLURM_DIR
# (default /tmp/pyhf-dist-slurm); the config is also linked at /etc/slurm/slurm.conf so that
# sinfo/sbatch/squeue find it without SLURM_CONF, unless a slurm.conf of someone else is there.
set -euo pipefail

STATE_DIR="${PYHF_DIST_SLURM_DIR:-/tmp/pyhf-dist-slurm}"
CONF="$STATE_DIR/slurm.conf"
SYSTEM_CONF=/etc/slurm/slurm.conf
MARKER="# written by pyhf-dist executors/slurm/start-slurm.sh"
NODE="$(hostname -s)"
WAIT_SECONDS="${PYHF_DIST_SLURM_WAIT:-60}"

log() { echo "start-slurm: $*"; }
die() { echo "start-slurm: error: $*" >&2; exit 1; }

alive() {  # alive PIDFILE: the process named in PIDFILE is running
    [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

node_state() {
    SLURM_CONF="$CONF" timeout 10 sinfo -h -N -n "$NODE" -o %t 2>/dev/null | head -n 1 || true
}

[[ "$(id -u)" == 0 ]] || die "must run as root (it installs packages with apt and starts the Slurm daemons)"

# --- install ---------------------------------------------------------------------------------
# apt does not start services on CI machines (policy-rc.d) and there is no systemd: we start the
# daemons ourselves below. --no-install-recommends keeps it to 8 packages instead of 43.
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
    || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
    log "installing slurmctld slurmd slurm-client munge (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi

mkdir -p "$STATE_DIR"/{state,spool,log}
chmod 755 "$STATE_DIR"

# --- already up? -----------------------------------------------------------------------------
if alive "$STATE_DIR/slurmctld.pid" && alive "$STATE_DIR/slurmd.pid"; then
    state="$(node_state)"
    if [[ "$state" == idle* || "$state" == mix* || "$state" == alloc* ]]; then
        log "already running: node $NODE is $state (config $CONF, logs in $STATE_DIR/log)"
        exit 0
    fi
fi

# --- munge -----------------------------------------------------------------------------------
# Slurm authenticates every message with munge. Reuse a munged that already answers (one a
# service manager started); otherwise start one as the munge user and remember its pid, so that
# stop-slurm.sh stops only what we started.
if ! (munge -n | unmunge) >/dev/null 2>&1; then
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile=/etc/munge/munge.key
        else
            dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
        fi
        chown munge:munge /etc/munge/munge.key
        chmod 400 /etc/munge/munge.key
    fi
    install -d -o munge -g munge -m 755 /run/munge
    install -d -o munge -g munge -m 700 /var/log/munge /var/lib/munge
    rm -f /run/munge/munged.pid
    runuser -u munge -- munged --pid-file=/run/munge/munged.pid
    for _ in $(seq 50); do
        (munge -n | unmunge) >/dev/null 2>&1 && break
        sleep 0.1
    done
    (munge -n | unmunge) >/dev/null 2>&1 || die "munged did not start: see /var/log/munge/munged.log"
    cp /run/munge/munged.pid "$STATE_DIR/munged.pid"
    log "munged started (pid $(cat "$STATE_DIR/munged.pid"))"
fi

# --- slurm.conf ------------------------------------------------------------------------------
cpus="$(nproc)"
mem_mib="$(awk '/^MemTotal:/ { printf "%d", $2 / 1024 * 0.9 }' /proc/meminfo)"
cat >"$CONF" <<EOF
$MARKER
ClusterName=pyhfdist
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
# No cgroups in containers and CI machines: track job processes by their parent pid.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SwitchType=switch/none
# Share the node between jobs by CPU and memory; without DefMemPerCPU one job takes all memory.
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=1024
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
# Cancelled or ended jobs leave squeue quickly: tests check that no job of theirs is left.
MinJobAge=10
KillWait=5
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.log
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mib State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF

# Clients (sinfo, sbatch, squeue, dask-jobqueue) read /etc/slurm/slurm.conf unless SLURM_CONF is
# set. Link ours there, but never replace a configuration this script did not write.
mkdir -p "$(dirname "$SYSTEM_CONF")"
if [[ -L "$SYSTEM_CONF" || ! -e "$SYSTEM_CONF" ]] || grep -qF "$MARKER" "$SYSTEM_CONF"; then
    ln -sfn "$CONF" "$SYSTEM_CONF"
else
    log "warning: $SYSTEM_CONF belongs to another Slurm; use SLURM_CONF=$CONF with the client commands"
fi

# --- daemons ---------------------------------------------------------------------------------
if ! alive "$STATE_DIR/slurmctld.pid"; then
    # -c: start from an empty job list, so jobs of an earlier run do not come back.
    slurmctld -c -f "$CONF"
fi
if ! alive "$STATE_DIR/slurmd.pid"; then
    slurmd -f "$CONF" -N "$NODE"
fi

# --- wait for the node -----------------------------------------------------------------------
deadline=$((SECONDS + WAIT_SECONDS))
state=""
while ((SECONDS < deadline)); do
    state="$(node_state)"
    case "$state" in
    idle* | mix* | alloc*) break ;;
    down* | drain*)
        # A node left down by an earlier run: bring it back.
        SLURM_CONF="$CONF" scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
done
if [[ "$state" != idle* && "$state" != mix* && "$state" != alloc* ]]; then
    tail -n 20 "$STATE_DIR/log/slurmctld.log" "$STATE_DIR/log/slurmd.log" >&2 || true
    die "node $NODE is not idle after ${WAIT_SECONDS}s (state '${state:-no answer}'); logs in $STATE_DIR/log"
fi
log "Slurm is up: node $NODE ($cpus CPUs, $mem_mib MiB) is $state"
log "config $CONF; logs $STATE_DIR/log/slurmctld.log, $STATE_DIR/log/slurmd.log; stop with executors/slurm/stop-slurm.sh"
