"""``ShardGPTDataset``: one split of one of OUR shard directories as a megatron ``MegatronDataset``.

A ``MegatronDataset`` over one split of one of our shard directories, so that megatron's
``BlendedMegatronDatasetBuilder`` blends several shard directories (``data.blend: [0.3, dirA, 0.7,
dirB]``, ``blend_provider.shard_blend_datasets_provider``). Megatron has no dataset over pre-packed
fixed-length samples: ``GPTDataset`` re-packs documents of an ``IndexedDataset`` itself. Its "path"
is ``<shard dir>/<split>``, the analogue of a megatron prefix ``<dir>/<split>_text_document``. Each
sample gives ``GPTDataset``'s fields (tokens, labels, loss_mask, position_ids, and attention_mask
when asked), masks and positions made by megatron's own ``_get_ltor_masks_and_position_ids``; the
EOD padding of the split's last sample is masked out of the loss. The per-epoch order is
``sample_order.SampleOrder`` (seeded, random access, O(shards + window) memory) instead of
``GPTDataset``'s on-disk shuffle index.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, _get_ltor_masks_and_position_ids
from megatron.core.datasets.megatron_dataset import MegatronDataset
from megatron.core.datasets.utils import Split

from acmoe_megatron.data.corpora.corpus import SPLITS
from acmoe_megatron.data.loader.sample_order import SampleOrder
from acmoe_megatron.data.shards.manifest import MANIFEST_NAME
from acmoe_megatron.data.shards.store import ShardSamples

__all__ = ["ShardGPTDataset"]


def _shard_path(path: str) -> tuple[Path, str]:
    """``<shard dir>/<split>`` -> (shard dir, split)."""
    p = Path(path)
    if p.name not in SPLITS or not (p.parent / MANIFEST_NAME).is_file():
        raise ValueError(
            f"ShardGPTDataset path {path!r} must be <shard dir>/<split>: a directory holding {MANIFEST_NAME} "
            f"and one of its splits {SPLITS} (e.g. data/stdlib_s256/train)"
        )
    return p.parent, p.name


class ShardGPTDataset(MegatronDataset):
    """One split of one of our shard directories as a megatron ``MegatronDataset`` (this module's docstring).

    Built by ``BlendedMegatronDatasetBuilder(ShardGPTDataset, sizes, is_built_on_rank, config)`` from
    paths ``<shard dir>/<split>`` (``config.blend_per_split``, or ``config.blend`` + ``split`` to carve
    one split's samples the way megatron carves a prefix's). Item ``i`` is sample
    ``sample_id(i)`` of the split: epoch ``i // n`` of the ``n`` samples of ``indices``, a seeded
    permutation per epoch (``config.random_seed``). ``num_samples`` beyond ``n`` adds epochs.
    """

    def __init__(self, dataset: ShardSamples, dataset_path: str | None, indices: np.ndarray,
                 num_samples: int | None, index_split: Split, config: GPTDatasetConfig) -> None:
        super().__init__(dataset, dataset_path, indices, num_samples, index_split, config)
        manifest = dataset.manifest
        if config.sequence_length != manifest.seq_length:
            raise ValueError(
                f"{dataset.dir} holds samples of seq_length {manifest.seq_length} but the model uses "
                f"{config.sequence_length}: set megatron.seq_length: {manifest.seq_length} or re-run "
                f"`acmoe-data prepare --seq-length {config.sequence_length}` for it"
            )
        if not config.add_extra_token_to_sequence:
            raise ValueError("ShardGPTDataset samples hold seq_length + 1 tokens (inputs and shifted labels): "
                             "add_extra_token_to_sequence must stay true")
        indices = np.asarray(indices, dtype=np.int64)
        self.n = len(indices)
        if self.n == 0:
            raise ValueError(f"{dataset_path}: the {index_split.name} part of split {dataset.split!r} has no "
                             f"samples; prepare more data or give that split a larger share")
        self.num_epochs = max(1, -(-num_samples // self.n)) if num_samples else 1
        self.eod = int(manifest.tokenizer["eod"])
        self._last = dataset.info.num_samples - 1
        self._last_real = dataset.info.sample_length(self._last, manifest.sample_length)
        if self.n == int(indices[-1]) - int(indices[0]) + 1 and np.all(np.diff(indices) == 1):
            # a contiguous range (what the builder passes): shuffle by shards, as TokenBatches does
            start = int(indices[0])
            edges = np.clip(dataset.starts, start, start + self.n) - start
            sizes = np.diff(edges)
            self._order = SampleOrder(sizes[sizes > 0], config.random_seed, shuffle=True)
            self._base, self._map = start, None
        else:
            self._order = SampleOrder([self.n], config.random_seed, shuffle=True)
            self._base, self._map = 0, indices
        self._cacheable = not any([config.reset_position_ids, config.reset_attention_mask, config.eod_mask_loss])
        self._cached = None

    @staticmethod
    def numel_low_level_dataset(low_level_dataset: ShardSamples) -> int:
        return len(low_level_dataset)

    @staticmethod
    def build_low_level_dataset(dataset_path: str, config: GPTDatasetConfig) -> ShardSamples:
        shard_dir, split = _shard_path(dataset_path)
        return ShardSamples(shard_dir, split)

    def __len__(self) -> int:
        return self.num_epochs * self.n

    def sample_id(self, idx: int) -> int:
        """The split-level sample index of item ``idx``."""
        if not 0 <= idx < len(self):
            raise IndexError(f"index {idx} out of range [0, {len(self)})")
        epoch, position = divmod(int(idx), self.n)
        local = int(self._order.ids(epoch, np.array([position]))[0])
        return int(self._map[local]) if self._map is not None else self._base + local

    def __getitem__(self, idx: int | None) -> dict[str, torch.Tensor]:
        sid = self.sample_id(0 if idx is None else idx)
        text = torch.from_numpy(self.dataset.read(np.array([sid]))[0].astype(np.int64))
        tokens, labels = text[:-1].contiguous(), text[1:].contiguous()
        config = self.config
        if self._cacheable and self._cached is not None:
            attention_mask, loss_mask, position_ids = self._cached
            loss_mask = loss_mask.clone()
        else:
            attention_mask, loss_mask, position_ids = _get_ltor_masks_and_position_ids(
                tokens, self.eod, config.reset_position_ids, config.reset_attention_mask, config.eod_mask_loss,
                config.create_attention_mask,
            )
            if self._cacheable:
                self._cached = (attention_mask, loss_mask.clone(), position_ids)
        if sid == self._last and self._last_real < len(text):
            loss_mask[self._last_real - 1:] = 0.0  # label j = text[j + 1] is EOD padding from j = real - 1
        # as GPTDataset: labels equal to the tokenizer's pad id are not trained on
        loss_mask[labels == self._pad_token_id] = 0.0
        tokens[tokens == self._pad_token_id] = 0
        labels[labels == self._pad_token_id] = 0
        if idx is None:  # megatron's batch-padding sample
            loss_mask = torch.zeros_like(loss_mask)
        sample = {"tokens": tokens, "labels": labels}
        if config.create_attention_mask:
            sample["attention_mask"] = attention_mask
        sample["loss_mask"] = loss_mask
        sample["position_ids"] = position_ids
        return sample
