"""The order in which one epoch visits a split's samples: a seeded shuffle in O(shards + window) memory.

``SampleOrder(shard_sizes, seed, shuffle, window)`` maps a position of epoch ``e`` to a split-level
sample index (``ids(epoch, positions)``), for any position, without visiting the earlier ones, so a
resume from Megatron's ``consumed_train_samples`` costs one window's permutation, not a replay.

- A split of at most ``window`` samples (every embedded corpus; the default window is 2**20
  samples, 8 MiB of permutation) gets one full permutation per epoch, seeded by ``(seed, epoch)``:
  ``numpy.random.default_rng([seed, epoch]).permutation(N)``, the order this loader always had.
- A larger split is shuffled in two levels: the shards are permuted (seed ``(seed, epoch)``) and
  laid end to end, then every window of ``window`` consecutive positions of that sequence is
  permuted (seed ``(seed, epoch, window number)``). Each sample appears exactly once per epoch;
  memory is the shard permutation plus one or two windows' permutations. The window mixes
  ``window / samples_per_shard`` shards, i.e. samples from distant parts of the corpus, like a
  webdataset shuffle buffer of that size, but reproducible and random-access.
Why our own: Megatron's ``GPTDataset`` materialises a shuffle index of the whole corpus (O(samples),
cached on disk) and webdataset's shuffle buffer is neither reproducible at a given position nor
resumable without replay.
"""

from __future__ import annotations

import numpy as np

__all__ = ["DEFAULT_WINDOW", "SampleOrder"]

DEFAULT_WINDOW = 2**20


class SampleOrder:
    def __init__(self, shard_sizes, seed: int, shuffle: bool = True, window: int | None = DEFAULT_WINDOW):
        self.shard_sizes = np.asarray(shard_sizes, dtype=np.int64)
        self.num_samples = int(self.shard_sizes.sum())
        if window is not None and window < 1:
            raise ValueError(f"shuffle window must be >= 1 sample (or None: the whole split), got {window}")
        self.seed, self.shuffle = seed, shuffle
        self.window = self.num_samples if window is None else min(window, self.num_samples)
        self.two_level = shuffle and self.window < self.num_samples
        self._starts = np.concatenate([[0], np.cumsum(self.shard_sizes)])
        self._cache: dict[tuple, np.ndarray] = {}

    def _cached(self, key: tuple, make) -> np.ndarray:
        if key not in self._cache:
            if len(self._cache) >= 12:  # a micro-batch spans at most two epochs x two windows
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = make()
        return self._cache[key]

    def ids(self, epoch: int, positions: np.ndarray) -> np.ndarray:
        """Split-level sample indices at ``positions`` (0 <= p < num_samples) of epoch ``epoch``."""
        positions = np.asarray(positions, dtype=np.int64)
        if not self.shuffle:
            return positions
        if not self.two_level:
            perm = self._cached(("full", epoch), lambda: np.random.default_rng([self.seed, epoch]).permutation(self.num_samples))
            return perm[positions]
        # level 2: position -> position in the shard-permuted sequence, through its window's permutation
        windows = positions // self.window
        out = np.empty_like(positions)
        for w in np.unique(windows).tolist():
            sel = windows == w
            size = min(self.window, self.num_samples - w * self.window)
            perm = self._cached(("window", epoch, w),
                                lambda: np.random.default_rng([self.seed, epoch, w]).permutation(size))
            out[sel] = w * self.window + perm[positions[sel] - w * self.window]
        # level 1: position in the shard-permuted sequence -> split sample index
        order = self._cached(("shards", epoch),
                             lambda: np.random.default_rng([self.seed, epoch]).permutation(len(self.shard_sizes)))
        sizes = self._cached(("sizes", epoch), lambda: self.shard_sizes[order])
        ends = self._cached(("ends", epoch), lambda: np.cumsum(sizes))
        slot = np.searchsorted(ends, out, side="right")
        return self._starts[order[slot]] + out - (ends[slot] - sizes[slot])
