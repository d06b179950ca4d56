"""Exit codes of a run, one definition for the launchers, the worker, the SLURM job and the tests.

  0   finished (train_iters reached)
  2   the recipe or the command line is wrong (nothing was started; the message names the fix)
  3   the preflight ran and an item failed on the target machines (preflight.json names it)
  16  megatron's rerun state machine stopped on a reproducible NaN/Inf; the last good state is saved
  74  a checkpoint save failed for lack of space (disk full, quota, file-size limit): the previous
      checkpoint stays the latest; free space and run the same command again (EX_IOERR)
  75  stopped before train_iters (signal, exit interval or time budget) with a complete checkpoint:
      run the same command again to resume (EX_TEMPFAIL, what SLURM requeue logic keys on)
  124 a rank hung: no rank made progress within run.hang_timeout_s (runtime/hang_watch.py names the
      rank, node, step and phase); the processes were stopped, the latest complete checkpoint is
      unchanged: run the same command again to resume (124: what timeout(1) returns)
"""

EXIT_CONFIG = 2
EXIT_PREFLIGHT_FAILED = 3
EXIT_NONFINITE = 16
EXIT_DISK_FULL = 74
EXIT_STOPPED_EARLY = 75
EXIT_HUNG = 124

# A worker's reason for a distinct exit, written into the run directory (torchrun reports every
# failed worker as exit 1): "CODE\nmessage". Read by the launcher.
EXIT_REASON_FILE = "exit_reason.txt"
