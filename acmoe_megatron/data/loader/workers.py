"""``TokenBatches`` behind a multi-worker ``torch.utils.data.DataLoader``.

The loader itself is cheap (see ``benchmarks/results/data_throughput.md``), so workers are rarely
needed; they exist for pipelines that add expensive per-batch work. ``TokenBatchDataset`` opens
the split once in the parent process (forked workers inherit its open shards; positioned reads
share no file position) and gives each worker its ``TokenBatches.worker_view``: worker w yields the replica's micro-batches w, w + W, ... The
DataLoader returns worker outputs round-robin, i.e. in the original order, so the stream is the
same for every ``num_workers`` (0 included) and resumes from the same ``consumed_samples``.
"""

from __future__ import annotations

import os

import torch.multiprocessing as mp
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from acmoe_megatron.data.loader.batches import TokenBatches

__all__ = ["TokenBatchDataset", "make_dataloader"]


class TokenBatchDataset(IterableDataset):
    """An ``IterableDataset`` of one replica's micro-batches; arguments as for ``TokenBatches``."""

    def __init__(self, manifest_dir: str | os.PathLike, split: str, *args, **kwargs):
        if "num_workers" in kwargs or "worker_id" in kwargs:
            raise TypeError(
                "TokenBatchDataset takes the worker split from the DataLoader; do not pass num_workers/worker_id"
            )
        self.batches = TokenBatches(manifest_dir, split, *args, **kwargs)

    def __iter__(self):
        info = get_worker_info()
        if info is None:
            return self.batches.worker_view(0, 1)
        return self.batches.worker_view(info.id, info.num_workers)


def make_dataloader(
    manifest_dir: str | os.PathLike, split: str, *args, num_workers: int = 0, **kwargs
) -> DataLoader:
    """A DataLoader yielding the same micro-batches as ``TokenBatches(...)``, with ``num_workers``."""
    dataset = TokenBatchDataset(manifest_dir, split, *args, **kwargs)
    return DataLoader(
        dataset,
        batch_size=None,  # items already are micro-batches
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        # fork: the workers inherit the parent's reader (manifest, open shards) instead of opening their own
        multiprocessing_context="fork" if num_workers > 0 and "fork" in mp.get_all_start_methods() else None,
    )
