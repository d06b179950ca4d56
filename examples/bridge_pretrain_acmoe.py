"""Pretrain with the AC router through Megatron-Bridge: one of Bridge's own recipes, Bridge's ``pretrain``.

What a Megatron-Bridge user writes to try the AC router: take a Bridge recipe (default: its
``vanilla_gpt_pretrain_config``, the recipe Bridge keeps for Megatron-LM correlation), apply
Bridge's own Hydra-style overrides (``model.num_moe_experts=8 train.train_iters=100 ...``), and add
two calls of ``acmoe_megatron.plugin``:

  model.transformer_layer_spec = plugin.bridge_layer_spec(settings)   our routers in the MoE layers
  model.register_pre_wrap_hook(plugin.pre_wrap_hook())                the per-micro-batch state

(``--model-api config`` builds megatron's ``GPTModelConfig`` from the recipe's provider instead, the
API that replaces Bridge's deprecated providers: the same spec, and ``pre_wrap_hooks.append``). The
``--acmoe-*`` flags are the plugin's (``plugin.add_arguments``); with ``--acmoe-expert-norm`` a Bridge
callback keeps the AC embedding rows at their norm after every optimizer step.

Data: megatron indexed data, as Bridge's recipes take it (``--data-path [w1] PREFIX1 [w2] PREFIX2 ...``
and ``--split``, megatron's own format; ``acmoe-data to-megatron`` converts our shards), or
``--mock-data``.

Without CUDA (CPU/gloo), ``cpu_runtime.install_bridge()`` applies the Bridge shims of the CPU runtime
(``cpu_runtime.SHIMS`` stage "bridge", listed in the log and in ``acmoe_summary.json``) and the run
gets ``CPU_OVERRIDES`` before the user's overrides (gloo, fp32, megatron's local modules); with
CUDA nothing of either is applied.

Example (2 processes on CPU, expert parallel 2)::

    torchrun --nproc_per_node 2 examples/bridge_pretrain_acmoe.py --data-path data/stdlib_idx/train_text_document \\
        --split 100,0,0 --acmoe-router ac --acmoe-first-ac-layer 2 \\
        model.num_layers=4 model.hidden_size=64 model.num_attention_heads=4 model.ffn_hidden_size=128 \\
        model.num_moe_experts=4 model.moe_router_topk=2 model.expert_model_parallel_size=2 \\
        model.add_bias_linear=false model.seq_length=64 dataset.seq_length=64 tokenizer.vocab_size=257 \\
        train.train_iters=20 train.global_batch_size=8 train.micro_batch_size=4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

import torch

from acmoe_megatron import plugin
from acmoe_megatron.runtime import cpu_runtime

# Bridge settings a CPU/gloo run needs; applied before the user's overrides, and only without CUDA.
CPU_OVERRIDES = [
    "dist.distributed_backend=gloo", "mixed_precision=null", "model.bf16=false", "optimizer.bf16=false",
    "model.transformer_impl=local", "model.use_cpu_initialization=true", "model.persist_layer_norm=false",
    "model.gradient_accumulation_fusion=false", "model.masked_softmax_fusion=false",
    "model.bias_activation_fusion=false", "model.bias_dropout_fusion=false", "model.apply_rope_fusion=false",
    "ddp.use_distributed_optimizer=false", "optimizer.use_distributed_optimizer=false",
    "dataset.num_workers=0", "dataset.pin_memory=false",
]


def parse(argv=None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog="Other arguments are Bridge overrides: section.key=value")
    parser.add_argument("--recipe", default="vanilla_gpt_pretrain_config",
                        help="a recipe function of megatron.bridge.recipes (default: %(default)s)")
    parser.add_argument("--model-api", choices=("provider", "config"), default="provider",
                        help="provider: Bridge's GPTModelProvider (register_pre_wrap_hook); config: megatron's "
                             "GPTModelConfig built from it (pre_wrap_hooks)")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--data-path", nargs="+", help="megatron indexed data: [weight] PREFIX ...")
    data.add_argument("--mock-data", action="store_true", help="megatron's MockGPTDataset")
    parser.add_argument("--split", default="98,2,0", help="train,valid,test split of --data-path")
    parser.add_argument("--summary", type=Path, help="where rank 0 writes acmoe_summary.json (default: next to "
                                                     "the TensorBoard directory)")
    plugin.add_arguments(parser)
    args, overrides = parser.parse_known_args(argv)
    unknown = [o for o in overrides if o.startswith("-") or "=" not in o]
    if unknown:
        parser.error(f"unrecognised arguments {unknown}: Bridge overrides look like section.key=value")
    return args, overrides


def as_model_config(provider):
    """megatron's ``GPTModelConfig`` holding the same ``TransformerConfig`` fields and GPT fields as
    Bridge's ``GPTModelProvider`` (what Bridge's deprecation notice points to)."""
    from megatron.bridge.models.gpt.gpt_builder import GPTModelConfig
    from megatron.bridge.models.transformer_config import TransformerConfig

    def values(cls, skip=()):
        return {f.name: getattr(provider, f.name) for f in dataclasses.fields(cls)
                if f.init and f.name not in skip and hasattr(provider, f.name)}

    transformer = TransformerConfig(**values(TransformerConfig))
    gpt = values(GPTModelConfig, skip={"transformer", "transformer_layer_spec", "pre_wrap_hooks", "post_wrap_hooks"})
    gpt = {k: v for k, v in gpt.items() if k not in {f.name for f in dataclasses.fields(TransformerConfig)}}
    model_config = GPTModelConfig(transformer=transformer, **gpt)
    # Bridge 0.6.2's setup -> set_jit_fusion_options -> _warmup_jit_function reads ``seq_length`` from
    # ``GPTModelConfig.transformer``, which has no such field (the GPTModelConfig holds it): without this
    # line every GPTModelConfig pretraining stops there with AttributeError, on GPUs as on the CPU.
    transformer.seq_length = model_config.seq_length
    return model_config


def build_config(args, overrides):
    """Bridge's recipe with the CPU overrides (no CUDA), the user's overrides, the data and our router."""
    import megatron.bridge.recipes as recipes
    from megatron.bridge.training.config import GPTDatasetConfig, MockGPTDatasetConfig
    from megatron.bridge.training.utils.omegaconf_utils import process_config_with_overrides

    settings, elliptical = plugin.settings_from_args(args)
    recipe = getattr(recipes, args.recipe, None)
    if recipe is None:
        raise SystemExit(f"--recipe {args.recipe}: megatron.bridge.recipes has no such recipe function")
    cfg = recipe()
    cpu = CPU_OVERRIDES if cpu_runtime.cpu_only() else []
    cfg = process_config_with_overrides(cfg, cli_overrides=cpu + overrides)

    seq, seed = cfg.model.seq_length, cfg.rng.seed
    common = dict(seq_length=seq, random_seed=seed, reset_position_ids=False, reset_attention_mask=False,
                  eod_mask_loss=False, dataloader_type="single", num_workers=cfg.dataset.num_workers,
                  pin_memory=cfg.dataset.pin_memory)
    if args.mock_data:
        cfg.dataset = MockGPTDatasetConfig(**common)
    else:
        from megatron.core.datasets.utils import get_blend_from_list

        cfg.dataset = GPTDatasetConfig(blend=get_blend_from_list(args.data_path), split=args.split, **common)

    if args.model_api == "config":
        cfg.model = as_model_config(cfg.model)
        cfg.model.pre_wrap_hooks.append(plugin.pre_wrap_hook())
    else:
        cfg.model.register_pre_wrap_hook(plugin.pre_wrap_hook())
    cfg.model.transformer_layer_spec = plugin.bridge_layer_spec(settings, elliptical)
    return cfg, settings


def expert_norm_callback():
    """A Bridge callback that holds the AC embedding rows at their norm after every optimizer step."""
    from megatron.bridge.training.callbacks import Callback

    from acmoe_megatron.model import expert_norm

    class ExpertNorm(Callback):
        def on_train_start(self, context):
            held = expert_norm.install(context.optimizer, context.model)
            if torch.distributed.get_rank() == 0:
                print(f"[acmoe] {held} AC expert embeddings held at their row norm after every optimizer step",
                      flush=True)

    return ExpertNorm()


def write_summary(cfg, args, shims: list[str]) -> None:
    path = args.summary or Path(cfg.logger.tensorboard_dir or ".").parent / "acmoe_summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"recipe": args.recipe, "model_api": args.model_api,
                                "bridge_version": cpu_runtime.bridge_version(),
                                "megatron_core_version": cpu_runtime.megatron_version(),
                                "runtime_shims": shims}, indent=2) + "\n")


def main(argv=None, forward_step=None):
    """``forward_step``: a factory of the forward step, called after Bridge is importable (default:
    Bridge's own ``gpt_step.forward_step``)."""
    args, overrides = parse(argv)
    # Bridge logs a traceback at INFO for every optional Transformer Engine name it probes and lacks (its
    # module sets that logger to INFO when imported, so a filter, which survives that, keeps them out)
    logging.getLogger("megatron.bridge.utils.import_utils").addFilter(lambda record: record.levelno >= logging.WARNING)
    fixes = cpu_runtime.install_for_training()
    fixes += cpu_runtime.install_bridge()  # before megatron.bridge is imported
    from megatron.bridge.training.gpt_step import forward_step as gpt_forward_step
    from megatron.bridge.training.pretrain import pretrain

    cfg, settings = build_config(args, overrides)
    callbacks = [expert_norm_callback()] if settings.expert_norm is not None else []
    with cpu_runtime.device_redirect():  # CPU only: megatron's device="cuda" requests go to the CPU
        shims = cpu_runtime.active() + [f for f in fixes if f not in cpu_runtime.APPLIED]
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"[acmoe] runtime shims: {shims or 'none (CUDA present)'}", flush=True)
            write_summary(cfg, args, shims)
        pretrain(cfg, forward_step() if forward_step else gpt_forward_step, callbacks=callbacks)


if __name__ == "__main__":
    sys.exit(main())
