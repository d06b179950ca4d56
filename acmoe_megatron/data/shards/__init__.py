"""Our webdataset token shards: the directory format, writing it, and reading it back.

- ``manifest``: the on-disk format of a shard directory and its ``manifest.json``.
- ``writer``: ``prepare`` (corpus -> tokens -> fixed-length samples -> tar shards + manifest) and the
  packer and shard writer it shares with ``megatron.convert``.
- ``index``: the per-shard sample-offset index (random access into a tar).
- ``store``: ``ShardSamples``, one split's samples read on demand by offset.
- ``remote``: shards behind a URL or a ``pipe:`` command, fetched into a local cache.
"""
