"""A process of a run never outlives the process that started it.

torchrun starts its workers in new sessions (``start_new_session=True``), so killing the launcher's
process group (``kill -9 -PGID``, a job step torn down by its own process group, an operator's
``pkill`` of the launcher) leaves the workers running, orphaned: they finish their step, hold
their GPUs, and write into the checkpoint directory while the next start of the same run writes
there too (the cause of the lost ``iter_0000006`` in issue 37: a worker killed "mid-save" finished
that save a minute later, under the resumed runs). ``die_with_parent()`` asks Linux to SIGKILL this
process when its parent dies (``prctl(PR_SET_PDEATHSIG)``; kept across ``exec``): the trainer and
every worker call it first thing, and the launchers start torchrun through ``python -m
acmoe_megatron.runtime.lifetime torchrun ...`` (set, then ``exec``: no ``preexec_fn`` in a
launcher that has threads), so a killed launcher takes torchrun, and torchrun its workers, with it.
The processes a worker starts with multiprocessing's "spawn" (megatron's persistent asynchronous
checkpoint writer, ~780 MB each) import the worker's main module as ``__mp_main__`` first thing,
and ``runtime/train.py`` calls it there too (the death signal is not inherited; before, a killed
worker left that process running, orphaned). The window in which the worker dies before its child
has imported the module is not covered.
A no-op where prctl is not available (not Linux).

Why our own: neither torchrun nor megatron sets it; torch's elastic agent only stops its workers
when it gets to run its own shutdown, which SIGKILL does not allow.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent() -> bool:
    """SIGKILL this process when its parent exits; True where that is set (Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    return True


def wrapped(cmd: list[str]) -> list[str]:
    """``cmd`` started through this module: it runs with ``die_with_parent`` set."""
    return [sys.executable, "-m", "acmoe_megatron.runtime.lifetime", *cmd]


def main(argv: list[str] | None = None) -> None:
    """``python -m acmoe_megatron.runtime.lifetime CMD ARGS...``: die with the parent, then exec CMD."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        raise SystemExit("usage: python -m acmoe_megatron.runtime.lifetime CMD [ARGS...]")
    die_with_parent()
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main()
