"""Deterministic, exactly resumable micro-batches for Megatron from a token-shard directory.

``TokenBatches`` reads one split of a directory written by ``prepare`` and yields Megatron GPT
micro-batches: ``tokens``, ``labels`` (LongTensor [b, s]), ``loss_mask`` (float [b, s]) and
``position_ids`` (LongTensor [b, s]). Use it with ``--dataloader-type external``.

How samples are assigned (sample-level, not shard-level, splitting):
- The split's N samples form an infinite stream of epochs. Epoch e is a permutation of 0..N-1,
  seeded by (seed, e) (identity when ``shuffle=False``). Global stream position p is sample
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
- This works with any number of shards (even fewer shards than replicas) and never reads the
  ``RANK``/``WORLD_SIZE`` environment variables: the caller passes ``dp_rank``/``dp_size`` from
  ``megatron.core.parallel_state.get_data_parallel_rank()/get_data_parallel_world_size()``, so
  all TP/PP/CP ranks of one replica get the same batches.
- ``infinite=False`` gives one pass over the stream positions ``[consumed_samples, N)`` of
  epoch 0. The final micro-batches are padded with fully loss-masked dummy samples so every
  replica yields the same number of full-shape micro-batches; the real samples of the pass are
  covered exactly once across replicas. For Megatron's periodic evaluation (``eval_iters``
  batches per round), use ``shuffle=False, infinite=True`` instead: the same file-order stream,
  repeated.

The split is loaded into memory once (through a webdataset pipeline, shard by shard, with the
node and worker splitters left out: every replica reads every shard and picks its samples). That
is fine for corpora of up to a few hundred million tokens: it costs 2 bytes per token (uint16) per
process.
Do not wrap this iterator in a multi-worker DataLoader: it is already cheap and would be
duplicated per worker.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from acmoe_megatron.data.manifest import Manifest, ShardInfo, read_manifest, sample_key, sha256_file

__all__ = ["ShardError", "TokenBatches", "load_split_samples"]


class ShardError(RuntimeError):
    """A shard is missing, corrupt or does not match the manifest."""


def _shard_error(path: Path, problem: str) -> ShardError:
    return ShardError(
        f"shard {path}: {problem}. The shard directory is damaged or incomplete; re-create it with "
        f"`acmoe-data prepare ... --out {path.parent} --overwrite`"
    )


def _read_shard(path: Path, info: ShardInfo, sample_length: int, dtype: np.dtype) -> np.ndarray:
    """Read one shard into an array [samples, sample_length], checking it against the manifest."""
    out = np.empty((info.samples, sample_length), dtype=dtype)
    # No nodesplitter/workersplitter stages: splitting happens at sample level in TokenBatches.
    pipeline = wds.DataPipeline(wds.SimpleShardList([str(path)]), wds.tarfile_to_samples())
    count = 0
    try:
        for sample in pipeline:
            if count >= info.samples:
                raise _shard_error(path, f"holds more than the {info.samples} samples in the manifest")
            expected = sample_key(info.first_sample + count)
            if sample.get("__key__") != expected or "tokens.npy" not in sample:
                fields = sorted(k for k in sample if not k.startswith("__"))
                raise _shard_error(
                    path,
                    f"sample {count} has key {sample.get('__key__')!r} and fields {fields}, "
                    f"expected key {expected!r} with 'tokens.npy'",
                )
            tokens = np.load(io.BytesIO(sample["tokens.npy"]), allow_pickle=False)
            if tokens.shape != (sample_length,) or tokens.dtype != dtype:
                raise _shard_error(
                    path,
                    f"sample {expected} has shape {tokens.shape} and dtype {tokens.dtype}, "
                    f"expected ({sample_length},) {dtype}",
                )
            out[count] = tokens
            count += 1
    except ShardError:
        raise
    except Exception as exc:  # tarfile/numpy errors on corrupt bytes
        raise _shard_error(path, f"cannot be read ({type(exc).__name__}: {exc})") from exc
    if count != info.samples:
        raise _shard_error(path, f"holds {count} samples, the manifest says {info.samples}")
    return out


def load_split_samples(
    manifest_dir: str | os.PathLike, split: str, verify_checksums: bool = True
) -> tuple[Manifest, np.ndarray]:
    """Load every sample of ``split`` as an array [num_samples, seq_length + 1].

    Each shard must exist with the size recorded in the manifest; with ``verify_checksums`` its
    sha256 must match too. Any mismatch raises ``ShardError`` naming the shard.
    """
    manifest_dir = Path(manifest_dir)
    manifest = read_manifest(manifest_dir)
    if split not in manifest.splits:
        raise KeyError(
            f"split {split!r} is not in {manifest_dir} (it has {sorted(manifest.splits)}); "
            "re-run acmoe-data prepare with that split"
        )
    info = manifest.splits[split]
    if info.num_samples == 0:
        raise ValueError(
            f"split {split!r} in {manifest_dir} has no samples; prepare it from a larger source "
            "(or raise --max-bytes / the split fraction)"
        )
    dtype = np.dtype(manifest.dtype)
    parts = []
    for shard in info.shards:
        path = manifest_dir / shard.file
        if not path.is_file():
            raise _shard_error(path, "is missing")
        size = path.stat().st_size
        if size != shard.bytes:
            raise _shard_error(path, f"has {size} bytes, the manifest says {shard.bytes}")
        if verify_checksums and sha256_file(path) != shard.sha256:
            raise _shard_error(path, "sha256 does not match the manifest")
        parts.append(_read_shard(path, shard, manifest.sample_length, dtype))
    samples = np.concatenate(parts)
    if len(samples) != info.num_samples:
        raise ValueError(
            f"{manifest_dir}: split {split!r} shards hold {len(samples)} samples, the manifest "
            f"total is {info.num_samples}; the manifest is inconsistent, re-create the directory"
        )
    return manifest, samples


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
        verify_checksums: check every shard's sha256 against the manifest on load.
        seq_length: if given, must equal the manifest's sequence length.
        tokenizer_hash: if given, must equal the manifest's tokenizer hash.
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
    ):
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"need 0 <= dp_rank < dp_size, got dp_rank={dp_rank}, dp_size={dp_size}")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")
        self.manifest, self._samples = load_split_samples(manifest_dir, split, verify_checksums)
        if seq_length is not None and seq_length != self.manifest.seq_length:
            raise ValueError(
                f"{manifest_dir} was prepared with seq_length={self.manifest.seq_length} but the "
                f"model uses {seq_length}; re-run acmoe-data prepare with --seq-length {seq_length}"
            )
        if tokenizer_hash is not None and tokenizer_hash != self.manifest.tokenizer["hash"]:
            raise ValueError(
                f"{manifest_dir} was tokenized with {self.manifest.tokenizer['name']!r} (hash "
                f"{self.manifest.tokenizer['hash'][:12]}...), not the expected tokenizer "
                f"(hash {tokenizer_hash[:12]}...); re-run acmoe-data prepare"
            )
        self.split = split
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed, self.shuffle, self.infinite = seed, shuffle, infinite
        self.num_samples = len(self._samples)
        if not infinite and consumed_samples > self.num_samples:
            raise ValueError(
                f"consumed_samples={consumed_samples} is past the end of the single pass over "
                f"{self.num_samples} samples of split {split!r} (infinite=False)"
            )
        self.start_samples = consumed_samples
        self._split_info = self.manifest.splits[split]
        self._eod = int(self.manifest.tokenizer["eod"])
        self._next_batch = 0
        self._perm_cache: dict[int, np.ndarray] = {}

    # -- sample assignment -------------------------------------------------------------------

    @property
    def samples_per_step(self) -> int:
        """Global samples consumed when every replica takes one micro-batch."""
        return self.micro_batch_size * self.dp_size

    @property
    def consumed_samples(self) -> int:
        """Global consumed count after the micro-batches this iterator has yielded so far."""
        return self.start_samples + self._next_batch * self.samples_per_step

    def __len__(self) -> int:
        """Number of micro-batches of a finite pass (``infinite=False`` only)."""
        if self.infinite:
            raise TypeError("an infinite TokenBatches has no length")
        remaining = self.num_samples - self.start_samples
        return -(-remaining // self.samples_per_step)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            # Keep the two latest epochs (a micro-batch usually spans at most two); a split smaller
            # than one step recomputes permutations, which is slower but still correct.
            if len(self._perm_cache) >= 2:
                self._perm_cache.pop(min(self._perm_cache))
            if self.shuffle:
                perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            else:
                perm = np.arange(self.num_samples)
            self._perm_cache[epoch] = perm
        return self._perm_cache[epoch]

    def sample_ids(self, batch_index: int) -> list[int | None]:
        """Split-level sample indices of this replica's micro-batch ``batch_index``.

        ``None`` marks a padding slot (only at the end of a finite pass).
        """
        ids: list[int | None] = []
        for i in range(self.micro_batch_size):
            position = (
                self.start_samples
                + batch_index * self.samples_per_step
                + self.dp_rank * self.micro_batch_size
                + i
            )
            epoch, offset = divmod(position, self.num_samples)
            if not self.infinite and epoch > 0:
                ids.append(None)
            else:
                ids.append(int(self._permutation(epoch)[offset]))
        return ids

    # -- batches -----------------------------------------------------------------------------

    def batch(self, batch_index: int) -> dict[str, torch.Tensor]:
        """Build micro-batch ``batch_index`` of this replica (does not advance the iterator)."""
        ids = self.sample_ids(batch_index)
        b, s = self.micro_batch_size, self.manifest.seq_length
        block = np.full((b, s + 1), self._eod, dtype=np.int64)
        lengths = np.zeros(b, dtype=np.int64)
        for row, sample_id in enumerate(ids):
            if sample_id is not None:
                block[row] = self._samples[sample_id]
                lengths[row] = self._split_info.sample_length(sample_id, s + 1)
        block_t = torch.from_numpy(block)
        positions = torch.arange(s, dtype=torch.long)
        # Label j is block[j + 1]; it is real iff j + 1 < length.
        loss_mask = (positions.unsqueeze(0) < torch.from_numpy(lengths - 1).unsqueeze(1)).float()
        return {
            "tokens": block_t[:, :-1].contiguous(),
            "labels": block_t[:, 1:].contiguous(),
            "loss_mask": loss_mask,
            "position_ids": positions.unsqueeze(0).repeat(b, 1),
        }

    def __iter__(self) -> TokenBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if not self.infinite and self._next_batch >= len(self):
            raise StopIteration
        batch = self.batch(self._next_batch)
        self._next_batch += 1
        return batch

    def __repr__(self) -> str:
        return (
            f"TokenBatches(split={self.split!r}, samples={self.num_samples}, "
            f"micro_batch_size={self.micro_batch_size}, dp_rank={self.dp_rank}, "
            f"dp_size={self.dp_size}, consumed_samples={self.consumed_samples}, "
            f"shuffle={self.shuffle}, infinite={self.infinite})"
        )
