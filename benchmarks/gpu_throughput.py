"""One-GPU throughput of a megatron MoE layer: megatron's top-k router vs the AC router.

What is timed: one megatron ``MoELayer`` (router → all-to-all dispatcher → experts → combine),
forward + backward, on ``seq × mbs`` tokens of width ``hidden``, at realistic sizes. Attention is
left out on purpose: the question is what the AC router costs relative to megatron's router inside
the same MoE layer, and the expert throughput (TFLOP/s, MFU) that layer reaches. The AC layer gets
fixed previous-layer labels (as it would from the MoE layer before it), so its timing includes the
full AC statistics (per-expert mean, MAD, weights, clip, normalisation) and the transformed scores.

FLOPs counted (matmuls only, the standard MFU convention): per token forward
``2·h·E`` (router) + ``k · 2·(2·h·f)`` (expert fc1 + fc2, non-gated), backward = 2 × forward, so
step FLOPs = 3 × forward. MFU = achieved / peak, with the peak stated in the results (dense BF16
without sparsity: H100 SXM and H200 989 TFLOP/s).

Experts: megatron's ``SequentialMLP`` (one GEMM per expert) when Transformer Engine is absent,
``TEGroupedMLP`` (grouped GEMM) with ``--te``; FP8 needs TE (``--precisions bf16,fp8``).

    python benchmarks/gpu_throughput.py                       # default sweep, writes the results file
    python benchmarks/gpu_throughput.py --shapes 4096x14336x8 --steps 50
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
from pathlib import Path

import torch

PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "B200": 2250e12}


def peak_for(name: str) -> tuple[float | None, str]:
    for key, value in PEAK_BF16.items():
        if key in name:
            return value, f"{key} dense BF16 {value / 1e12:.0f} TFLOP/s"
    return None, "unknown GPU: no peak, MFU not reported"


def init_dist():
    from acmoe_megatron.testing import init_single_process

    init_single_process("nccl")


def build_layer(router: str, hidden: int, ffn: int, experts: int, topk: int, precision: str, use_te: bool):
    import functools

    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.transformer_config import TransformerConfig

    from acmoe_megatron.core.settings import ACSettings
    from acmoe_megatron.model.chunk_state import ChunkState
    from acmoe_megatron.model.routers import ACRouter

    fp8 = {"fp8": "hybrid", "fp8_recipe": "delayed"} if precision == "fp8" else {}
    config = TransformerConfig(
        num_layers=2, hidden_size=hidden, num_attention_heads=max(1, hidden // 128), ffn_hidden_size=ffn,
        num_moe_experts=experts, moe_router_topk=topk, moe_ffn_hidden_size=ffn,
        moe_token_dispatcher_type="alltoall", moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=1e-2, moe_router_dtype="fp32", moe_grouped_gemm=use_te,
        bf16=True, params_dtype=torch.bfloat16, add_bias_linear=False,
        gradient_accumulation_fusion=False, hidden_dropout=0.0, attention_dropout=0.0, **fp8,
    )
    if use_te:
        spec = get_gpt_layer_with_transformer_engine_spec(num_experts=experts, moe_grouped_gemm=True)
    else:
        spec = get_gpt_layer_local_spec(num_experts=experts, moe_grouped_gemm=False)
    mlp = spec.submodules.mlp
    state = None
    if router in ("ac", "ac+compile"):
        state = ChunkState([1, 2], [1, 2])
        sub = mlp.keywords["submodules"]
        import dataclasses

        sub = dataclasses.replace(sub, router=functools.partial(ACRouter,
                                                                 settings=ACSettings(compile=router == "ac+compile")))
        mlp = functools.partial(mlp.func, *mlp.args, **{**mlp.keywords, "submodules": sub})
    layer = mlp(config=config, pg_collection=ProcessGroupCollection.use_mpu_process_groups())
    layer.set_layer_number(2)
    if state is not None:
        layer.router.bind_chunk_state(state)
    return layer.cuda(), state, config


def make_step(layer, state, tokens: int, hidden: int, experts: int, topk: int, fp8: bool):
    """A closure running one forward+backward of ``layer`` on fixed inputs."""
    x = torch.randn(tokens, 1, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    if state is not None:  # labels of the previous MoE layer: a fixed random assignment
        g = torch.Generator(device="cuda").manual_seed(0)
        probs = torch.rand(tokens, experts, device="cuda", generator=g)
        rmap = torch.zeros_like(probs, dtype=torch.bool).scatter(1, probs.topk(topk, -1).indices, True)
        state.put_routing(1, probs * rmap, rmap)
    grad = torch.randn_like(x)
    if fp8:
        import transformer_engine.pytorch as te
        from transformer_engine.common.recipe import DelayedScaling, Format

        recipe = DelayedScaling(fp8_format=Format.HYBRID)

        def run():
            with te.fp8_autocast(enabled=True, fp8_recipe=recipe):
                out, _ = layer(x)
            out.backward(grad)
    else:
        def run():
            out, _ = layer(x)
            out.backward(grad)
    def run_router():  # the router alone: gating (+ AC statistics), top-k, aux losses; fwd + bwd
        probs, _ = layer.router(x)
        probs.sum().backward()

    return run, run_router


def time_steps(run, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def snapshot(run, path: Path) -> None:
    """One step under the CUDA allocator's history recorder, dumped to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.cuda.memory._record_memory_history(max_entries=200_000)
    run()
    torch.cuda.synchronize()
    torch.cuda.memory._dump_snapshot(str(path))
    torch.cuda.memory._record_memory_history(enabled=None)
    print(f"memory snapshot: {path}", flush=True)


def profile(run, title: str, rows: int = 18) -> None:
    """Print the CUDA kernels of a few steps, by total device time (for finding the AC overhead)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            run()
        torch.cuda.synchronize()
    print(f"== profile: {title} (3 steps)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="2048x5632x8,2048x1408x64,4096x14336x8",
                   help="comma list of HIDDENxFFNxEXPERTS")
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--mbs", type=int, default=2)
    p.add_argument("--routers", default="topk,ac,ac+compile",
                   help="topk, ac, ac+compile (acmoe.compile: torch.compile of the AC statistics and scores)")
    p.add_argument("--precisions", default="bf16")
    p.add_argument("--te", action="store_true", help="Transformer Engine grouped-GEMM experts")
    p.add_argument("--profile", action="store_true", help="print the CUDA kernel table of the AC layer")
    p.add_argument("--memory-snapshot", metavar="DIR", default=None,
                   help="dump a CUDA allocator history of one step per router into DIR (open the pickles "
                        "at pytorch.org/memory_viz): where the AC layer's extra peak memory comes from")
    p.add_argument("--steps", type=int, default=60, help="timed steps per router (split over rounds)")
    p.add_argument("--rounds", type=int, default=6, help="interleaved timing rounds per router")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu_throughput.md"))
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_throughput.py needs a CUDA GPU")
    init_dist()
    name = torch.cuda.get_device_name()
    peak, peak_note = peak_for(name)
    tokens = a.seq * a.mbs
    rows = []
    for shape in a.shapes.split(","):
        hidden, ffn, experts = (int(v) for v in shape.split("x"))
        for precision in a.precisions.split(","):
            routers = a.routers.split(",")
            runs, router_runs, mems = {}, {}, {}
            times, router_times = {r: [] for r in routers}, {r: [] for r in routers}
            for router in list(routers):
                torch.manual_seed(0)
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()  # other routers' layers stay alive: subtract them
                layer, state, _ = build_layer(router, hidden, ffn, experts, a.topk, precision, a.te)
                runs[router], router_runs[router] = make_step(layer, state, tokens, hidden, experts, a.topk,
                                                              precision == "fp8")
                torch.cuda.reset_peak_memory_stats()
                try:
                    for _ in range(a.warmup):
                        runs[router]()
                    torch.cuda.synchronize()
                except Exception as e:  # e.g. ac+compile without Triton: report, go on with the others
                    print(json.dumps(dict(shape=shape, router=router, failed=f"{type(e).__name__}: {e}"[:300])))
                    routers.remove(router)
                    del runs[router], router_runs[router]
                    continue
                mems[router] = torch.cuda.max_memory_allocated() - base
                if a.memory_snapshot:
                    snapshot(runs[router], Path(a.memory_snapshot) / f"{shape}_{precision}_{router}.pickle")
            # interleave the routers in rounds so clock/thermal drift hits them alike
            for _ in range(a.rounds):
                for router in routers:
                    times[router] += time_steps(runs[router], max(1, a.steps // a.rounds))
                    router_times[router] += time_steps(router_runs[router], max(1, a.steps // a.rounds))
            if a.profile and "ac" in runs:
                profile(runs["ac"], f"AC MoE layer {shape} {precision}")
            step = {}
            for router in routers:
                t = statistics.median(times[router])
                flops = 3 * tokens * (2 * hidden * experts + a.topk * 4 * hidden * ffn)
                step[router] = t
                row = dict(hidden=hidden, ffn=ffn, experts=experts, topk=a.topk, tokens=tokens,
                           precision=precision, router=router, step_ms=round(t * 1e3, 3),
                           p10_ms=round(sorted(times[router])[len(times[router]) // 10] * 1e3, 3),
                           router_ms=round(statistics.median(router_times[router]) * 1e3, 3),
                           tokens_per_s=round(tokens / t), tflops=round(flops / t / 1e12, 1),
                           mfu=round(flops / t / peak, 4) if peak else None,
                           max_mem_gib=round(mems[router] / 2**30, 2))
                rows.append(row)
                print(json.dumps(row), flush=True)
            for ac in ("ac", "ac+compile"):
                if ac in step and "topk" in step:
                    rows.append(dict(hidden=hidden, ffn=ffn, experts=experts, precision=precision, router=ac,
                                     ac_over_topk=round(step[ac] / step["topk"], 4)))
                    print(json.dumps(rows[-1]), flush=True)
            del runs
            torch.cuda.empty_cache()
    write_results(a, rows, name, peak_note)


def write_results(a, rows, gpu, peak_note):
    import megatron.core

    from acmoe_megatron.model.precision import fused_paths

    lines = [
        "# GPU throughput: megatron MoE layer, top-k router vs AC router",
        "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- GPU: {gpu} (1 device); peak used for MFU: {peak_note}",
        f"- software: torch {torch.__version__}, CUDA {torch.version.cuda}, megatron-core "
        f"{megatron.core.__version__}, Python {platform.python_version()}",
        f"- fused paths: {json.dumps(fused_paths())}",
        f"- command: `python benchmarks/gpu_throughput.py --shapes {a.shapes} --topk {a.topk} --seq {a.seq} "
        f"--mbs {a.mbs} --routers {a.routers} --precisions {a.precisions}{' --te' if a.te else ''} "
        f"--steps {a.steps} --rounds {a.rounds} --warmup {a.warmup}`",
        "- router-only: the router's forward (gating + AC statistics + top-k + aux losses) and backward alone",
        "- timed: one MoELayer forward+backward (router, all-to-all dispatcher with EP=1 over NCCL, "
        "experts, combine), median of the timed steps, the routers timed in interleaved rounds; attention excluded",
        "- FLOPs: 3 × (2·h·E + k·4·h·f) per token (router + non-gated expert fc1/fc2, fwd+bwd)",
        "",
        "| hidden | ffn | experts | precision | router | step ms (median) | p10 ms | router-only ms | tokens/s | TFLOP/s | MFU | layer peak mem GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ratios = []
    for r in rows:
        if "step_ms" in r:
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            lines.append(f"| {r['hidden']} | {r['ffn']} | {r['experts']} | {r['precision']} | {r['router']} | "
                         f"{r['step_ms']} | {r['p10_ms']} | {r['router_ms']} | {r['tokens_per_s']} | {r['tflops']} | {mfu} | {r['max_mem_gib']} |")
        else:
            ratios.append(r)
    lines += ["", "AC / top-k step-time ratio:", "", "| hidden | ffn | experts | precision | router | AC/top-k |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['hidden']} | {r['ffn']} | {r['experts']} | {r['precision']} | {r['router']} | {r['ac_over_topk']} |"
              for r in ratios]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
