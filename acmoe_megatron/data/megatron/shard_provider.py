"""Megatron's ``train_valid_test_datasets_provider`` over our webdataset token shards.

``shard_datasets_provider(path, seed)`` is what ``megatron.training.pretrain`` calls with the
sample counts: each data-parallel rank reads its own part of the ``train`` split (``TokenBatches``:
seeded shuffle, exact resume from ``consumed_train_samples``) and a validation stream that scores the
same first samples at every evaluation (``RepeatingValidation``). Used by our trainer (train.py) and
by plain Megatron scripts (examples/pretrain_gpt_acmoe.py); megatron's own ``GPTDataset`` needs its
indexed ``.bin/.idx`` format, which these shards are not.
"""

from __future__ import annotations

from functools import partial

from acmoe_megatron.data.loader.batches import TokenBatches


class RepeatingValidation:
    """Validation stream: the same first ``micro_batches`` micro-batches of this rank, every time.

    Megatron keeps one validation iterator for the whole run and draws ``eval_iters`` ×
    micro-batches-per-step from it at every evaluation; restarting after exactly that many makes
    every evaluation score the same, deterministic samples (the first eval_iters × global batch
    samples of the valid split, in order).
    """

    def __init__(self, factory, micro_batches: int):
        self.factory, self.micro_batches = factory, micro_batches
        self._it, self._n = None, 0

    def __iter__(self):
        return self

    def __next__(self):
        if self._it is None or self._n == self.micro_batches:
            self._it, self._n = iter(self.factory()), 0
        self._n += 1
        return next(self._it)


def shard_datasets_provider(path: str, seed: int = 1234, verify_checksums: bool = False,
                            shuffle_window: int | None = 2**20, cache_dir: str | None = None):
    """The provider megatron's ``pretrain`` calls (``dataloader_type: external``); ``shuffle_window``:
    see ``sample_order`` (the recipe's ``data.shuffle_window``); ``cache_dir``: where the shards of a
    URL / ``pipe:`` ``path`` are cached (``shards/remote.py``, ``data.cache_dir``)."""

    def provider(train_val_test_num_samples, vp_stage=None):
        from megatron.core import parallel_state
        from megatron.training import get_args

        args = get_args()
        dp_rank = parallel_state.get_data_parallel_rank()
        dp_size = parallel_state.get_data_parallel_world_size()
        common = dict(micro_batch_size=args.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size)
        train = TokenBatches(
            path, "train", seed=seed, shuffle=True, infinite=True,
            consumed_samples=args.consumed_train_samples,
            verify_checksums=verify_checksums, seq_length=args.seq_length, shuffle_window=shuffle_window,
            cache_dir=cache_dir, **common,
        )
        micro_per_step = args.global_batch_size // (args.micro_batch_size * dp_size)
        valid = RepeatingValidation(
            partial(TokenBatches, path, "valid", seed=0, shuffle=False, infinite=True,
                    verify_checksums=False, cache_dir=cache_dir, **common),
            micro_batches=max(args.eval_iters, 1) * micro_per_step,
        )
        return train, valid, None

    provider.is_distributed = True  # every rank builds its own reader (split by DP rank)
    return provider
