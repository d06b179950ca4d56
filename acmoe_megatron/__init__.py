"""acmoe-megatron: the Adaptive Clustering (AC) router (Nielsen et al., ICLR 2025) in megatron-core.

Modules:
  ac_stats      - the cluster statistics as pure tensor functions (spec §2.2, §3.1)
  settings      - ACSettings / EllipticalSettings and ROUTER_TABLE (no torch import)
  plugin        - the public API for any Megatron script: patch_block_spec, attach, add_arguments
  chunk_state   - ChunkState: a model chunk's per-micro-batch cross-layer state and its hooks
  routers       - ACRouter / CosineRouter / LabelSourceRouter, megatron ``TopKRouter`` subclasses
  baseline_routers - XMoE, StableMoE, USMoE, ETR routers
  labels        - a router's decision as the next AC layer needs it (top-1 expert per token)
  spec          - patches a megatron decoder block spec with our routers
  config        - YAML recipes -> megatron flags + AC settings (unknown keys are errors)
  cpu_runtime   - what megatron-core needs to run on CPU/gloo (applied only without CUDA)
  train         - model/data providers and the forward step for ``megatron.training.pretrain``
  megatron_args - recipe -> Megatron flags, and the checks made before any model is built
  run_hooks     - checkpoint retention, router-grad logging, fault-injection test hooks
  label_transport - AC labels across pipeline stages, beside megatron's activations
  metrics, observability - routing metrics and the extra TensorBoard scalars
  precision     - FP8 rules and the report of active fused paths
  launcher, slurm_launch, plot - the acmoe-pretrain, acmoe-launch and acmoe-plot commands
  eval_cli, evaluate - the acmoe-eval command and its worker (whole-split scores of a checkpoint)
  data          - tokenizers, corpora, webdataset shards, the bounded-memory resumable loader,
                  remote shards, megatron indexed data and blending
"""

__version__ = "0.1.0"
