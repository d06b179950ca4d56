"""acmoe-megatron: the Adaptive Clustering (AC) router (Nielsen et al., ICLR 2025) in megatron-core.

Modules:
  ac_stats      - the cluster statistics as pure tensor functions (spec §2.2, §3.1)
  routers       - ACRouter / LabelSourceRouter, megatron ``TopKRouter`` subclasses
  labels        - the previous-MoE-layer label hand-off between routers
  spec          - patches megatron's GPT decoder block spec with our routers
  config        - YAML recipes -> megatron flags + AC settings (unknown keys are errors)
  cpu_runtime   - what megatron-core needs to run on CPU/gloo (applied only without CUDA)
  train         - model/data providers and the forward step for ``megatron.training.pretrain``
  data          - byte tokenizer, embedded stdlib corpus, webdataset shards and loader
"""

__version__ = "0.1.0"
