"""ACMoE pretraining through Megatron's own trainer (``megatron.training.pretrain``).

This is the per-process worker that ``torchrun`` starts; ``acmoe-pretrain`` (launcher.py) and
``launch/pretrain.py`` wrap it. It reads a YAML recipe (config.py), turns its ``megatron`` section
into Megatron's flags, adds the run paths (``--tensorboard-dir``, ``--save``/``--load``) and the
data/tokenizer flags derived from the shard manifest, and hands Megatron three functions:

  model_provider   megatron's GPTModel with the AC routers patched into its block spec (spec.py)
  data provider    webdataset token shards, split by megatron's data-parallel rank (data/)
  forward_step     GPT forward + the masked LM loss in Megatron's (sum, tokens, report) form

Users keep every Megatron flag (``torch_dist`` checkpoints, ``--exit-signal-handler``, logging).

Examples::

    # 2 processes, expert parallel 2, CPU/gloo (what `make quickstart` runs)
    torchrun --nproc_per_node 2 -m acmoe_megatron.train --config configs/tiny_cpu.yaml
    # same, overriding settings from the command line
    torchrun --nproc_per_node 2 launch/pretrain.py --config configs/tiny_cpu.yaml \\
        megatron.train_iters=50 acmoe.first_ac_layer=2 run.dir=runs/try
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial
from pathlib import Path

import torch

from acmoe_megatron import cpu_runtime, run_hooks
from acmoe_megatron.megatron_args import build_argv, check_world_size, validate_args


EXIT_NONFINITE = 16  # megatron's rerun state machine: reproducible NaN/Inf, checkpoint saved, exit


def _early_runtime():
    cpu_runtime.install()
    cpu_runtime.install_training()
    return cpu_runtime.install_wheel_fixes()


def make_model_provider(recipe, metrics_registry: list | None = None):
    def model_provider(pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None):
        from megatron.core.models.gpt import GPTModel
        from megatron.training import get_args
        from megatron.training.arguments import core_transformer_config_from_args

        from acmoe_megatron.label_transport import LabelTransport
        from acmoe_megatron.spec import acmoe_block_spec

        args = get_args()
        if config is None:
            config = core_transformer_config_from_args(args)
        spec, carrier = acmoe_block_spec(
            config, recipe.acmoe, use_transformer_engine=args.transformer_impl == "transformer_engine",
            normalization=args.normalization, vp_stage=vp_stage, vocab_size=args.padded_vocab_size,
            elliptical=recipe.elliptical,
        )
        model = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=args.padded_vocab_size,
            max_sequence_length=args.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            fp16_lm_cross_entropy=args.fp16_lm_cross_entropy,
            parallel_output=True,
            share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
            position_embedding_type=args.position_embedding_type,
            rotary_percent=args.rotary_percent,
            rotary_base=args.rotary_base,
            vp_stage=vp_stage,
            pg_collection=pg_collection,
        )
        model.acmoe_labels = carrier
        if carrier is not None and carrier.metrics is not None and metrics_registry is not None:
            metrics_registry.append(carrier.metrics)
        if carrier is not None:
            if "transport" not in transport_holder:  # collective: all ranks build models together
                transport_holder["transport"] = LabelTransport.create(args.virtual_pipeline_model_parallel_size)
            model.acmoe_transport = transport_holder["transport"]
        return model

    transport_holder = {}
    return model_provider


class RepeatingValidation:
    """Validation stream: the same first ``micro_batches`` micro-batches of this rank, every time.

    Megatron keeps one validation iterator for the whole run and draws ``eval_iters`` ×
    micro-batches-per-step from it at every evaluation; restarting after exactly that many makes
    every evaluation score the same, deterministic samples (the first eval_iters × global batch
    samples of the valid split, in order).
    """

    def __init__(self, factory, micro_batches: int):
        self.factory, self.micro_batches = factory, micro_batches
        self._it, self._n = None, 0

    def __iter__(self):
        return self

    def __next__(self):
        if self._it is None or self._n == self.micro_batches:
            self._it, self._n = iter(self.factory()), 0
        self._n += 1
        return next(self._it)


def make_datasets_provider(recipe):
    def provider(train_val_test_num_samples, vp_stage=None):
        from megatron.core import parallel_state
        from megatron.training import get_args

        from acmoe_megatron.data.loader import TokenBatches

        args = get_args()
        dp_rank = parallel_state.get_data_parallel_rank()
        dp_size = parallel_state.get_data_parallel_world_size()
        common = dict(micro_batch_size=args.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size)
        train = TokenBatches(
            recipe.data.path, "train", seed=recipe.data.seed, shuffle=True, infinite=True,
            consumed_samples=args.consumed_train_samples,
            verify_checksums=recipe.data.verify_checksums, seq_length=args.seq_length, **common,
        )
        micro_per_step = args.global_batch_size // (args.micro_batch_size * dp_size)
        valid = RepeatingValidation(
            partial(TokenBatches, recipe.data.path, "valid", seed=0, shuffle=False, infinite=True,
                    verify_checksums=False, **common),
            micro_batches=max(args.eval_iters, 1) * micro_per_step,
        )
        return train, valid, None

    provider.is_distributed = True  # every rank builds its own reader (split by DP rank)
    return provider


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Masked token cross-entropy in Megatron's per-token form: (sum, #tokens, report)."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.cat([loss.detach().clone().view(1), num_tokens.detach().clone().view(1).float()])
    return loss, num_tokens, {"lm loss": report}


def make_forward_step(recipe):
    def step(data_iterator, model):
        if recipe.run.log_router_grad_norms:
            run_hooks.log_router_grad_norms(model, Path(recipe.run.dir))
        return forward_step(data_iterator, model)

    return step


def forward_step(data_iterator, model):
    """One micro-batch: labels in from the previous stage, GPT forward, labels out to the next."""
    from acmoe_megatron.labels import carrier_of, mark_backward, unwrap_chunk

    batch = next(data_iterator)
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    tokens = batch["tokens"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    loss_mask = batch["loss_mask"].to(device, non_blocking=True)
    position_ids = batch["position_ids"].to(device, non_blocking=True)
    carrier = carrier_of(model)
    transport = getattr(unwrap_chunk(model), "acmoe_transport", None)
    if carrier is not None:
        mb = carrier.begin_forward(training=torch.is_grad_enabled())
        _record_step_inputs(carrier, tokens)
        if transport is not None:
            transport.receive(carrier, carrier.vp_stage, _local_tokens(tokens), tokens.device)
    output = model(tokens, position_ids, None, labels=labels)
    output = run_hooks.maybe_inject_nan(output)
    if carrier is not None:
        if transport is not None:
            transport.send(carrier, carrier.vp_stage, _local_tokens(tokens), tokens.device)
        if torch.is_grad_enabled():
            output = mark_backward(output, carrier, mb)  # recompute replays find this micro-batch
    return output, partial(loss_func, loss_mask)


def _record_step_inputs(carrier, tokens: torch.Tensor) -> None:
    """Token ids and progress for routers that route by token id (StableMoE's distilled router)."""
    from megatron.training import get_args

    from acmoe_megatron.step_inputs import put_tokens

    inputs = getattr(carrier, "step_inputs", None)
    if inputs is None:
        return
    args = get_args()
    iteration = getattr(args, "curr_iteration", None)
    inputs.set_progress(args.iteration if iteration is None else iteration, args.train_iters)
    put_tokens(carrier, tokens)


def _local_tokens(tokens: torch.Tensor) -> int:
    """Tokens a router of this rank sees per micro-batch: b × s / (TP if SP) / CP."""
    from megatron.core import parallel_state
    from megatron.training import get_args

    args = get_args()
    n = tokens.numel() // parallel_state.get_context_parallel_world_size()
    if args.sequence_parallel:
        n //= parallel_state.get_tensor_model_parallel_world_size()
    return n


def parse_cli(argv=None):
    parser = argparse.ArgumentParser(
        prog="acmoe-train", description="ACMoE pretraining worker (run under torchrun)"
    )
    parser.add_argument("--config", required=True, help="YAML recipe (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="SECTION.KEY=VALUE overrides")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    fixes = _early_runtime()
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from megatron.core.enums import ModelType
    from megatron.training import get_args
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args
    from megatron.training.training import pretrain

    from acmoe_megatron.config import load_recipe
    from acmoe_megatron.data.manifest import read_manifest
    from acmoe_megatron.precision import fused_paths
    from acmoe_megatron.summary import write_summary

    cli = parse_cli(argv)
    recipe = load_recipe(cli.config, cli.overrides)
    check_world_size(recipe)
    manifest = read_manifest(recipe.data.path)
    sys.argv = ["acmoe-train"] + build_argv(recipe, manifest)
    args = parse_and_validate_args()
    validate_args(args, recipe)
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(f"[acmoe] runtime shims: {cpu_runtime.APPLIED + fixes or 'none (CUDA present)'}", flush=True)
        print(f"[acmoe] router: {recipe.acmoe}", flush=True)
        print(f"[acmoe] fused paths: {fused_paths(args)}", flush=True)
    from acmoe_megatron import baseline_routers, observability

    metrics_registry: list = []
    observability.install(metrics_registry, extra_moe_losses=baseline_routers.router_losses(recipe.acmoe.router))
    run_hooks.install_fault_injection()
    run_hooks.install_checkpoint_retention(recipe.run.keep_last_checkpoints)
    if recipe.acmoe.expert_norm is not None:
        run_hooks.install_expert_norm()
    start = time.time()
    stopped_early = False
    nonfinite_exit = None
    try:
        pretrain(
            pretrain_cfg_container_from_args(args),
            make_datasets_provider(recipe),
            ModelType.encoder_or_decoder,
            make_forward_step(recipe),
            model_provider=make_model_provider(recipe, metrics_registry),
        )
    except SystemExit as exc:  # megatron's early exits: signal handler, exit interval/duration
        if exc.code == EXIT_NONFINITE:
            nonfinite_exit = exc
        elif exc.code not in (0, None):
            raise
        stopped_early = True
    wall = time.time() - start
    args = get_args()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    if rank == int(os.environ.get("WORLD_SIZE", "1")) - 1:  # megatron's TensorBoard writer rank
        if nonfinite_exit is not None:
            from megatron.training.global_vars import get_tensorboard_writer

            writer = get_tensorboard_writer()
            if writer is not None:
                writer.add_scalar("faults/nonfinite_loss_or_grad", 1.0, args.curr_iteration + 1)
                writer.flush()
        path = write_summary(recipe, args, manifest, wall_time_s=wall, runtime_shims=cpu_runtime.APPLIED + fixes,
                             stopped_early=stopped_early, nonfinite=nonfinite_exit is not None)
        print(f"[acmoe] run summary: {path}", flush=True)
    if nonfinite_exit is not None:
        if rank == 0:
            print(f"[acmoe] non-finite loss or gradient at iteration {args.curr_iteration + 1}: megatron re-ran "
                  "the step, found it reproducible, saved the state before that step and stopped. The "
                  "latest checkpoint is the last good one; inspect the data/learning rate, then resume.",
                  flush=True)
        raise nonfinite_exit
    if stopped_early and rank == 0:
        print("[acmoe] stopped before train_iters (signal, exit interval or time budget); the latest "
              "checkpoint is complete: start the same command again to resume", flush=True)


if __name__ == "__main__":
    main()
