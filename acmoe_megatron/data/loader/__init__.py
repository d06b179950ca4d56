"""Megatron micro-batches from a shard directory: ``batches`` (``TokenBatches``: deterministic,
exactly resumable, split by data-parallel rank), its epoch order ``sample_order`` (``SampleOrder``),
and ``workers`` (``TokenBatches`` behind a multi-worker ``torch.utils.data.DataLoader``).
"""
