#!/usr/bin/env bash
# Stop the single-node Slurm that start-slurm.sh started: cancel its jobs, then stop slurmd,
# slurmctld and (only if start-slurm.sh started it) munged, each by the pid in its pid file —
# never by process name, which could hit another user's daemons. Safe to run when nothing runs.
set -euo pipefail

STATE_DIR="${PYHF_DIST_SLURM_DIR:-/tmp/pyhf-dist-slurm}"
CONF="$STATE_DIR/slurm.conf"
SYSTEM_CONF=/etc/slurm/slurm.conf

log() { echo "stop-slurm: $*"; }

stop_pidfile() {  # stop_pidfile NAME PIDFILE: TERM, wait up to 10 s, then KILL
    local name="$1" pidfile="$2" pid
    [[ -s "$pidfile" ]] || return 0
    pid="$(cat "$pidfile")"
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "$name (pid $pid) ignored SIGTERM; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        log "stopped $name (pid $pid)"
    fi
    rm -f "$pidfile"
}

if [[ ! -d "$STATE_DIR" ]]; then
    log "nothing to stop ($STATE_DIR does not exist)"
    exit 0
fi

# Cancel jobs first: slurmd does not take running job steps down with it.
if [[ -s "$STATE_DIR/slurmctld.pid" ]] && kill -0 "$(cat "$STATE_DIR/slurmctld.pid")" 2>/dev/null; then
    jobs="$(SLURM_CONF="$CONF" timeout 10 squeue -h -o %i 2>/dev/null || true)"
    if [[ -n "$jobs" ]]; then
        log "cancelling jobs: $(echo $jobs)"
        # shellcheck disable=SC2086
        SLURM_CONF="$CONF" timeout 10 scancel $jobs 2>/dev/null || true
        for _ in $(seq 50); do
            [[ -z "$(SLURM_CONF="$CONF" timeout 10 squeue -h -t R,CG,PD -o %i 2>/dev/null || true)" ]] && break
            sleep 0.2
        done
    fi
fi

stop_pidfile slurmd "$STATE_DIR/slurmd.pid"
stop_pidfile slurmctld "$STATE_DIR/slurmctld.pid"
stop_pidfile munged "$STATE_DIR/munged.pid"

# Unlink our config so that `sinfo` fails at once instead of waiting for a controller that is gone.
if [[ -L "$SYSTEM_CONF" && "$(readlink "$SYSTEM_CONF")" == "$CONF" ]]; then
    rm -f "$SYSTEM_CONF"
fi
log "done (logs kept in $STATE_DIR/log)"
