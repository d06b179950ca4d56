#!/bin/bash
# The per-node task of slurm/pretrain.sbatch (LAUNCHER=torchrun): runs "$@" (torchrun ...) and
# passes the preemption signal to the training workers, not to torchrun.
#
# Why: SLURM delivers `--signal=USR1@T` (and `scancel --signal=USR1`) to the processes of every job
# step. torchrun does not handle SIGUSR1, so its default action would kill it and with it the job
# step, before Megatron could save. Here torchrun starts with $EXIT_SIGNAL ignored (an ignored
# signal stays ignored across fork/exec; Megatron's --exit-signal-handler installs its own handler
# in each worker), and this script forwards the signal to torchrun's children, the workers, which
# finish the current iteration, save a checkpoint and exit 0. Whether SLURM's process tracking
# already reached the workers (proctrack/cgroup, linuxproc) or not (proctrack/pgid: torchrun starts
# workers in new sessions) does not matter: a second delivery only sets the same flag.
# SIGTERM/SIGINT (scancel, time limit) go to torchrun, which stops its workers.
# Beside torchrun runs this node's hang watch (runtime/hang_watch.py) when ACMOE_HANG_WATCH_CONFIG is
# set: it SIGKILLs the node's workers when the run stalls (exit 124 in $RUN_DIR/exit_reason.txt).
set -u
SIG=${EXIT_SIGNAL:-USR1}
SIG=${SIG#SIG}
NODE=${SLURMD_NODENAME:-$(hostname)}

children_of() {  # direct children of pid $1
    if command -v pgrep >/dev/null 2>&1; then
        pgrep -P "$1"
        return 0
    fi
    local status ppid
    for status in /proc/[0-9]*/status; do
        ppid=$(sed -n 's/^PPid:[[:space:]]*//p' "$status" 2>/dev/null)
        if [ "$ppid" = "$1" ]; then
            status=${status#/proc/}
            echo "${status%/status}"
        fi
    done
}

forward_exit_signal() {
    local workers
    workers=$(children_of "$child" | tr '\n' ' ')
    echo "[acmoe-node $NODE] SIG$SIG received: forwarding to the workers (pids ${workers:-none}) of torchrun $child"
    # shellcheck disable=SC2086
    [ -n "$workers" ] && kill -s "$SIG" $workers 2>/dev/null
}

stop() {
    echo "[acmoe-node $NODE] SIG$1 received: stopping torchrun $child"
    kill -s "$1" "$child" 2>/dev/null
}

# torchrun stops its workers on SIGTERM/SIGINT/SIGHUP/SIGQUIT (30 s, then SIGKILL); when one of
# these is the exit signal (EXIT_SIGNAL=TERM for PreemptMode=REQUEUE clusters), take it off that list
# (torch >= 2.6 reads TORCHELASTIC_SIGNALS_TO_HANDLE) so that it, too, goes to the workers instead.
handled=
for s in TERM INT HUP QUIT; do [ "$s" = "$SIG" ] || handled="${handled:+$handled,}SIG$s"; done
export TORCHELASTIC_SIGNALS_TO_HANDLE=$handled

trap '' "$SIG"        # inherited by torchrun (and its workers until Megatron installs its handler)
"$@" &
child=$!
for s in TERM INT; do
    [ "$s" = "$SIG" ] || trap "stop $s" "$s"
done
trap forward_exit_signal "$SIG"
echo "[acmoe-node $NODE] torchrun started (pid $child); SIG$SIG goes to its workers"
# the hang watch of this node (runtime/hang_watch.py; pretrain.sbatch sets these for its launchers)
if [ -n "${ACMOE_HANG_WATCH_CONFIG:-}" ]; then
    "$ACMOE_HANG_WATCH_PY" -m acmoe_megatron.runtime.hang_watch --config "$ACMOE_HANG_WATCH_CONFIG" \
        --instance "${ACMOE_RUN_INSTANCE:-}" --while-pid "$child" &
fi

# `wait` returns early whenever a trapped signal arrives; keep waiting until torchrun is gone.
while kill -0 "$child" 2>/dev/null; do
    wait "$child"
done
wait "$child"
exit $?
