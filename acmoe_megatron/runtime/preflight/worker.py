"""The preflight's per-process worker (started by torchrun or srun, like the trainer).

Each process records its items in ``<out>/rank_<r>.json``, rewritten before and after every item
(``running`` names the item it is in, so a process that hangs or dies is reported with what it was
doing). In order:

1. ``environment``: versions (torch, CUDA, NCCL, megatron-core, Transformer Engine, Apex), the GPU
   and its compute capability, the node;
2. ``fused paths``: what the recipe asks for (``precision.requested_fused``) against this machine;
3. ``fp8 gemm``: with ``megatron.fp8``, one Transformer Engine FP8 GEMM of the recipe's expert shape
   against BF16 on this GPU (relative error);
4. ``memory``: the full recipe's estimate (computed by the launcher) against this GPU's memory,
   before the model is built;
5. ``storage``: the checkpoint and TensorBoard directories created on their file systems, 1 MiB
   written, synced and read back by every process;
6. ``training``: the shrunk recipe through megatron's own ``pretrain`` with our hooks, as the
   trainer runs it: model built, ``steps`` iterations, the MoE all-to-all of every EP group, AC
   labels handed across pipeline stages (the AC router refuses to route without them), finite
   losses (megatron stops on a non-finite one), a checkpoint saved at the last step;
7. ``collectives``: all-to-all in the expert group, all-reduce in the data-parallel and tensor
   groups, send/recv between consecutive pipeline stages, timed (GB/s);
8. ``checkpoint``: the saved checkpoint loaded back into the zeroed model (megatron's
   ``load_checkpoint``), every parameter equal to the trained one;
9. ``tensorboard``: the event file read back (megatron's writer rank): a finite ``lm loss`` for
   every step, and the step time.

The processes agree (an all-reduce) before every step that needs all of them, so one failing
process makes the others skip that step with the reason instead of waiting in a collective.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import shutil
import socket
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from acmoe_megatron.core.errors import ConfigError
from acmoe_megatron.core.registry import entry
from acmoe_megatron.data.megatron.keys import uses_megatron_data
from acmoe_megatron.data.shards.manifest import read_manifest
from acmoe_megatron.model.chunk_state import state_of
from acmoe_megatron.model.precision import check_fp8, have_nvidia_apex, have_transformer_engine, requested_fused
from acmoe_megatron.model.routers import ACRouter
from acmoe_megatron.observability.summary import read_scalars
from acmoe_megatron.runtime import cpu_runtime
from acmoe_megatron.runtime.forward_step import make_forward_step
from acmoe_megatron.runtime.lifetime import die_with_parent
from acmoe_megatron.runtime.log_filters import quiet_library_warnings
from acmoe_megatron.runtime.megatron_args import build_argv, validate_args
from acmoe_megatron.runtime.model_provider import make_model_provider
from acmoe_megatron.runtime.preflight.memory import memory_fix, memory_verdict
from acmoe_megatron.runtime.preflight.plan import PreflightPlan
from acmoe_megatron.runtime.recipe import load_recipe
from acmoe_megatron.runtime.run_plan import megatron_args, megatron_data_standin
from acmoe_megatron.runtime.train import install_run_hooks, make_datasets_provider

FP8_MAX_RELATIVE_ERROR = 0.1  # e4m3 keeps 3 mantissa bits: a GEMM's relative error is a few percent


class Recorder:
    """This process's items, in ``<out>/rank_<r>.json`` (rewritten atomically after each change)."""

    def __init__(self, out: Path, rank: int, node: str, local_rank: int):
        self.path = out / f"rank_{rank}.json"
        self.data = {"rank": rank, "node": node, "local_rank": local_rank, "running": None, "items": [],
                     "started": time.time()}
        self._write()

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)

    def running(self, item: str) -> None:
        self.data["running"] = item
        self._write()

    def item(self, item: str, status: str, detail: str, fix: str = "", **numbers) -> None:
        self.data["items"].append({"item": item, "status": status, "detail": detail, "fix": fix, **numbers})
        self.data["running"] = None
        self._write()

    def finish(self) -> None:
        self.data["finished"] = time.time()
        self.data["running"] = None
        self._write()


def _versions() -> dict:
    from importlib import metadata

    def version(dist_name: str) -> str | None:
        try:
            return metadata.version(dist_name)
        except metadata.PackageNotFoundError:
            return None


    te = have_transformer_engine()
    facts = {
        "python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None,
        "megatron_core": version("megatron-core") or version("megatron_core"),
        "transformer_engine": (version("transformer-engine") or version("transformer_engine") or "importable")
        if te else None,
        "nvidia_apex": "importable" if have_nvidia_apex() else None,
        "gpu": None, "compute_capability": None, "gpu_memory_bytes": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        facts.update(gpu=props.name, compute_capability=f"{props.major}.{props.minor}",
                     gpu_memory_bytes=props.total_memory)
    return facts


def _agree(ok: bool) -> bool:
    """True when every process is ok (an all-reduce of the flags)."""
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _capability() -> tuple[int, int] | None:
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


# ---------------------------------------------------------------------------------------------
# items before the model


def check_fused(rec: Recorder, args) -> bool:

    rec.running("fused paths")
    wanted = requested_fused(args, have_transformer_engine(), have_nvidia_apex(), _capability())
    missing = [w for w in wanted if not w["available"]]
    if missing:
        rec.item("fused paths", "fail", "; ".join(f"{w['path']}: unavailable" for w in missing),
                 fix="; ".join(w["fix"] for w in missing), requested=wanted)
        return False
    rec.item("fused paths", "pass",
             ", ".join(w["path"] for w in wanted) + " available" if wanted else "none requested", requested=wanted)
    return True


def check_fp8_gemm(rec: Recorder, plan: PreflightPlan) -> bool:
    rec.running("fp8 gemm")
    if not plan.fp8:
        rec.item("fp8 gemm", "skipped", "the recipe does not set megatron.fp8")
        return True
    if not torch.cuda.is_available():
        rec.item("fp8 gemm", "skipped", "no GPU")
        return True

    try:
        check_fp8(plan.fp8, plan.fp8_recipe, have_transformer_engine(), _capability())
    except ValueError as err:
        rec.item("fp8 gemm", "fail", f"refused: {err}", fix=str(err))
        return False
    shape = plan.expert_shape
    try:
        err, ms_fp8, ms_bf16 = _fp8_gemm(shape["tokens_per_expert"], shape["hidden"], shape["ffn"],
                                         plan.fp8, plan.fp8_recipe or "delayed")
    except Exception as exc:  # noqa: BLE001 - Transformer Engine's own error is the report
        rec.item("fp8 gemm", "fail", f"Transformer Engine FP8 GEMM raised {type(exc).__name__}: {exc}",
                 fix="check the Transformer Engine install against this GPU and CUDA (docs/gpu.md)")
        return False
    where = f"{shape['tokens_per_expert']} x {shape['hidden']} -> {shape['ffn']}"
    numbers = {"relative_error": err, "fp8_ms": ms_fp8, "bf16_ms": ms_bf16}
    if not math.isfinite(err) or err > FP8_MAX_RELATIVE_ERROR:
        rec.item("fp8 gemm", "fail", f"{where}: relative error {err:.3g} against BF16 (limit {FP8_MAX_RELATIVE_ERROR})",
                 fix="FP8 GEMM numerics are wrong on this GPU/TE: try another megatron.fp8_recipe, update TE",
                 **numbers)
        return False
    rec.item("fp8 gemm", "pass", f"{where}: relative error {err:.3g} against BF16; {ms_fp8:.3f} ms "
             f"(BF16 {ms_bf16:.3f} ms)", **numbers)
    return True


def _fp8_gemm(tokens: int, hidden: int, ffn: int, fmt: str, recipe_name: str) -> tuple[float, float, float]:
    """Relative error of a TE FP8 Linear against the same layer in BF16; both times in ms."""
    import transformer_engine.pytorch as te
    from transformer_engine.common import recipe as te_recipe

    fp8_format = te_recipe.Format.HYBRID if fmt == "hybrid" else te_recipe.Format.E4M3
    make = {"delayed": lambda: te_recipe.DelayedScaling(fp8_format=fp8_format),
            "tensorwise": lambda: te_recipe.Float8CurrentScaling(fp8_format=fp8_format),
            "blockwise": lambda: te_recipe.Float8BlockScaling(fp8_format=fp8_format),
            "mxfp8": lambda: te_recipe.MXFP8BlockScaling(fp8_format=fp8_format)}[recipe_name]
    torch.manual_seed(0)
    layer = te.Linear(hidden, ffn, bias=False, params_dtype=torch.bfloat16, device="cuda")
    x = torch.randn(tokens, hidden, dtype=torch.bfloat16, device="cuda")

    def timed(fn) -> tuple[torch.Tensor, float]:
        out = fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            out = fn()
        torch.cuda.synchronize()
        return out, (time.perf_counter() - start) / 5 * 1e3

    with torch.no_grad():
        ref, ms_bf16 = timed(lambda: layer(x))

        def fp8():
            with te.fp8_autocast(enabled=True, fp8_recipe=make()):
                return layer(x)

        out, ms_fp8 = timed(fp8)
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    return err, ms_fp8, ms_bf16


def check_memory(rec: Recorder, plan: PreflightPlan) -> bool:
    rec.running("memory")
    if plan.memory is None:
        rec.item("memory", "skipped", f"no estimate: {plan.memory_error}")
        return True
    if not torch.cuda.is_available():
        if plan.stated_gpu_memory:
            status, line = memory_verdict(plan.memory, plan.stated_gpu_memory, "stated with --gpu-memory-gib")
            rec.item("memory", status, line, fix=memory_fix() if status == "fail" else "", **plan.memory)
            return status == "pass"
        rec.item("memory", "skipped", "no GPU (the estimate is in the report; --gpu-memory-gib compares it)",
                 **plan.memory)
        return True
    free, total = torch.cuda.mem_get_info()
    status, line = memory_verdict(plan.memory, total, f"{torch.cuda.get_device_name()}, {free / 2**30:.1f} GiB free")
    rec.item("memory", status, line, fix=memory_fix() if status == "fail" else "", **plan.memory,
             gpu_total_bytes=total, gpu_free_bytes=free)
    return status == "pass"


def check_storage(rec: Recorder, plan: PreflightPlan, rank: int) -> dict[str, bool]:
    """Every process creates the checkpoint and TensorBoard directories and writes, syncs, reads
    back and removes 1 MiB in each: {"checkpoint_dir": ok, "tensorboard_dir": ok}."""
    rec.running("storage")
    payload = os.urandom(1 << 20)
    ok, lines, problems = {}, [], []
    for key in ("checkpoint_dir", "tensorboard_dir"):
        where = Path(getattr(plan, key))
        probe = where / f".preflight-probe-rank{rank}"
        try:
            where.mkdir(parents=True, exist_ok=True)
            start = time.perf_counter()
            with open(probe, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            seconds = time.perf_counter() - start
            if probe.read_bytes() != payload:
                raise OSError(f"{probe}: the bytes read back differ from those written")
            probe.unlink()
            ok[key] = True
            lines.append(f"{where}: 1 MiB written+synced at {1 / 1024 / max(seconds, 1e-9):.2f} GiB/s")
        except OSError as err:
            ok[key] = False
            problems.append(f"{key.replace('_', ' ')} {where}: {err.strerror or err}")
    if problems:
        rec.item("storage", "fail", "; ".join(problems),
                 fix="point run.dir (or megatron.save / tensorboard_dir) at a writable shared file system "
                     "mounted on every node (and inside the container: --container-mounts)")
    else:
        rec.item("storage", "pass", "; ".join(lines))
    return ok


# ---------------------------------------------------------------------------------------------
# the shrunk model


def train_shrunk(rec: Recorder, plan: PreflightPlan, recipe, save_ok: bool, tb_ok: bool):
    """megatron's pretrain on the shrunk recipe; (the model chunks as built, megatron's args) or None."""
    from megatron.core.enums import ModelType
    from megatron.training import get_args
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args
    from megatron.training.training import pretrain


    rec.running("training")
    mg = dict(recipe.megatron)
    if not save_ok:
        mg["save"] = None  # the storage item failed: train without a checkpoint, report the rest
    if not tb_ok:
        mg["tensorboard_dir"] = None
    recipe = dataclasses.replace(recipe, megatron=mg)
    manifest = megatron_data_standin(recipe) if uses_megatron_data(mg) else read_manifest(recipe.data.path)
    sys.argv = ["acmoe-preflight"] + build_argv(recipe, manifest)
    args = parse_and_validate_args()
    validate_args(args, recipe, host_checks=False)  # the machine's own items are reported above
    install_run_hooks(recipe)
    provider = make_model_provider(recipe)
    built = []

    def capturing_provider(*a, **k):
        model = provider(*a, **k)
        built.append(model)
        return model

    start = time.perf_counter()
    with cpu_runtime.device_redirect():
        pretrain(pretrain_cfg_container_from_args(args), make_datasets_provider(recipe),
                 ModelType.encoder_or_decoder, make_forward_step(recipe), model_provider=capturing_provider)
    wall = time.perf_counter() - start
    args = get_args()
    done = args.curr_iteration + 1  # megatron's iteration counter of the last step it ran
    if done < plan.steps:
        raise RuntimeError(f"megatron stopped at iteration {done} of {plan.steps}")
    rec.item("training", "pass", f"model built ({len(built)} chunk(s), {args.num_layers} layers, "
             f"{args.num_experts} experts), {plan.steps} steps in {wall:.1f} s", wall_s=wall)
    return built, args


def check_pipeline_labels(rec: Recorder, plan: PreflightPlan, recipe, built: list | None) -> None:
    """PP > 1: the AC layers of this stage whose previous MoE layer is on another stage routed (the
    AC router refuses to route without that layer's labels, so finished steps prove the hand-over)."""
    pp = plan.layout["pp"]
    if pp == 1:
        rec.item("pipeline labels", "skipped", "pipeline parallel 1: no stage boundary")
        return
    if not entry(recipe.acmoe.router).from_first_ac_layer:
        rec.item("pipeline labels", "skipped", f"acmoe.router={recipe.acmoe.router} routes without earlier labels")
        return
    if built is None:
        rec.item("pipeline labels", "skipped", "the training steps did not finish")
        return
    crossings = []
    for chunk in built:
        state = state_of(chunk)
        for layer in sorted(m.layer_number for m in chunk.modules() if isinstance(m, ACRouter)):
            prev = state.previous_moe_layer(layer)
            if prev is not None and prev not in state.local_layer_numbers:
                crossings.append(f"AC layer {layer} routed with the labels of MoE layer {prev} from another stage")
    rec.item("pipeline labels", "pass", "; ".join(crossings) + " (the label transport)" if crossings
             else "no AC layer of this stage routes from another stage's labels", crossings=crossings)


def _timed(fn, warmup: int = 2, iters: int = 5) -> float:
    for _ in range(warmup):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def time_collectives(rec: Recorder) -> None:
    """all-to-all (EP), all-reduce (DP, TP), send/recv between pipeline stages, each in its group."""
    from megatron.core import parallel_state as ps

    rec.running("collectives")
    nbytes = (64 if torch.cuda.is_available() else 4) << 20
    numel = nbytes // 4
    dev = _device()
    results = []

    def group_entry(name, group, op, seconds, factor):
        ranks = dist.get_process_group_ranks(group)
        algbw = nbytes / seconds / 1e9
        results.append({"collective": name, "ranks": ranks, "bytes": nbytes, "seconds": seconds,
                        "algbw_gbps": algbw, "busbw_gbps": algbw * factor, "op": op})

    groups = [("expert all-to-all", ps.get_expert_model_parallel_group(), "all_to_all"),
              ("data-parallel all-reduce", ps.get_data_parallel_group(), "all_reduce"),
              ("tensor-parallel all-reduce", ps.get_tensor_model_parallel_group(), "all_reduce")]
    for name, group, op in groups:
        n = dist.get_world_size(group)
        if n == 1:
            continue
        buf = torch.ones(numel, dtype=torch.float32, device=dev)
        if op == "all_to_all":
            out = torch.empty_like(buf)
            seconds = _timed(lambda b=buf, o=out, g=group: dist.all_to_all_single(o, b, group=g))
            group_entry(name, group, op, seconds, (n - 1) / n)
        else:
            seconds = _timed(lambda b=buf, g=group: dist.all_reduce(b, group=g))
            group_entry(name, group, op, seconds, 2 * (n - 1) / n)
    pp_group = ps.get_pipeline_model_parallel_group()
    pp_ranks = dist.get_process_group_ranks(pp_group)
    if len(pp_ranks) > 1:
        me = pp_ranks.index(dist.get_rank())
        buf = torch.ones(numel, dtype=torch.float32, device=dev)

        def ping():  # stage i sends to stage i + 1 (every pair at once)
            ops = []
            if me + 1 < len(pp_ranks):
                ops.append(dist.P2POp(dist.isend, buf, pp_ranks[me + 1]))
            if me > 0:
                ops.append(dist.P2POp(dist.irecv, buf, pp_ranks[me - 1]))
            for work in dist.batch_isend_irecv(ops):
                work.wait()

        seconds = _timed(ping)
        algbw = nbytes / seconds / 1e9
        results.append({"collective": "pipeline send/recv", "ranks": pp_ranks, "bytes": nbytes,
                        "seconds": seconds, "algbw_gbps": algbw, "busbw_gbps": algbw, "op": "send_recv"})
    line = "; ".join(f"{r['collective']} {r['ranks']}: {r['busbw_gbps']:.2f} GB/s" for r in results)
    rec.item("collectives", "pass", line or "no group of more than one process", timings=results)


def check_checkpoint(rec: Recorder, built: list, args, steps: int) -> None:
    """Zero the trained parameters, load the saved checkpoint back, compare with what was trained."""
    from megatron.training.checkpointing import load_checkpoint

    rec.running("checkpoint")
    trained = [{n: p.detach().clone() for n, p in m.named_parameters()} for m in built]
    with torch.no_grad():
        for m in built:
            for p in m.parameters():
                p.zero_()
    args.load, args.no_load_optim, args.no_load_rng, args.finetune, args.ckpt_step = args.save, True, True, False, None
    iteration, _ = load_checkpoint(built, None, None, strict=True)
    worst, name = 0.0, ""
    for m, ref in zip(built, trained):
        for n, p in m.named_parameters():
            diff = (p.detach().float() - ref[n].float()).abs().max().item() if p.numel() else 0.0
            if diff > worst:
                worst, name = diff, n
    count = sum(len(t) for t in trained)
    if iteration != steps or worst != 0.0:
        rec.item("checkpoint", "fail", f"loaded iteration {iteration} (saved {steps}); largest difference {worst:.3g} "
                 f"in {name or '-'}", fix="the checkpoint did not round-trip: check the file system's consistency "
                 "(a shared file system that caches writes per node) and megatron.ckpt_format")
        return
    rec.item("checkpoint", "pass", f"iteration {iteration} saved to {args.save} ({args.ckpt_format}) and loaded "
             f"back: {count} parameter tensors identical")


def check_tensorboard(rec: Recorder, tb_dir: str, steps: int) -> None:
    from megatron.training.global_vars import get_tensorboard_writer


    rec.running("tensorboard")
    writer = get_tensorboard_writer()
    if writer is None:
        return  # not megatron's writer rank
    writer.flush()
    scalars = read_scalars(tb_dir)
    losses = dict(scalars.get("lm loss", []))
    missing = [s for s in range(1, steps + 1) if s not in losses]
    bad = [s for s, v in losses.items() if not math.isfinite(v)]
    times = [v for s, v in scalars.get("iteration-time", []) if s > 1]
    step_time = sorted(times)[len(times) // 2] if times else None
    if missing or bad:
        rec.item("tensorboard", "fail", f"{tb_dir}: lm loss missing at steps {missing}, non-finite at {bad}",
                 fix="megatron's TensorBoard writer did not record every step: check tensorboard_dir's file system")
        return
    rec.item("tensorboard", "pass", "event file read back: lm loss " + " ".join(f"{losses[s]:.3f}" for s in
             sorted(losses)) + (f"; step time {step_time:.3f} s (median after step 1)" if step_time else ""),
             losses=[losses[s] for s in sorted(losses)], step_time_s=step_time)


# ---------------------------------------------------------------------------------------------


def _guarded(rec: Recorder, item: str, fn, *args) -> None:
    """``fn(*args)``; an exception becomes the item's failure (the other processes may then wait in
    that item's collective until the preflight's timeout, which the report names)."""
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001 - the report names it
        rec.item(item, "fail", f"{type(exc).__name__}: {exc}".strip(), fix="see the traceback in this rank's log",
                 traceback=traceback.format_exc()[-4000:])
        traceback.print_exc()


def main(argv=None) -> int:
    die_with_parent()  # a killed torchrun / launcher takes this worker with it (runtime/lifetime.py)
    parser = argparse.ArgumentParser(prog="acmoe-preflight-worker")
    parser.add_argument("--plan", required=True, help="plan.json written by acmoe-preflight / acmoe-launch")
    parser.add_argument("--timeout", type=float, default=600, help="seconds any collective may wait")
    cli = parser.parse_args(argv)
    plan = PreflightPlan.read(Path(cli.plan))
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    rec = Recorder(Path(plan.out), rank, node, local_rank)
    cpu_runtime.install_for_training()
    quiet_library_warnings()

    recipe = load_recipe(plan.shrunk)
    rec.running("environment")
    facts = _versions()
    rec.item("environment", "info", ", ".join(f"{k} {v}" for k, v in facts.items() if v and k != "gpu_memory_bytes")
             or "-", **facts)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    backend = recipe.megatron.get("distributed_backend") or "nccl"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=cli.timeout))
    if dist.get_world_size() != world:
        raise RuntimeError(f"world size {dist.get_world_size()} != WORLD_SIZE {world}")


    manifest = megatron_data_standin(recipe) if uses_megatron_data(recipe.megatron) else read_manifest(recipe.data.path)
    try:
        args = megatron_args(build_argv(recipe, manifest), world, remote=True)
        fused_ok = check_fused(rec, args)
    except ConfigError as err:  # megatron refuses the recipe on this machine (e.g. a CUDA-only path)
        rec.item("fused paths", "fail", f"megatron refuses the recipe here: {err}", fix=str(err))
        fused_ok = False
    check_fp8_gemm(rec, plan)
    check_memory(rec, plan)
    storage = check_storage(rec, plan, rank)
    save_ok = _agree(storage["checkpoint_dir"])
    tb_ok = _agree(storage["tensorboard_dir"])

    built, margs = None, None
    if _agree(fused_ok):
        try:
            built, margs = train_shrunk(rec, plan, recipe, save_ok, tb_ok)
        except BaseException as exc:  # noqa: BLE001 - the report names it; SystemExit from megatron included
            rec.item("training", "fail", f"{type(exc).__name__}: {exc}".strip(),
                     fix="see the traceback in this rank's log", traceback=traceback.format_exc()[-4000:])
    else:
        rec.item("training", "skipped", "a fused path the recipe asks for is unavailable on some process (above)")
    trained = _agree(built is not None)
    check_pipeline_labels(rec, plan, recipe, built if trained else None)
    if trained:
        with cpu_runtime.device_redirect():  # without CUDA: megatron's device="cuda" requests -> CPU
            _guarded(rec, "collectives", time_collectives, rec)
            if save_ok:
                _guarded(rec, "checkpoint", check_checkpoint, rec, built, margs, plan.steps)
            else:
                rec.item("checkpoint", "fail", "no checkpoint could be written (storage item)",
                         fix="point run.dir (or megatron.save) at a writable shared file system")
            if tb_ok:
                _guarded(rec, "tensorboard", check_tensorboard, rec, plan.tensorboard_dir, plan.steps)
            else:
                rec.item("tensorboard", "fail", "no event file could be written (storage item)",
                         fix="point run.dir (or megatron.tensorboard_dir) at a writable shared file system")
    else:
        for item in ("collectives", "checkpoint"):
            rec.item(item, "skipped", "the training steps did not finish on every process")
    dist.barrier()
    if rank == 0 and not plan.keep:
        for d in plan.scratch:
            shutil.rmtree(d, ignore_errors=True)
            try:  # <run.dir>/preflight when it holds nothing else
                Path(d).parent.rmdir()
            except OSError:
                pass
    rec.finish()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
