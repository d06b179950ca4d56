"""One loader of a trained run, shared by evaluation, calibration, generation and the HF export:
the run's recipe, megatron initialised in this process group's layout, the model built by the
trainer's own model provider (``runtime/model_provider.py``: our routers, attached) and its
checkpoint loaded (model weights only, resharded from any saved layout), optionally with
calibrated AC tables installed.

megatron.training is imported when ``load_trained`` runs: the workers install the CPU runtime
first (``cpu_runtime.install_for_training``).
"""

from __future__ import annotations

import os
import sys

from acmoe_megatron.data.shards.manifest import read_manifest
from acmoe_megatron.inference import calibration as inference_stats
from acmoe_megatron.runtime.log_filters import quiet_library_warnings
from acmoe_megatron.runtime.megatron_args import build_argv
from acmoe_megatron.runtime.model_provider import make_model_provider
from acmoe_megatron.runtime.recipe import load_recipe
from acmoe_megatron.runtime.run_plan import parallel_layout


def load_trained(config: str, overrides: list[str], data: str, prog: str, stats_file: str | None = None):
    """(recipe, megatron args, model chunks in eval mode, iteration): a trained run's checkpoint
    loaded into this process group's layout (model weights only), megatron initialised, and with
    ``stats_file`` its calibrated AC tables installed (calibration.py). Call it inside
    ``cpu_runtime.device_redirect()``. Shared by the evaluation, generation and export workers."""
    quiet_library_warnings()
    from megatron.core.enums import ModelType
    from megatron.training import training
    from megatron.training.arguments import parse_and_validate_args
    from megatron.training.checkpointing import load_checkpoint


    recipe = load_recipe(config, overrides)
    for key in [k for k in recipe.megatron if k.startswith("wandb")]:
        del recipe.megatron[key]  # using a model is not a new W&B run
    recipe.megatron.update(no_load_optim=True, no_load_rng=True, exit_on_missing_checkpoint=True)
    parallel_layout(recipe.megatron, int(os.environ.get("WORLD_SIZE", "1")))
    sys.argv = [prog] + build_argv(recipe, read_manifest(data))
    args = parse_and_validate_args()
    training.initialize_megatron()
    model = training.get_model(make_model_provider(recipe), ModelType.encoder_or_decoder, wrap_with_ddp=False)
    iteration, _ = load_checkpoint(model, None, None)
    for chunk in model:
        chunk.eval()
    if stats_file:
        inference_stats.install(model, inference_stats.load(stats_file)[0])
    return recipe, args, model, iteration
