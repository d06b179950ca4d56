"""Megatron's indexed datasets (``.bin``/``.idx``) as a second input, blending, a converter, and the
datasets providers megatron's ``pretrain`` calls.

One module per job (this package imports none of them, so ``keys`` and ``sidecar`` load without
torch and megatron):

- ``keys``: the recipe keys that select megatron's datasets (``MEGATRON_DATA_KEYS``,
  ``uses_megatron_data``), the prefixes they name (``megatron_data_prefixes``) and the ``data.blend``
  checks: what the launch checks call, without torch or megatron.
- ``sidecar``: megatron prefixes (``<dir>/<split>_text_document``) and the acmoe JSON sidecar next
  to each, which records what the ``.bin/.idx`` cannot (tokenizer, seq_length, text counts).
- ``convert``: shards <-> indexed data (``acmoe-data to-megatron`` / ``from-megatron``), through
  megatron-core's own ``IndexedDatasetBuilder`` / ``IndexedDataset``.
- ``indexed_provider``: training from megatron indexed data (or ``--mock-data``) through
  megatron-core's ``BlendedMegatronDatasetBuilder`` + ``GPTDataset``, configured from megatron's
  parsed arguments as Megatron-LM's ``pretrain_gpt.py`` does.
- ``shard_dataset`` + ``blend_provider``: ``ShardGPTDataset``, one split of one of our shard
  directories as a ``MegatronDataset``, so that megatron's builder blends shard directories
  (``data.blend: [0.3, dirA, 0.7, dirB]``).
- ``shard_provider``: megatron's datasets provider over one shard directory (``data.path``,
  ``dataloader_type: external``): ``TokenBatches`` per data-parallel rank.

The providers over megatron's datasets build them on every rank (``is_distributed = True``): our
``forward_step`` reads its own micro-batch on every TP rank and pipeline stage (``runtime/forward_step.py``).
"""
