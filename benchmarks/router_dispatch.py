"""The router alone: how many kernels it launches and what it keeps for backward, AC vs top-k.

On a GPU the AC router's extra cost at realistic sizes is mostly *launches*, not arithmetic: its
statistics and weights are dozens of small K×D operations (the H200 session measured the router
at +1.0–1.5 ms for 8192 tokens, about what ~60 extra eager ops cost on the host). Launch count
and host time per op do not depend on the GPU, so they are measured here on any machine:

* aten ops: operators dispatched in one forward + backward of the router (``TorchDispatchMode``),
  each one a kernel launch on a GPU (views included: they cost host time, not device time);
* host ms: wall time of one forward + backward at a tiny shape (64 tokens × 64), where the
  arithmetic is negligible and the time is the per-op overhead (Python, dispatcher, autograd),
  timed outside the CPU runtime's CUDA→CPU function mode (a GPU run has none);
* saved MiB: bytes the autograd graph keeps for backward at a realistic shape (8192 tokens ×
  hidden 4096, bf16 activations), not counting the router's input x, which every router keeps.

    python benchmarks/router_dispatch.py              # writes benchmarks/results/router_dispatch.md
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

ROUTERS = ("topk", "cosine", "ac", "ac+compile")
# aten ops that only make a new view (no kernel on a GPU; host time only)
VIEW_OPS = {"view", "_unsafe_view", "t", "transpose", "permute", "unsqueeze", "squeeze", "expand", "detach",
            "select", "slice", "alias", "as_strided", "split", "unbind", "chunk", "narrow", "diagonal"}


def build(router: str, hidden: int, experts: int, dtype, state):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe.router import TopKRouter

    from acmoe_megatron.core.settings import ACSettings
    from acmoe_megatron.model.routers import ACRouter, CosineRouter
    from acmoe_megatron.testing import tiny_config

    cfg = tiny_config(hidden_size=hidden, num_moe_experts=experts, moe_router_dtype="fp32",
                      num_attention_heads=4, params_dtype=dtype)
    pg = ProcessGroupCollection.use_mpu_process_groups()
    if router == "topk":
        r = TopKRouter(config=cfg, pg_collection=pg)
    elif router == "cosine":
        r = CosineRouter(config=cfg, pg_collection=pg)
    else:
        r = ACRouter(config=cfg, pg_collection=pg, settings=ACSettings(compile=router == "ac+compile"))
    if router != "topk":
        r.bind_chunk_state(state)
    r.set_layer_number(2)
    return r


def inputs(tokens: int, hidden: int, experts: int, dtype, state):
    """x of the MoE layer and the previous MoE layer's labels (a random top-2 assignment)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, 1, hidden, generator=g).to(dtype).requires_grad_(True)
    probs = torch.rand(tokens, experts, generator=g)
    rmap = torch.zeros_like(probs, dtype=torch.bool).scatter(1, probs.topk(2, -1).indices, True)
    state.reset()
    state.put_routing(1, probs * rmap, rmap)
    return x


def step(router, x):
    probs, _ = router(x)
    probs.sum().backward()


def count_ops(router, x) -> tuple[int, int] | None:
    """(aten ops, of which not views) of one forward + backward; None for a compiled router."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[str(func)] += 1
            return func(*args, **(kwargs or {}))

    step(router, x)  # warm-up (lazy initialisation and compilation stay out of the count)
    if getattr(getattr(router, "ac", None), "compile", False):
        return None  # compiled graphs cannot run under a dispatch mode: no count
    with Count() as c:
        step(router, x)
    kernels = sum(n for op, n in c.ops.items() if op.split(".")[1] not in VIEW_OPS)
    return sum(c.ops.values()), kernels


def saved_bytes(router, x) -> int:
    """Bytes of the distinct storages autograd saves for backward, the input x's excluded."""
    storages = {}

    def pack(t):
        if t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr():
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        probs, _ = router(x)
    probs.sum().backward()
    return sum(storages.values())


def host_ms(routers: dict, xs: dict, rounds: int, reps: int) -> dict:
    times = {name: [] for name in routers}
    for name in routers:
        for _ in range(5):
            step(routers[name], xs[name])
    for _ in range(rounds):  # interleaved: drift hits every router alike
        for name, r in routers.items():
            t0 = time.perf_counter()
            for _ in range(reps):
                step(r, xs[name])
            times[name].append((time.perf_counter() - t0) / reps)
    return {name: statistics.median(v) * 1e3 for name, v in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--routers", default=",".join(ROUTERS), help=f"comma list of {ROUTERS}")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--saved-shape", default="8192x4096", help="TOKENSxHIDDEN for the saved-bytes column")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "router_dispatch.md"))
    a = p.parse_args(argv)
    torch.set_num_threads(1)

    from acmoe_megatron.runtime import cpu_runtime
    from acmoe_megatron.testing import init_single_process

    init_single_process("gloo")
    from acmoe_megatron.model.chunk_state import ChunkState

    E = a.experts
    routers = a.routers.split(",")
    states = {name: ChunkState([1, 2], [1, 2]) for name in routers}
    tiny = {name: build(name, 64, E, torch.float32, states[name]) for name in routers}
    xs = {name: inputs(64, 64, E, torch.float32, states[name]) for name in routers}
    with cpu_runtime.device_redirect_paused():  # a GPU run has no CUDA->CPU function mode either
        ops = {name: count_ops(tiny[name], xs[name]) for name in routers}
        ms = host_ms(tiny, xs, a.rounds, a.reps)
    T, D = (int(v) for v in a.saved_shape.split("x"))
    saved = {}
    for name in routers:
        r = build(name, D, E, torch.bfloat16, states[name])
        saved[name] = saved_bytes(r, inputs(T, D, E, torch.bfloat16, states[name])) / 2**20
        del r
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = "?"
    lines = [
        "# The router alone: aten ops, host time and saved memory (AC vs megatron's top-k)",
        "",
        f"- date: {datetime.date.today().isoformat()}; commit {commit}; machine: {platform.machine()}, "
        f"{os.cpu_count()} cores, 1 torch thread; torch {torch.__version__}",
        f"- command: `python benchmarks/router_dispatch.py --experts {E} --routers {a.routers} --rounds {a.rounds} --reps {a.reps} "
        f"--saved-shape {a.saved_shape}`",
        f"- routers: megatron `TopKRouter` (fp32 router dtype), `cosine` (M = I), `ac` (statistics, weights, "
        f"scores; AC defaults), `ac+compile` (`acmoe.compile: true`: torch.compile of those), {E} experts top-2, aux loss on; the AC router gets fixed previous-layer labels",
        "- aten ops and host ms: one forward + backward at 64 tokens × hidden 64 (per-op overhead only); "
        f"saved MiB: at {T} tokens × hidden {D}, bf16 activations, input x excluded",
        "",
        "| router | aten ops fwd+bwd | of which not views (GPU kernels) | host ms fwd+bwd | saved for backward MiB |",
        "|---|---|---|---|---|",
    ]
    for name in routers:
        n_ops, n_kernels = ("n/a (compiled)", "n/a") if ops[name] is None else ops[name]
        lines.append(f"| {name} | {n_ops} | {n_kernels} | {ms[name]:.3f} | {saved[name]:.1f} |")
    if "ac" in routers and "topk" in routers:
        lines += ["", f"AC − top-k: {ops['ac'][0] - ops['topk'][0]} ops ({ops['ac'][1] - ops['topk'][1]} not views), "
                  f"{ms['ac'] - ms['topk']:.3f} ms host, "
                  f"{saved['ac'] - saved['topk']:.1f} MiB saved"]
    if "ac+compile" in routers and "topk" in routers:
        lines += ["", f"compiled AC − top-k: {ms['ac+compile'] - ms['topk']:.3f} ms host"]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    from acmoe_megatron.runtime import cpu_runtime
    with cpu_runtime.device_redirect():  # CPU only: megatron's device="cuda" requests -> CPU
        main()
