"""acmoe-megatron: the Adaptive Clustering (AC) router (Nielsen et al., ICLR 2025) in megatron-core.

Sub-packages, by concern; a module imports only from its own layer or below (import-linter's
contracts in pyproject.toml, checked by ``make test``):

  cli/ | testing      the commands (acmoe-pretrain, acmoe-launch, acmoe-data, acmoe-eval, ...) and
                      the test helpers for plugin users
  plugin | inference/ the public API for any Megatron script (a facade); evaluation, generation,
                      calibration, the specialisation report and the Hugging Face export
  runtime/            the trainer: recipe loading, megatron argument mapping, run plan, trainer hooks
                      (one version-checked table), fault injection, checkpoint and resume checks,
                      the CPU/gloo runtime
  observability/      routing metrics, TensorBoard/W&B writers, figures, run summary, sample trace
  model/              the megatron boundary: routers, spec patch, ChunkState, label transport,
                      elliptical attention, expert norm, precision rules, model checks
  data/               corpora, webdataset token shards, megatron's indexed data, the resumable loader
  core/               settings, router registry, errors, layer arithmetic, AC statistics, labels
                      (no megatron import)
"""

__version__ = "0.1.0"
