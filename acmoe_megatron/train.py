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

from acmoe_megatron import cpu_runtime


EXIT_NONFINITE = 16  # megatron's rerun state machine: reproducible NaN/Inf, checkpoint saved, exit


def _early_runtime():
    cpu_runtime.install()
    cpu_runtime.install_training()
    return cpu_runtime.install_wheel_fixes()


def build_argv(recipe, manifest) -> list[str]:
    """Megatron flags for a recipe: its ``megatron`` section + run paths + data-derived flags."""
    from acmoe_megatron.config import ConfigError, megatron_argv

    mg = dict(recipe.megatron)
    run_dir = Path(recipe.run.dir)
    mg.setdefault("tensorboard_dir", str(run_dir / "tensorboard"))
    mg.setdefault("save", str(run_dir / "checkpoints"))
    mg.setdefault("load", mg["save"])
    mg.setdefault("dataloader_type", "external")
    if mg["dataloader_type"] != "external":
        raise ConfigError("megatron.dataloader_type must be 'external': data comes from data.path shards")
    seq = manifest.seq_length
    if mg.setdefault("seq_length", seq) != seq:
        raise ConfigError(
            f"megatron.seq_length={mg['seq_length']} but the shards in {recipe.data.path} hold "
            f"{seq}-token samples; re-run `acmoe-data prepare --seq-length {mg['seq_length']}` "
            "or change megatron.seq_length"
        )
    mg.setdefault("max_position_embeddings", seq)
    mg.setdefault("tokenizer_type", "NullTokenizer")
    vocab = manifest.tokenizer["vocab_size"]
    if mg["tokenizer_type"] == "NullTokenizer":
        if mg.setdefault("vocab_size", vocab) != vocab:
            raise ConfigError(
                f"megatron.vocab_size={mg['vocab_size']} but the shard manifest says {vocab} "
                f"(tokenizer {manifest.tokenizer['name']}); remove the key or fix it"
            )
    return megatron_argv(mg)


def validate_args(args, recipe) -> None:
    """Checks megatron does not make, before any model is built."""
    from acmoe_megatron.config import ConfigError
    from acmoe_megatron.spec import moe_layer_numbers

    if not args.num_experts:
        raise ConfigError("megatron.num_experts is not set: ACMoE needs an MoE model")
    if args.moe_router_topk > args.num_experts:
        raise ConfigError(
            f"megatron.moe_router_topk={args.moe_router_topk} > num_experts={args.num_experts}"
        )
    if args.num_experts % args.expert_model_parallel_size:
        raise ConfigError(
            f"megatron.num_experts={args.num_experts} is not divisible by "
            f"expert_model_parallel_size={args.expert_model_parallel_size}"
        )

    class _Shape:  # what spec.moe_layer_numbers reads
        num_layers = args.num_layers
        moe_layer_freq = args.moe_layer_freq
        num_moe_experts = args.num_experts

    n_moe = len(moe_layer_numbers(_Shape))
    if recipe.acmoe.router != "topk" and recipe.acmoe.first_ac_layer > n_moe:
        raise ConfigError(
            f"acmoe.first_ac_layer={recipe.acmoe.first_ac_layer} but the model has only {n_moe} MoE "
            f"layers; choose 1..{n_moe} (the paper uses 3 with 6 MoE layers)"
        )
    if recipe.acmoe.router != "topk" and getattr(args, "moe_router_force_load_balancing", False):
        raise ConfigError(
            "megatron.moe_router_force_load_balancing replaces router logits by random ones, which "
            f"makes acmoe.router={recipe.acmoe.router} meaningless; use acmoe.router=topk for that benchmark"
        )
    decay = args.lr_decay_iters or args.train_iters
    if args.train_iters and args.lr_warmup_iters >= decay:
        raise ConfigError(
            f"megatron.lr_warmup_iters={args.lr_warmup_iters} must be smaller than the decay length "
            f"{decay} (lr_decay_iters, or train_iters when unset)"
        )
    from acmoe_megatron.precision import check_fp8, have_nvidia_apex, have_transformer_engine

    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    try:
        check_fp8(args.fp8, args.fp8_recipe, have_transformer_engine(), capability)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if (
        torch.cuda.is_available()
        and args.transformer_impl == "local"
        and not args.no_persist_layer_norm
        and not have_nvidia_apex()
    ):
        raise ConfigError(
            "megatron's local layers use torch's LayerNorm here (no NVIDIA Apex), which cannot "
            "persist: set megatron.no_persist_layer_norm: true, or install Apex / use "
            "transformer_impl: transformer_engine"
        )
    if not torch.cuda.is_available():
        needs = {
            "distributed_backend": ("gloo", args.distributed_backend),
            "transformer_impl": ("local", args.transformer_impl),
            "use_cpu_initialization": (True, args.use_cpu_initialization),
            "bf16": (False, args.bf16),
            "fp16": (False, args.fp16),
            "fp8": (None, args.fp8),
        }
        wrong = {k: v for k, v in needs.items() if v[0] != v[1]}
        if wrong:
            fixes = ", ".join(f"megatron.{k}: {v[0]} (is {v[1]})" for k, v in wrong.items())
            raise ConfigError(f"no CUDA GPU here, so this recipe cannot run; set {fixes}")


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
            normalization=args.normalization, vp_stage=vp_stage,
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
            _log_router_grad_norms(model, Path(recipe.run.dir))
        return forward_step(data_iterator, model)

    return step


def _log_router_grad_norms(model, run_dir: Path) -> None:
    """Wrap megatron's finalize_model_grads (once) to append each step's reduced router gradient
    norms, by global layer number, to ``run_dir/router_grad_norms_rank<R>.jsonl`` (for parity
    checks across parallel layouts)."""
    import json

    from megatron.core.transformer.moe.router import TopKRouter

    from acmoe_megatron.labels import unwrap_chunk

    config = unwrap_chunk(model).config
    finalize = config.finalize_model_grads_func
    if finalize is None or getattr(finalize, "_acmoe_logged", False):
        return
    path = run_dir / f"router_grad_norms_rank{torch.distributed.get_rank()}.jsonl"
    steps = [0]

    def logged(chunks, *args, **kwargs):
        out = finalize(chunks, *args, **kwargs)
        steps[0] += 1
        norms = {}
        for chunk in chunks:
            for module in chunk.modules():
                if isinstance(module, TopKRouter):
                    grad = getattr(module.weight, "main_grad", None)
                    grad = module.weight.grad if grad is None else grad
                    norms[module.layer_number] = None if grad is None else grad.float().norm().item()
        with path.open("a") as f:
            f.write(json.dumps({"step": steps[0], "norms": norms}) + "\n")
        return out

    logged._acmoe_logged = True
    config.finalize_model_grads_func = logged


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
        if transport is not None:
            transport.receive(carrier, carrier.vp_stage, _local_tokens(tokens), tokens.device)
    output = model(tokens, position_ids, None, labels=labels)
    output = _maybe_inject_nan(output)
    if carrier is not None:
        if transport is not None:
            transport.send(carrier, carrier.vp_stage, _local_tokens(tokens), tokens.device)
        if torch.is_grad_enabled():
            output = mark_backward(output, carrier, mb)  # recompute replays find this micro-batch
    return output, partial(loss_func, loss_mask)


def _maybe_inject_nan(output: torch.Tensor) -> torch.Tensor:
    """Test hook: ``ACMOE_FAULT_NAN_AT_ITER=k`` makes the loss of training iteration k NaN."""
    at = os.environ.get("ACMOE_FAULT_NAN_AT_ITER")
    if not at or not torch.is_grad_enabled():
        return output
    from megatron.training import get_args

    if get_args().curr_iteration + 1 == int(at):
        return output * float("nan")
    return output


def _local_tokens(tokens: torch.Tensor) -> int:
    """Tokens a router of this rank sees per micro-batch: b × s / (TP if SP) / CP."""
    from megatron.core import parallel_state
    from megatron.training import get_args

    args = get_args()
    n = tokens.numel() // parallel_state.get_context_parallel_world_size()
    if args.sequence_parallel:
        n //= parallel_state.get_tensor_model_parallel_world_size()
    return n


def _install_fault_injection() -> None:
    """Test hook: ``ACMOE_FAULT_SAVE_DELAY_S=<s>`` sleeps after a checkpoint's shards are written
    and before megatron records it in ``latest_checkpointed_iteration.txt`` — the window in which
    a kill must leave the previous checkpoint as the one to resume from (tests/test_reliability)."""
    delay = float(os.environ.get("ACMOE_FAULT_SAVE_DELAY_S", "0") or 0)
    only = os.environ.get("ACMOE_FAULT_SAVE_ITER")  # e.g. "4": only the save of iter_0000004
    if delay <= 0:
        return
    import megatron.core.dist_checkpointing as dist_checkpointing

    save = dist_checkpointing.save

    def slow_save(sharded_state_dict, checkpoint_dir, *args, **kwargs):
        out = save(sharded_state_dict, checkpoint_dir, *args, **kwargs)
        if only and not str(checkpoint_dir).rstrip("/").endswith(f"iter_{int(only):07d}"):
            return out
        print(f"[acmoe] fault injection: checkpoint shards written, sleeping {delay} s before the "
              "tracker update", flush=True)
        time.sleep(delay)
        return out

    dist_checkpointing.save = slow_save


def install_checkpoint_retention(keep_last: int) -> None:
    """Keep only the newest ``keep_last`` checkpoints: after megatron's save_checkpoint returns (the
    tracker names the new one), rank 0 deletes older ``iter_*`` directories. A directory newer than
    the tracker (a save still in flight) and the tracked one are never touched."""
    if keep_last <= 0:
        return
    import shutil

    import megatron.training.training as training
    from megatron.training import get_args

    save = training.save_checkpoint

    def save_and_prune(*args, **kwargs):
        out = save(*args, **kwargs)
        margs = get_args()
        if torch.distributed.get_rank() == 0 and margs.save:
            root = Path(margs.save)
            tracker = root / "latest_checkpointed_iteration.txt"
            if tracker.is_file() and tracker.read_text().strip().isdigit():
                latest = int(tracker.read_text().strip())
                done = sorted(int(d.name[5:]) for d in root.glob("iter_*") if d.name[5:].isdigit()
                              and int(d.name[5:]) <= latest)
                for it in done[:-keep_last]:
                    shutil.rmtree(root / f"iter_{it:07d}", ignore_errors=True)
        return out

    training.save_checkpoint = save_and_prune


def check_world_size(recipe, world: int | None = None) -> None:
    """Parallel sizes must tile the processes: clear error before megatron's assertions."""
    from acmoe_megatron.config import ConfigError

    world = int(os.environ.get("WORLD_SIZE", "1")) if world is None else world
    mg = recipe.megatron
    tp, pp = int(mg.get("tensor_model_parallel_size") or 1), int(mg.get("pipeline_model_parallel_size") or 1)
    cp, ep = int(mg.get("context_parallel_size") or 1), int(mg.get("expert_model_parallel_size") or 1)
    etp = int(mg.get("expert_tensor_parallel_size") or tp)
    if world % (tp * pp * cp):
        raise ConfigError(
            f"{world} processes cannot be split into tensor {tp} x pipeline {pp} x context {cp} "
            f"(= {tp * pp * cp}) model-parallel groups: use a multiple of {tp * pp * cp} processes "
            "or change megatron.tensor/pipeline/context_model_parallel_size"
        )
    if world % (etp * ep * pp):
        raise ConfigError(
            f"{world} processes cannot hold expert parallel {ep} x expert-tensor {etp} x pipeline {pp}: "
            "use a multiple of their product, or change megatron.expert_model_parallel_size"
        )


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
    from acmoe_megatron import observability

    metrics_registry: list = []
    observability.install(metrics_registry)
    _install_fault_injection()
    install_checkpoint_retention(recipe.run.keep_last_checkpoints)
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
