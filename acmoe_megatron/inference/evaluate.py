"""Evaluation worker of ``acmoe-eval`` (run under torchrun): score whole splits with a trained checkpoint.

One process start-up per rank: megatron's arguments from the run's resolved recipe (``config.yaml``)
plus the evaluation flags, megatron's ``initialize_megatron``, the model from the trainer's own
model provider (our routers, ``plugin.attach``), megatron's ``load_checkpoint`` (model weights
only; a ``torch_dist`` checkpoint loads into any parallel layout megatron can reshard to), then
megatron's forward-only schedule over every micro-batch of each requested split: one
deterministic pass (``TokenBatches(shuffle=False, infinite=False)``, the last micro-batches padded
with fully masked samples, so every real sample counts exactly once whatever the data-parallel
size). The AC routers score with the statistics ``acmoe-eval`` chose (``--statistics``): the
batch's (the paper), the checkpoint's running statistics (``source: ema``) or a calibrated table
(inference/calibration.py), computed first over training micro-batches with ``--calibrate N`` (the splits
are then also scored with the batch statistics first: ``batch_statistics_results`` in eval.json). The token-weighted loss is summed over micro-batches and data-parallel replicas. Rank 0
writes ``eval.json``; megatron's TensorBoard writer (last rank) gets ``eval/<name>/loss`` etc. at
the checkpoint's iteration. Nothing is trained and no optimizer is built.

Why our own loop: megatron's ``evaluate`` scores ``eval_iters`` batches from a training data
iterator (the start-up of a training launch for a fixed sample count), not a whole split.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

from acmoe_megatron.data.loader.batches import TokenBatches
from acmoe_megatron.data.shards.manifest import read_manifest
from acmoe_megatron.data.tokenizers.byte import tokenizer_from_manifest
from acmoe_megatron.inference import calibration as inference_stats
from acmoe_megatron.inference.loader import load_trained
from acmoe_megatron.inference.specialisation import SpecialisationRecorder, default_decode, write_report
from acmoe_megatron.runtime import cpu_runtime
from acmoe_megatron.runtime.forward_step import forward_step
from acmoe_megatron.runtime.lifetime import die_with_parent


def parse_cli(argv=None):
    p = argparse.ArgumentParser(prog="acmoe-evaluate", description="acmoe-eval worker (run under torchrun)")
    p.add_argument("--config", required=True, help="the run's resolved recipe (RUN_DIR/config.yaml)")
    p.add_argument("--eval", action="append", required=True, metavar="NAME=DIR:SPLIT",
                   help="a split to score, e.g. valid=data/stdlib_s256:valid (repeatable)")
    p.add_argument("--max-samples", type=int, default=None, help="score only the first N samples of each split")
    p.add_argument("--statistics", choices=("batch", "ema", "calibrated", "none"), default="batch",
                   help="the AC routers' statistics (chosen by acmoe-eval)")
    p.add_argument("--stats-file", default=None, help="calibrated statistics to read (or write with --calibrate)")
    p.add_argument("--calibrate", type=int, default=None, metavar="N",
                   help="first compute the calibrated statistics over N training micro-batches per replica")
    p.add_argument("--calibrate-data", default=None, help="shard directory whose train split calibrates")
    p.add_argument("--report", default=None, metavar="DIR",
                   help="also write the expert-specialisation report of the first split into DIR")
    p.add_argument("--out", required=True, help="eval.json to write")
    p.add_argument("overrides", nargs="*", help="SECTION.KEY=VALUE overrides (e.g. another parallel layout)")
    return p.parse_args(argv)


def _targets(specs: list[str]) -> list[tuple[str, str, str]]:
    out = []
    for spec in specs:
        name, _, rest = spec.partition("=")
        path, _, split = rest.rpartition(":")
        out.append((name, path, split))
    return out


def forward_only(model, args, batches, steps: int, copies) -> list:
    """megatron's forward-only schedule over ``steps`` micro-batches of ``batches`` (every model
    chunk of a virtual pipeline gets its own iterator over the same batches: ``copies()``)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model_list = model if isinstance(model, list) else [model]
    iterators = [iter(batches)] + [iter(copies()) for _ in model_list[1:]]
    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iterators if len(model_list) > 1 else iterators[0],
        model=model_list, num_microbatches=steps, seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size, forward_only=True)


def calibrate(model, recipe, args, path: str, micro_batches: int) -> dict[int, dict]:
    """The AC layers' calibrated inference tables (inference_stats.calibrate) over the first
    ``micro_batches`` training micro-batches per replica of ``path``'s train split, in the training
    order of the run's data seed: every AC layer of every pipeline stage, on every rank."""
    from megatron.core import parallel_state

    batches = TokenBatches(path, "train", args.micro_batch_size, parallel_state.get_data_parallel_rank(),
                           parallel_state.get_data_parallel_world_size(), seed=recipe.data.seed,
                           verify_checksums=False, seq_length=args.seq_length, cache_dir=recipe.data.cache_dir)
    tables = inference_stats.calibrate(model, lambda: forward_only(
        model, args, batches, micro_batches, lambda: batches.worker_view(0, 1)))
    return inference_stats.gather_stages(tables, parallel_state.get_pipeline_model_parallel_group())


def score_split(model, recipe, args, path: str, split: str, max_samples: int | None) -> dict:
    """(loss sum, tokens, samples) of one split, summed over data-parallel replicas."""
    from megatron.core import parallel_state

    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    batches = TokenBatches(path, split, args.micro_batch_size, dp_rank, dp_size, seed=0, shuffle=False,
                           infinite=False, verify_checksums=False, seq_length=args.seq_length,
                           cache_dir=recipe.data.cache_dir)
    total_samples = batches.num_samples
    if max_samples is not None and max_samples < total_samples:
        batches = _first_samples(batches, max_samples)
        total_samples = max_samples
    steps = len(batches) if isinstance(batches, TokenBatches) else batches.steps
    losses = forward_only(model, args, batches, steps, (lambda: batches.worker_view(0, 1))
                          if isinstance(batches, TokenBatches) else batches.copy)
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"  # megatron's groups: NCCL / gloo
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for item in losses or []:  # only the last pipeline stage returns losses
        totals += item["lm loss"].detach().to(device, torch.float64)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        torch.distributed.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    # every stage learns the last stage's result (rank 0, which writes eval.json, is on the first)
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    torch.distributed.broadcast(totals, src=torch.distributed.get_process_group_ranks(pp_group)[-1], group=pp_group)
    loss_sum, tokens = float(totals[0]), int(totals[1])
    loss = loss_sum / max(tokens, 1)
    return {"data": path, "split": split, "samples": total_samples, "tokens": tokens, "loss": loss,
            "bits_per_token": loss / math.log(2), "perplexity": math.exp(min(loss, 700.0))}


class _first_samples:  # noqa: N801 (an iterator class used like a function)
    """The micro-batches of ``batches`` that hold its first ``n`` samples (the rest masked out)."""

    def __init__(self, batches, n: int):
        self.batches, self.n = batches, n
        self.steps = -(-n // batches.samples_per_step)
        self._k = 0

    def copy(self):
        return _first_samples(self.batches.worker_view(0, 1), self.n)

    def __iter__(self):
        return self

    def __next__(self):
        if self._k >= self.steps:
            raise StopIteration
        batch = self.batches.batch(self._k)
        ids = self.batches.sample_ids(self._k)  # None: a padding slot
        position = self._k * self.batches.samples_per_step + self.batches.dp_rank * self.batches.micro_batch_size
        keep = torch.tensor([position + i < self.n and sid is not None for i, sid in enumerate(ids)],
                            dtype=torch.float32)
        batch["loss_mask"] = batch["loss_mask"] * keep.unsqueeze(1)
        self._k += 1
        return batch


def _report_group():
    """The ranks whose tokens differ (specialisation.py counts each token once): every rank, but
    only one tensor-parallel rank per group where tensor parallelism runs without sequence parallelism
    (its ranks then route the same tokens)."""
    from megatron.core import parallel_state
    from megatron.training import get_args

    if parallel_state.get_tensor_model_parallel_world_size() == 1 or get_args().sequence_parallel:
        return torch.distributed.group.WORLD, True
    tp = parallel_state.get_tensor_model_parallel_world_size()
    group = torch.distributed.new_group([r for r in range(torch.distributed.get_world_size()) if r % tp == 0])
    return group, parallel_state.get_tensor_model_parallel_rank() == 0


def specialisation_report(model, recipe, args, path: str, split: str, max_samples: int | None, out_dir: str,
                          title: str) -> dict:
    """The expert-specialisation report (specialisation.py) over the whole micro-batches of one split:
    the split's first ``(samples // samples per step) x samples per step`` samples, so that no padding
    slot is counted as a token."""
    from megatron.core import parallel_state

    batches = TokenBatches(path, split, args.micro_batch_size, parallel_state.get_data_parallel_rank(),
                           parallel_state.get_data_parallel_world_size(), seed=0, shuffle=False, infinite=False,
                           verify_checksums=False, seq_length=args.seq_length, cache_dir=recipe.data.cache_dir)
    samples = batches.num_samples if max_samples is None else min(max_samples, batches.num_samples)
    steps = samples // batches.samples_per_step
    if steps == 0:
        raise ValueError(f"--report: {samples} samples of {path}:{split} do not fill one step of "
                         f"{batches.samples_per_step} samples (micro-batch x data-parallel size)")
    tokenizer = tokenizer_from_manifest(read_manifest(path).tokenizer)
    decode = default_decode if tokenizer.name == "bytes" else (lambda ids: tokenizer.detokenize(list(ids)))
    recorder = SpecialisationRecorder(model, decode=decode)
    try:
        forward_only(model, args, batches, steps, lambda: batches.worker_view(0, 1))
    finally:
        recorder.detach()
    group, counts = _report_group()
    result = recorder.finish(group) if counts else None
    if torch.distributed.get_rank() == 0:
        write_report(result, out_dir, title=title)
        print(f"[acmoe-eval] expert-specialisation report over {steps * batches.samples_per_step} samples of "
              f"{path}:{split}: {out_dir}/specialisation.md", flush=True)
    return {"dir": str(out_dir), "data": path, "split": split, "samples": steps * batches.samples_per_step}


def statistics_source(recipe, args, statistics: str, stats_file: str | None = None, meta: dict | None = None) -> str:
    """What the AC routers' cluster statistics come from at this evaluation (labelled in eval.json)."""
    if statistics == "none":
        return f"none ({recipe.acmoe.router} router has no cluster statistics)"
    if statistics == "ema":
        return "ema (the running statistics in the checkpoint: independent of the batch)"
    if statistics == "calibrated":
        return (f"calibrated ({meta['micro_batches']} micro-batches of {meta['micro_batch_size']} samples per "
                f"replica x {meta['data_parallel_size']} replicas of {meta['data']}:train at iteration "
                f"{meta['iteration']}; {stats_file}: independent of the batch)")
    return (f"batch (each micro-batch of {args.micro_batch_size} samples, scope {recipe.acmoe.scope}: what the "
            "paper reports; scores depend on the micro-batch size)")


def inference_tables(model, recipe, args, cli, iteration: int, rank: int) -> dict | None:
    """Calibrate (and save) or read the calibrated tables, and install them; their metadata."""
    if cli.statistics != "calibrated":
        return None
    if cli.calibrate:
        tables = calibrate(model, recipe, args, cli.calibrate_data, cli.calibrate)
        meta = {"iteration": iteration, "micro_batches": cli.calibrate, "micro_batch_size": args.micro_batch_size,
                "data_parallel_size": args.data_parallel_size, "data": cli.calibrate_data, "seed": recipe.data.seed,
                "mode": recipe.acmoe.mode, "scope": recipe.acmoe.scope,
                "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if rank == 0:
            inference_stats.save(cli.stats_file, tables, meta)
            print(f"[acmoe-eval] calibrated AC statistics of layers {sorted(tables)} over {cli.calibrate} "
                  f"micro-batches per replica: wrote {cli.stats_file}", flush=True)
    else:
        tables, meta = inference_stats.load(cli.stats_file)
    inference_stats.install(model, tables)
    return meta


def main(argv=None) -> None:
    die_with_parent()  # a killed torchrun / launcher takes this worker with it (runtime/lifetime.py)
    cpu_runtime.install_for_training()
    from megatron.training.global_vars import get_tensorboard_writer

    cli = parse_cli(argv)
    targets = _targets(cli.eval)
    rank = int(os.environ.get("RANK", "0"))
    start = time.time()
    with cpu_runtime.device_redirect():  # without CUDA: megatron's device="cuda" requests -> CPU
        recipe, args, model, iteration = load_trained(cli.config, cli.overrides, targets[0][1], "acmoe-evaluate")
        results = {}
        with torch.no_grad():
            batch_results = {}
            if cli.calibrate:  # what the paper reports, before the calibrated table replaces it
                for name, path, split in targets:
                    batch_results[name] = score_split(model, recipe, args, path, split, cli.max_samples)
            meta = inference_tables(model, recipe, args, cli, iteration, rank)
            for name, path, split in targets:
                results[name] = score_split(model, recipe, args, path, split, cli.max_samples)
                if rank == 0:
                    r = results[name]
                    print(f"[acmoe-eval] {name}: loss {r['loss']:.4f} nats/token ({r['bits_per_token']:.4f} bits), "
                          f"perplexity {r['perplexity']:.3f} over {r['tokens']} tokens of {r['samples']} samples "
                          f"({path}:{split})", flush=True)
            if cli.report:
                name, path, split = targets[0]
                report = specialisation_report(
                    model, recipe, args, path, split, cli.max_samples, cli.report,
                    title=f"Expert specialisation: {Path(cli.config).parent} at iteration {iteration} ({path}:{split}, "
                          f"AC statistics: {cli.statistics})")
    writer = get_tensorboard_writer()
    if writer is not None:
        for name, r in results.items():
            for key in ("loss", "bits_per_token", "perplexity"):
                writer.add_scalar(f"eval/{name}/{key}", r[key], iteration)
        writer.flush()
    if rank == 0:
        out = {"run_dir": str(Path(cli.config).parent), "checkpoint": args.load, "iteration": iteration,
               "statistics": cli.statistics,
               "statistics_source": statistics_source(recipe, args, cli.statistics, cli.stats_file, meta),
               "micro_batch_size": args.micro_batch_size,
               "world_size": int(os.environ.get("WORLD_SIZE", "1")),
               "layout": {"tp": args.tensor_model_parallel_size, "pp": args.pipeline_model_parallel_size,
                          "ep": args.expert_model_parallel_size, "dp": args.data_parallel_size},
               "results": results, "wall_time_s": round(time.time() - start, 1)}
        if batch_results:
            out["batch_statistics_results"] = batch_results
        if cli.report:
            out["specialisation_report"] = report
        path = Path(cli.out)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(out, indent=2) + "\n")
        tmp.replace(path)
        print(f"[acmoe-eval] wrote {path}", flush=True)
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
