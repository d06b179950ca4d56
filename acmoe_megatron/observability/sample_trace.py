"""Which training samples each step consumed (``run.trace_samples``): a per-rank record of the
split-level sample ids of every training micro-batch, and the reader that merges the ranks back
into the global order.

Why: a loss spike is investigated from the samples of the step that caused it, and a resume on
another number of data-parallel processes must continue the global sample sequence exactly (no
sample seen twice or skipped; docs/reliability.md). Megatron records only the consumed *count*
(``consumed_train_samples``); this records the ids. No library does this for our shard format, so
it is ours: one line per micro-batch, appended, cheap enough to leave on.

File ``RUN_DIR/sample_trace/rank{R:05d}.tsv``, one line per training micro-batch this rank read:
``step  slot  id,id,...  launch`` where ``step`` is megatron's 1-based iteration (the TensorBoard step)
and ``slot = k * dp_size + dp_rank`` for the rank's k-th micro-batch of the step: the micro-batch's
place in the step's global order (the loader deals a step's consecutive stream positions to the
replicas in that order, ``data/loader/``), so the merged sequence does not depend on the number
of replicas. ``-1`` marks a padding slot. Only the ranks that own a replica's input write (tensor-
and context-parallel rank 0, the model chunk that embeds tokens), so each micro-batch is recorded
once. ``launch`` is the time (ns) this process started recording. A resumed run appends to the
same files (on another process count, to other ranks' files too): a step that was run again after
a crash (its checkpoint never written) appears twice, and the reader keeps, per (step, slot), the
record of the latest launch, which is the one the saved model saw.
"""

from __future__ import annotations

import time
from pathlib import Path

TRACE_DIR = "sample_trace"


class SampleTrace:
    """Appends this rank's training micro-batches' sample ids to its trace file."""

    def __init__(self, run_dir: str | Path, rank: int, dp_rank: int, dp_size: int):
        self.path = Path(run_dir) / TRACE_DIR / f"rank{rank:05d}.tsv"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self._step, self._k = None, 0
        self.launch = time.time_ns()

    def record(self, step: int, sample_ids) -> None:
        """The next micro-batch of ``step`` on this rank held ``sample_ids`` (ints, -1 = padding)."""
        if step != self._step:
            self._step, self._k = step, 0
        slot = self._k * self.dp_size + self.dp_rank
        self._k += 1
        with self.path.open("a") as f:  # one short line; appended so a crash loses nothing recorded
            f.write(f"{step}\t{slot}\t{','.join(str(int(i)) for i in sample_ids)}\t{self.launch}\n")


def read_trace(run_dir: str | Path) -> dict[int, list[int]]:
    """{step: the step's sample ids in global order} over every rank's file of ``run_dir``; per
    (step, slot) the latest launch's record wins (a step run again after a crash)."""
    files = sorted((Path(run_dir) / TRACE_DIR).glob("rank*.tsv"))
    if not files:
        raise FileNotFoundError(f"{Path(run_dir) / TRACE_DIR} has no trace files: was the run made with "
                                "run.trace_samples=true?")
    slots: dict[tuple[int, int], tuple[int, list[int]]] = {}
    for file in files:
        for line in file.read_text().splitlines():
            step, slot, ids, launch = line.split("\t")
            key = int(step), int(slot)
            if key not in slots or int(launch) >= slots[key][0]:
                slots[key] = int(launch), [int(i) for i in ids.split(",")]
    steps: dict[int, list[int]] = {}
    for (step, slot) in sorted(slots):
        steps.setdefault(step, []).extend(slots[step, slot][1])
    return steps


class MegatronSampleTrace:
    """The trainer's adapter (runtime/forward_step.py): makes this rank's ``SampleTrace`` once megatron's
    parallel state exists, and records a training micro-batch only on the ranks that own a
    replica's input (tensor- and context-parallel rank 0, the model chunk that embeds tokens)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = run_dir
        self._trace: SampleTrace | None = None

    def __call__(self, model, sample_ids) -> None:
        import torch
        from megatron.core import parallel_state as ps
        from megatron.core.utils import get_attr_wrapped_model
        from megatron.training import get_args

        if sample_ids is None or not model.training:
            return
        if ps.get_tensor_model_parallel_rank() or ps.get_context_parallel_rank() \
                or not get_attr_wrapped_model(model, "pre_process"):
            return
        if self._trace is None:
            self._trace = SampleTrace(self.run_dir, torch.distributed.get_rank(), ps.get_data_parallel_rank(),
                                      ps.get_data_parallel_world_size())
        self._trace.record(get_args().curr_iteration + 1, sample_ids.tolist())
