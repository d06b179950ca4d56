"""ACMoE pretraining through Megatron's own trainer (``megatron.training.pretrain``).

This is the per-process worker that ``torchrun`` starts; ``acmoe-pretrain`` (cli/pretrain.py) and
``launch/pretrain.py`` wrap it. It reads a YAML recipe (runtime/recipe.py), turns its ``megatron`` section
into Megatron's flags, adds the run paths (``--tensorboard-dir``, ``--save``/``--load``) and the
data/tokenizer flags derived from the shard manifest, and hands Megatron three functions:

  model_provider   megatron's GPTModel with the AC routers patched into its block spec, attached
                   (runtime/model_provider.py: what any Megatron script can do with plugin.py)
  data provider    webdataset token shards, split by megatron's data-parallel rank (data/)
  forward_step     GPT forward + the masked LM loss in Megatron's (sum, tokens, report) form
                   (runtime/forward_step.py)

Users keep every Megatron flag (``torch_dist`` checkpoints, ``--exit-signal-handler``, logging).

Examples::

    # 2 processes, expert parallel 2, CPU/gloo (what `make quickstart` runs)
    torchrun --nproc_per_node 2 -m acmoe_megatron.runtime.train --config configs/tiny_cpu.yaml
    # same, overriding settings from the command line
    torchrun --nproc_per_node 2 launch/pretrain.py --config configs/tiny_cpu.yaml \\
        megatron.train_iters=50 acmoe.first_ac_layer=2 run.dir=runs/try
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from acmoe_megatron.core.exit_codes import EXIT_NONFINITE
from acmoe_megatron.core.settings import router_class
from acmoe_megatron.data.megatron.blend_provider import shard_blend_datasets_provider
from acmoe_megatron.data.megatron.indexed_provider import megatron_gpt_datasets_provider
from acmoe_megatron.data.megatron.keys import uses_megatron_data
from acmoe_megatron.data.megatron.shard_provider import shard_datasets_provider
from acmoe_megatron.data.shards.manifest import read_manifest
from acmoe_megatron.model.precision import fused_paths
from acmoe_megatron.observability.summary import write_summary
from acmoe_megatron.runtime import cpu_runtime, faults
from acmoe_megatron.runtime import hooks as run_hooks
from acmoe_megatron.runtime.forward_step import make_forward_step
from acmoe_megatron.runtime.heartbeat import Heartbeat, install_heartbeat_marks, start_heartbeat
from acmoe_megatron.runtime.lifetime import die_with_parent
from acmoe_megatron.runtime.log_filters import quiet_library_warnings
from acmoe_megatron.runtime.megatron_args import build_argv, validate_args
from acmoe_megatron.runtime.model_provider import make_model_provider
from acmoe_megatron.runtime.recipe import load_recipe
from acmoe_megatron.runtime.run_plan import megatron_data_standin, parallel_layout


def _early_runtime():
    return cpu_runtime.install_for_training()


def make_datasets_provider(recipe):
    """The data source megatron_args.build_argv chose: megatron's indexed data (megatron.data_path,
    train_data_path, ...: megatron's GPTDataset), data.blend (our shard directories through megatron's
    blending), else the data.path shards through our iterators."""

    if uses_megatron_data(recipe.megatron):
        return megatron_gpt_datasets_provider
    if recipe.data.blend:
        return shard_blend_datasets_provider(recipe.data.blend, recipe.data.seed)

    return shard_datasets_provider(recipe.data.path, recipe.data.seed, recipe.data.verify_checksums,
                                   recipe.data.shuffle_window, recipe.data.cache_dir)


def install_run_hooks(recipe, beat: Heartbeat | None = None) -> None:
    """The trainer's hooks on megatron's training loop (runtime/hooks.py), as every run gets them
    (the preflight's shrunk run included); ``beat``: this process's heartbeat (hang detection)."""
    run_hooks.install_training_metrics(
        extra_moe_losses=router_class(recipe.acmoe.router).reported_losses, peak_tflops=recipe.run.peak_tflops,
        per_expert_max=recipe.run.per_expert_scalars_max, image_interval=recipe.run.image_interval)
    faults.install_fault_injection()
    faults.install_file_size_fault()
    if recipe.run.checkpoint_checksums:
        run_hooks.install_checkpoint_checksums()
    run_hooks.install_checkpoint_retention(recipe.run.keep_last_checkpoints)
    run_hooks.install_disk_full_exit(Path(recipe.run.dir))
    if recipe.acmoe.expert_norm is not None:
        run_hooks.install_expert_norm()
    if beat is not None:
        install_heartbeat_marks(beat)


def parse_cli(argv=None):
    parser = argparse.ArgumentParser(
        prog="acmoe-train", description="ACMoE pretraining worker (run under torchrun)"
    )
    parser.add_argument("--config", required=True, help="YAML recipe (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="SECTION.KEY=VALUE overrides")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    die_with_parent()  # a killed torchrun / launcher takes this worker with it (runtime/lifetime.py)
    fixes = _early_runtime()
    quiet_library_warnings()
    from megatron.core.enums import ModelType
    from megatron.training import get_args
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args
    from megatron.training.training import pretrain

    cli = parse_cli(argv)
    recipe = load_recipe(cli.config, cli.overrides)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    parallel_layout(recipe.megatron, world)

    manifest = megatron_data_standin(recipe) if uses_megatron_data(recipe.megatron) else read_manifest(recipe.data.path)
    sys.argv = ["acmoe-train"] + build_argv(recipe, manifest)
    args = parse_and_validate_args()
    validate_args(args, recipe)
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(f"[acmoe] router: {recipe.acmoe}", flush=True)
        print(f"[acmoe] fused paths: {fused_paths(args)}", flush=True)

    beat = start_heartbeat(Path(recipe.run.dir), recipe.run.hang_timeout_s, rank, world)
    faults.install_stop_fault(beat, rank)
    install_run_hooks(recipe, beat)
    start = time.time()
    stopped_early = False
    nonfinite_exit = None
    with cpu_runtime.device_redirect():  # without CUDA: megatron's device="cuda" requests -> CPU, for the run only
        shims = cpu_runtime.active() + fixes
        if rank == 0:
            print(f"[acmoe] runtime shims: {shims or 'none (CUDA present)'}", flush=True)
        try:
            pretrain(
                pretrain_cfg_container_from_args(args),
                make_datasets_provider(recipe),
                ModelType.encoder_or_decoder,
                make_forward_step(recipe, beat),
                model_provider=make_model_provider(recipe),
            )
        except SystemExit as exc:  # megatron's early exits: signal handler, exit interval/duration
            if exc.code == EXIT_NONFINITE:
                nonfinite_exit = exc
            elif exc.code not in (0, None):
                raise
            stopped_early = True
    wall = time.time() - start
    if beat is not None:
        beat.mark("finishing")
    args = get_args()
    from megatron.training.global_vars import get_wandb_writer

    if get_wandb_writer() is not None:  # megatron leaves the W&B run open: close it (summary, sync files)
        get_wandb_writer().finish()
    hashed = run_hooks.finish_checkpoint_checksums()
    if hashed and rank == 0:
        size, seconds = sum(h["bytes"] for h in hashed), sum(h["seconds"] for h in hashed)
        print(f"[acmoe] checkpoint checksums (rank 0's share, in the background): {len(hashed)} save(s), "
              f"{sum(h['files'] for h in hashed)} files, {size / 2**20:.1f} MiB in {seconds:.2f} s", flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    if rank == world - 1:  # megatron's TensorBoard writer rank
        if nonfinite_exit is not None:
            from megatron.training.global_vars import get_tensorboard_writer

            writer = get_tensorboard_writer()
            if writer is not None:
                writer.add_scalar("faults/nonfinite_loss_or_grad", 1.0, args.curr_iteration + 1)
                writer.flush()
        path = write_summary(recipe, args, manifest, wall_time_s=wall, runtime_shims=shims,
                             stopped_early=stopped_early, nonfinite=nonfinite_exit is not None)
        print(f"[acmoe] run summary: {path}", flush=True)
    if beat is not None:
        beat.stop()
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
elif __name__ == "__mp_main__":
    # a multiprocessing "spawn" child of a worker (megatron's persistent checkpoint writer) runs this
    # module under this name before its target: it dies with the worker too (runtime/lifetime.py)
    die_with_parent()
