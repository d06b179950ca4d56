#!/bin/bash
# The per-process task of slurm/pretrain.sbatch (LAUNCHER=srun, one task per GPU): torch.distributed
# and Megatron read RANK/WORLD_SIZE/LOCAL_RANK (+ MASTER_ADDR/MASTER_PORT, exported by the batch
# script); SLURM gives SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID. The worker replaces this shell
# (exec), so SLURM's signals (the exit signal, SIGTERM) reach it directly; it starts with the exit
# signal ignored (kept across exec) so that a signal during start-up does not kill it.
set -eu
export RANK=$SLURM_PROCID
export WORLD_SIZE=$SLURM_NTASKS
export LOCAL_RANK=$SLURM_LOCALID
# until Megatron installs its --exit-signal-handler, an early exit signal must not kill the worker
trap '' "${EXIT_SIGNAL:-USR1}"
# the node's first task starts the node's hang watch (runtime/hang_watch.py), which watches while
# this task (the worker, after exec: same pid) runs
if [ -n "${ACMOE_HANG_WATCH_CONFIG:-}" ] && [ "$SLURM_LOCALID" = 0 ]; then
    "$ACMOE_HANG_WATCH_PY" -m acmoe_megatron.runtime.hang_watch --config "$ACMOE_HANG_WATCH_CONFIG" \
        --instance "${ACMOE_RUN_INSTANCE:-}" --while-pid $$ &
fi
exec "$@"
