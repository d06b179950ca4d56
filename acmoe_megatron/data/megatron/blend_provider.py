"""Our shard directories through megatron's blending: ``data.blend: [w1, dir1, w2, dir2, ...]``.

``shard_blend_datasets_provider``: megatron's ``BlendedMegatronDatasetBuilder`` of
``ShardGPTDataset`` (``shard_dataset.py``) over ``<dir>/<split>`` of each directory, with
megatron's samplers (``dataloader_type`` single or cyclic); ``shard_blend_config`` is its
``GPTDatasetConfig``. The blend is checked first (``keys.parse_shard_blend``, ``keys.check_shard_blend``).

The datasets are built on every rank (``is_distributed = True``, ``is_dataset_built_on_rank``
always true): our ``forward_step`` reads its own micro-batch on every TP rank and pipeline stage
(``runtime/forward_step.py``), where ``pretrain_gpt.py`` reads on TP rank 0 of the first/last stage
and broadcasts. Megatron's builder still builds on rank 0 first, so its caches are written once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

from acmoe_megatron.data.corpora.corpus import SPLITS
from acmoe_megatron.data.megatron.indexed_provider import core_gpt_dataset_config_from_args, is_dataset_built_on_rank
from acmoe_megatron.data.megatron.keys import check_shard_blend, parse_shard_blend
from acmoe_megatron.data.megatron.shard_dataset import ShardGPTDataset
from acmoe_megatron.data.shards.manifest import read_manifest

__all__ = ["shard_blend_config", "shard_blend_datasets_provider"]


def shard_blend_config(args, tokenizer, dirs: Sequence[str], weights: Sequence[float] | None,
                       sizes: Sequence[int | None], seed: int | None = None) -> GPTDatasetConfig:
    """megatron's ``GPTDatasetConfig`` for a blend of our directories: ``blend_per_split`` of the
    ``<dir>/<split>`` paths (each directory brings its own train/valid/test), the rest from megatron's
    arguments. A split is left out (None) when megatron asks 0 samples of it, and the test split when
    a directory has none (as our shard provider, which never builds test); a missing valid split
    that evaluation needs is an error."""
    if getattr(args, "fim_data", False):
        raise ValueError("megatron.fim_data re-arranges documents, which our packed shard samples no longer have: "
                         "convert the directories with `acmoe-data to-megatron` and give megatron.data_path")
    manifests = [read_manifest(d) for d in dirs]
    blend_per_split = []
    for i, split in enumerate(SPLITS):
        lacking = [d for d, m in zip(dirs, manifests) if not m.splits.get(split) or not m.splits[split].num_samples]
        if sizes[i] == 0 or (lacking and split == "test"):
            blend_per_split.append(None)
            continue
        if lacking:
            fix = "megatron.eval_iters: 0" if split == "valid" else "megatron.skip_train or more data"
            raise ValueError(f"data.blend: {lacking[0]} has no {split} samples, which megatron asks for; prepare "
                             f"that directory with a {split} split, or set {fix}")
        # megatron: weights need a requested size; without one (full validation) blend by length
        blend_per_split.append(([f"{d}/{split}" for d in dirs], list(weights) if sizes[i] is not None else None))
    return core_gpt_dataset_config_from_args(
        args, tokenizer, blend=None, blend_per_split=blend_per_split, split=None,
        random_seed=args.seed if seed is None else seed, sequences_per_dataset=None,
        fast_cache_load=False, defer_npy_index_mmap=False,
    )


def shard_blend_datasets_provider(blend: Sequence[Any], seed: int | None = None):
    """``pretrain``'s datasets provider for ``data.blend: [w1, dir1, w2, dir2, ...]``: megatron's
    ``BlendedMegatronDatasetBuilder`` of ``ShardGPTDataset`` (each directory's own splits), with
    megatron's samplers (``dataloader_type`` single or cyclic). ``seed``: the shuffle seed (default
    megatron's ``--seed``)."""
    dirs, weights = parse_shard_blend(blend)
    check_shard_blend(dirs)

    def provider(train_val_test_num_samples, vp_stage=None, *, args=None, tokenizer=None):
        if args is None:
            from megatron.training import get_args

            args = get_args()
        if tokenizer is None:
            from megatron.training import get_tokenizer

            tokenizer = get_tokenizer()
        config = shard_blend_config(args, tokenizer, dirs, weights, train_val_test_num_samples, seed)
        return BlendedMegatronDatasetBuilder(ShardGPTDataset, list(train_val_test_num_samples),
                                             is_dataset_built_on_rank, config).build()

    provider.is_distributed = True  # built on every rank (module docstring)
    return provider
