"""Deterministic, exactly resumable micro-batches for Megatron from a token-shard directory.

``TokenBatches`` reads one split of a directory written by ``prepare`` and yields Megatron GPT
micro-batches: ``tokens``, ``labels`` (LongTensor [b, s]), ``loss_mask`` (float [b, s]) and
``position_ids`` (LongTensor [b, s]), and ``sample_ids`` (LongTensor [b]: each row's split-level
sample index, -1 for a padding row; what ``run.trace_samples`` records). Use it with
``--dataloader-type external``.

How samples are assigned (sample-level, not shard-level, splitting):
- The split's N samples form an infinite stream of epochs. Epoch e is a permutation of 0..N-1,
  seeded by (seed, e) (identity when ``shuffle=False``): ``sample_order.SampleOrder``, a full
  permutation for splits up to ``shuffle_window`` samples, shards permuted then windows of
  ``shuffle_window`` positions permuted for larger ones. Global stream position p is sample
  ``perm_{p // N}[p % N]``.
- Positions from ``consumed_samples`` on are dealt to the data-parallel replicas the way
  Megatron's own pretraining sampler does: each global step of ``micro_batch_size * dp_size``
  consecutive positions is cut into ``dp_size`` contiguous slices, and replica r's micro-batch k
  holds positions ``consumed_samples + k * micro_batch_size * dp_size + r * micro_batch_size + i``
  for i < b. So replica r of a DP=n run sees exactly the samples of micro-batch r of a DP=1 run
  with n micro-batches per step (what the parallel-parity tests rely on: the AC statistics are
  per micro-batch). After k micro-batches on every replica the global consumed count is
  ``consumed_samples + k * micro_batch_size * dp_size``, which matches Megatron's
  ``consumed_train_samples``; resuming with that number continues exactly where the run
  stopped. Every global step consumes a contiguous range of stream positions, so the
  composition of each global batch does not depend on dp_size.
- Dataloader workers (``num_workers``/``worker_id``, or ``workers.make_dataloader``) split
  a replica's micro-batches round-robin: worker w yields micro-batches w, w + W, w + 2W, ...
  A ``torch.utils.data.DataLoader`` returns worker outputs in that same round-robin order, so the
  replica's stream is identical for every worker count (and resume is unchanged).
- This works with any number of shards (even fewer shards than replicas × workers: nothing is
  split by shard, so no replica or worker can be left without data and hang) and never reads the
  ``RANK``/``WORLD_SIZE`` environment variables: the caller passes ``dp_rank``/``dp_size`` from
  ``megatron.core.parallel_state.get_data_parallel_rank()/get_data_parallel_world_size()``, so
  all TP/PP/CP ranks of one replica get the same batches. A split with fewer samples than one
  global step (``dp_size * micro_batch_size``) is refused.
- ``infinite=False`` gives one pass over the stream positions ``[consumed_samples, N)`` of
  epoch 0. The final micro-batches are padded with fully loss-masked dummy samples so every
  replica yields the same number of full-shape micro-batches; the real samples of the pass are
  covered exactly once across replicas, identically for every DP size and worker count. For
  Megatron's periodic evaluation (``eval_iters`` batches per round), use ``shuffle=False,
  infinite=True`` instead: the same file-order stream, repeated.

Samples are read on demand (``shards/store.py``, ``ShardSamples``: one positioned read per sample at the
offset of the shard's index), so memory per process is O(shards + shuffle window), not O(corpus);
every replica reads only its own samples. Every read checks the sample's header and that each
token id is below the vocabulary size. A micro-batch is b reads plus two int64 conversions (see
``benchmarks/data_throughput.py``).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator

import numpy as np
import torch

from acmoe_megatron.core.errors import ShardError
from acmoe_megatron.data.loader.sample_order import DEFAULT_WINDOW, SampleOrder
from acmoe_megatron.data.shards.manifest import check_manifest_matches
from acmoe_megatron.data.shards.store import ShardSamples, load_split_samples

__all__ = ["ShardError", "TokenBatches", "load_split_samples"]


class TokenBatches(Iterator[dict[str, torch.Tensor]]):
    """Iterator of this data-parallel replica's micro-batches (see the module docstring).

    Args:
        manifest_dir: directory written by ``prepare``.
        split: "train", "valid" or "test".
        micro_batch_size: samples per micro-batch (b).
        dp_rank, dp_size: this replica's data-parallel rank and the data-parallel world size.
        seed: seed of the per-epoch permutations.
        consumed_samples: global samples already consumed by all replicas together (Megatron's
            ``consumed_train_samples``); iteration resumes right after them.
        shuffle: permute samples each epoch (False: file order).
        infinite: cycle through epochs forever (False: one pass, see the module docstring).
        verify_checksums: check each shard's sha256 against the manifest when it is first read.
        shuffle_window: samples per shuffle window of a split larger than it (None: the whole
            split, one full permutation: O(samples) memory); see ``sample_order``.
        cache_dir: where a URL or ``pipe:`` ``manifest_dir``'s shards are cached (``shards/remote.py``).
        seq_length, vocab_size, tokenizer_hash: if given, must match the manifest
            (``manifest.check_manifest_matches``).
        num_workers, worker_id: dataloader-worker split of this replica's micro-batches; the
            default (1, 0) yields all of them.
    """

    def __init__(
        self,
        manifest_dir: str | os.PathLike,
        split: str,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        consumed_samples: int = 0,
        shuffle: bool = True,
        infinite: bool = True,
        *,
        verify_checksums: bool = True,
        seq_length: int | None = None,
        tokenizer_hash: str | None = None,
        vocab_size: int | None = None,
        num_workers: int = 1,
        worker_id: int = 0,
        shuffle_window: int | None = DEFAULT_WINDOW,
        cache_dir: str | os.PathLike | None = None,
    ):
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"need 0 <= dp_rank < dp_size, got dp_rank={dp_rank}, dp_size={dp_size}")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")
        _check_worker(worker_id, num_workers)
        self._store = ShardSamples(manifest_dir, split, verify_checksums, cache_dir=cache_dir)
        self.manifest = self._store.manifest
        check_manifest_matches(
            self.manifest,
            seq_length=seq_length,
            vocab_size=vocab_size,
            tokenizer_hash=tokenizer_hash,
            where=os.fspath(manifest_dir),
        )
        self.split = split
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed, self.shuffle, self.infinite = seed, shuffle, infinite
        self.num_samples = len(self._store)
        self._order = SampleOrder(self._store.shard_sizes, seed, shuffle, shuffle_window)
        # keep a window's shards (and the next window's first) open, and fetched when remote: a window
        # reads from all of them at random; this costs 8 bytes of index per sample of the window
        per_shard = max(1, int(np.median(self._store.shard_sizes)))
        window_shards = -(-self._order.window // per_shard) + 2
        self._store.max_open = min(window_shards, 1024)  # file descriptors: below the usual soft limit
        if self._store.remote is not None:
            self._store.remote.max_shards = window_shards
        if self.num_samples < self.samples_per_step:
            raise ValueError(
                f"split {split!r} of {manifest_dir} has {self.num_samples} samples, fewer than one "
                f"global step of dp_size {dp_size} x micro_batch_size {micro_batch_size} = "
                f"{self.samples_per_step}; prepare more data for it (a larger source, --max-bytes or "
                "split fraction) or use a smaller micro-batch size"
            )
        if not infinite and consumed_samples > self.num_samples:
            raise ValueError(
                f"consumed_samples={consumed_samples} is past the end of the single pass over "
                f"{self.num_samples} samples of split {split!r} (infinite=False)"
            )
        self.start_samples = consumed_samples
        self._split_info = self.manifest.splits[split]
        self._eod = int(self.manifest.tokenizer["eod"])
        # Real tokens of the split's last sample (the only one that can be EOD-padded).
        self._last_length = self._split_info.sample_length(self.num_samples - 1, self.manifest.sample_length)
        self._position_row = torch.arange(self.manifest.seq_length, dtype=torch.long)
        # Templates cloned into every batch (a fresh tensor each time: callers may modify them).
        self._positions = self._position_row.repeat(micro_batch_size, 1)
        self._full_mask = torch.ones(micro_batch_size, self.manifest.seq_length, dtype=torch.float32)
        self.num_workers, self.worker_id = num_workers, worker_id
        self._next_batch = worker_id

    def worker_view(self, worker_id: int, num_workers: int) -> TokenBatches:
        """A copy that yields only dataloader worker ``worker_id``'s micro-batches (shares the samples)."""
        _check_worker(worker_id, num_workers)
        view = copy.copy(self)
        view._order = SampleOrder(self._store.shard_sizes, self.seed, self.shuffle, self._order.window)
        view.num_workers, view.worker_id = num_workers, worker_id
        view._next_batch = worker_id
        return view

    # -- sample assignment -------------------------------------------------------------------

    @property
    def samples_per_step(self) -> int:
        """Global samples consumed when every replica takes one micro-batch."""
        return self.micro_batch_size * self.dp_size

    @property
    def consumed_samples(self) -> int:
        """Global consumed count after the micro-batches this iterator has yielded so far.

        Only defined for the whole replica stream (``num_workers == 1``); with dataloader
        workers, use Megatron's ``consumed_train_samples``.
        """
        if self.num_workers != 1:
            raise TypeError(
                "consumed_samples of a single dataloader worker's stream is undefined; use the trainer's count"
            )
        return self.start_samples + self._next_batch * self.samples_per_step

    @property
    def next_batch_index(self) -> int:
        """Replica-level index of the micro-batch the next ``next()`` returns (see ``batch``)."""
        return self._next_batch

    def __len__(self) -> int:
        """Number of micro-batches of this replica's finite pass, all workers together (``infinite=False``)."""
        if self.infinite:
            raise TypeError("an infinite TokenBatches has no length")
        remaining = self.num_samples - self.start_samples
        return -(-remaining // self.samples_per_step)

    def _ids(self, batch_index: int) -> np.ndarray:
        """Sample indices of micro-batch ``batch_index`` as an int64 array; -1 marks padding."""
        return self._ids_and_flags(batch_index)[0]

    def _ids_and_flags(self, batch_index: int) -> tuple[np.ndarray, bool, bool]:
        """(sample indices, any padding slot?, holds the split's last sample?): ``batch``'s hot path."""
        b, n = self.micro_batch_size, self.num_samples
        first = self.start_samples + batch_index * self.samples_per_step + self.dp_rank * b
        epoch, offset = divmod(first, n)
        if offset + b <= n:  # the common case: one contiguous slice of one epoch's order
            if not self.infinite and epoch > 0:
                return np.full(b, -1, dtype=np.int64), True, False
            ids = self._order.ids(epoch, np.arange(offset, offset + b))
            return ids, False, bool((ids == n - 1).any())
        head = self._order.ids(epoch, np.arange(offset, n))
        if self.infinite:
            ids = np.concatenate([head, self._order.ids(epoch + 1, np.arange(b - len(head)))])
            return ids, False, bool((ids == n - 1).any())
        if epoch > 0:
            head = np.full(len(head), -1, dtype=np.int64)
        ids = np.concatenate([head, np.full(b - len(head), -1, dtype=np.int64)])
        return ids, True, bool((ids == n - 1).any())

    def sample_ids(self, batch_index: int) -> list[int | None]:
        """Split-level sample indices of this replica's micro-batch ``batch_index``.

        ``None`` marks a padding slot (only at the end of a finite pass).
        """
        return [None if i < 0 else i for i in self._ids(batch_index).tolist()]

    # -- batches -----------------------------------------------------------------------------

    def batch(self, batch_index: int) -> dict[str, torch.Tensor]:
        """Build micro-batch ``batch_index`` of this replica (does not advance the iterator)."""
        ids, any_padding, has_last = self._ids_and_flags(batch_index)
        s = self.manifest.seq_length
        if any_padding:
            padding = ids < 0
            block = np.full((len(ids), s + 1), self._eod, dtype=self._store.dtype)
            block[~padding] = self._store.read(ids[~padding])
        else:
            block = self._store.read(ids)  # b positioned reads
        tokens = torch.from_numpy(block[:, :-1].astype(np.int64))
        labels = torch.from_numpy(block[:, 1:].astype(np.int64))
        # Only the split's last sample can be EOD-padded; padding slots are fully masked.
        if any_padding or (has_last and self._last_length < s + 1):
            lengths = np.where(ids == self.num_samples - 1, self._last_length, s + 1)
            lengths[ids < 0] = 0
            # Label j is block[j + 1]; it is real iff j + 1 < length.
            loss_mask = (self._position_row.unsqueeze(0) < torch.from_numpy(lengths - 1).unsqueeze(1)).float()
        else:
            loss_mask = self._full_mask.clone()
        return {
            "tokens": tokens,
            "labels": labels,
            "loss_mask": loss_mask,
            "position_ids": self._positions.clone(),
            "sample_ids": torch.from_numpy(ids),  # split-level ids, -1 = padding (sample_trace.py)
        }

    def __iter__(self) -> TokenBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if not self.infinite and self._next_batch >= len(self):
            raise StopIteration
        batch = self.batch(self._next_batch)
        self._next_batch += self.num_workers
        return batch

    def __repr__(self) -> str:
        workers = f", worker {self.worker_id}/{self.num_workers}" if self.num_workers != 1 else ""
        return (
            f"TokenBatches(split={self.split!r}, samples={self.num_samples}, "
            f"micro_batch_size={self.micro_batch_size}, dp_rank={self.dp_rank}, "
            f"dp_size={self.dp_size}, start_samples={self.start_samples}, "
            f"shuffle={self.shuffle}, infinite={self.infinite}{workers})"
        )


def _check_worker(worker_id: int, num_workers: int) -> None:
    if num_workers < 1 or not 0 <= worker_id < num_workers:
        raise ValueError(f"need 0 <= worker_id < num_workers, got worker_id={worker_id}, num_workers={num_workers}")
