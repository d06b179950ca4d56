"""Training from megatron indexed data: megatron's ``BlendedMegatronDatasetBuilder`` + ``GPTDataset``.

``megatron_gpt_datasets_provider``: training from megatron indexed data through megatron-core's
``BlendedMegatronDatasetBuilder`` + ``GPTDataset``/``GPTDatasetConfig``, configured from
megatron's own parsed arguments the way Megatron-LM's ``pretrain_gpt.py`` does
(``core_gpt_dataset_config_from_args``; ``--data-path [w1] p1 [w2] p2 --split``, or
``--train/valid/test-data-path``, ``--mock-data``, ``--data-cache-path``). Megatron-LM's script is
not part of the megatron-core wheel, so its ~40 lines of glue are here. The data arguments are
checked first (``keys.check_megatron_data``).

The datasets are built on every rank (``is_distributed = True``, ``is_dataset_built_on_rank``
always true): our ``forward_step`` reads its own micro-batch on every TP rank and pipeline stage
(``runtime/forward_step.py``), where ``pretrain_gpt.py`` reads on TP rank 0 of the first/last stage
and broadcasts. Megatron's builder still builds on rank 0 first, so its caches are written once.
"""

from __future__ import annotations

import json
from pathlib import Path

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

from acmoe_megatron.data.megatron.keys import check_megatron_data

__all__ = ["core_gpt_dataset_config_from_args", "is_dataset_built_on_rank", "megatron_gpt_datasets_provider"]


def is_dataset_built_on_rank(vp_stage=None) -> bool:
    """Every rank builds the datasets: our forward_step reads its micro-batch on every TP rank and
    pipeline stage (see the module docstring)."""
    return True


def core_gpt_dataset_config_from_args(args, tokenizer, **overrides) -> GPTDatasetConfig:
    """megatron's ``GPTDatasetConfig`` from its parsed arguments, as Megatron-LM's
    ``pretrain_gpt.core_gpt_dataset_config_from_args`` builds it (``overrides`` replace fields)."""
    from megatron.training.utils import get_blend_and_blend_per_split

    blend, blend_per_split = get_blend_and_blend_per_split(args)
    sequences_per_dataset = None
    if getattr(args, "per_dataset_sequences_path", None) is not None:
        sequences_per_dataset = json.loads(Path(args.per_dataset_sequences_path).read_text())
    data_args = {
        "random_seed": args.seed,
        "sequence_length": args.seq_length,
        "blend": blend,
        "blend_per_split": blend_per_split,
        "split": args.split,
        "multiple_validation_sets": args.multiple_validation_sets,
        "full_validation": args.full_validation,
        "num_dataset_builder_threads": args.num_dataset_builder_threads,
        "path_to_cache": args.data_cache_path,
        "mmap_bin_files": args.mmap_bin_files,
        "tokenizer": tokenizer,
        "reset_position_ids": args.reset_position_ids,
        "reset_attention_mask": args.reset_attention_mask,
        "eod_mask_loss": args.eod_mask_loss,
        "create_attention_mask": args.create_attention_mask_in_dataloader,
        "object_storage_cache_path": args.object_storage_cache_path,
        "mid_level_dataset_surplus": args.mid_level_dataset_surplus,
        "allow_ambiguous_pad_tokens": args.allow_ambiguous_pad_tokens,
        "fast_cache_load": args.dataloader_fast_cache_load,
        "sequences_per_dataset": sequences_per_dataset,
        "defer_npy_index_mmap": args.dataloader_defer_npy_index_mmap,
    } | overrides
    if getattr(args, "fim_data", False):
        from megatron.training.datasets.fim_dataset import GPTFIMDatasetConfig

        extra_tokens = {"prefix": args.fim_prefix_token, "middle": args.fim_middle_token,
                        "suffix": args.fim_suffix_token, "pad": args.fim_pad_token, "eod": args.fim_eod_token}
        return GPTFIMDatasetConfig(**data_args, fim_rate=args.fim_rate, fim_spm_rate=args.fim_spm_rate,
                                   fim_extra_tokens=extra_tokens, fim_split_sample=args.fim_split_sample,
                                   fim_fragment_rate=args.fim_fragment_rate, fim_no_prefix=args.fim_no_prefix)
    return GPTDatasetConfig(**data_args)


def megatron_gpt_datasets_provider(train_val_test_num_samples, vp_stage=None, *, args=None, tokenizer=None):
    """``pretrain``'s ``train_valid_test_datasets_provider`` over megatron indexed data (or
    ``--mock-data``): megatron's ``BlendedMegatronDatasetBuilder`` of ``GPTDataset`` (``MockGPTDataset``,
    ``GPTFIMDataset`` with ``--fim-data``), configured from megatron's parsed arguments and global
    tokenizer (``args``/``tokenizer`` replace them, for tests). Use with ``dataloader_type`` single
    or cyclic."""
    if args is None:
        from megatron.training import get_args

        args = get_args()
    if tokenizer is None:
        from megatron.training import get_tokenizer

        tokenizer = get_tokenizer()
    check_megatron_data(args, tokenizer)
    config = core_gpt_dataset_config_from_args(args, tokenizer)
    if args.mock_data:
        cls = MockGPTDataset
    elif getattr(args, "fim_data", False):
        from megatron.training.datasets.fim_dataset import GPTFIMDataset

        cls = GPTFIMDataset
    else:
        cls = GPTDataset
    return BlendedMegatronDatasetBuilder(cls, train_val_test_num_samples, is_dataset_built_on_rank, config).build()


megatron_gpt_datasets_provider.is_distributed = True  # built on every rank (module docstring)
