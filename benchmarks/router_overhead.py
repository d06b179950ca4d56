"""CPU overhead of the AC router and of elliptical attention: forward+backward of the whole model,
side by side in one process, timed in interleaved rounds; writes
``benchmarks/results/router_overhead.md``.

* router: the same tiny ACMoE GPT with megatron's top-k router everywhere vs the AC router (from
  MoE layer 3, the paper's placement);
* attention: the top-k MoE GPT with and without elliptical attention (metric from attention layer 2,
  the official placement), and the same pair as a dense GPT (no MoE layer), where attention is a
  larger share of the step.

    python benchmarks/router_overhead.py                 # the default configs/tiny_cpu.yaml shape
    python benchmarks/router_overhead.py --hidden 256 --seq 512 --steps 40
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from pathlib import Path

import torch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--mbs", type=int, default=8)
    p.add_argument("--steps", type=int, default=30, help="timed steps per router")
    p.add_argument("--rounds", type=int, default=30, help="interleaved rounds (steps/rounds steps per model each)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 = one training rank's share of 2 cores)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "router_overhead.md"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    from acmoe_megatron.testing import build_gpt, init_single_process, tiny_config

    init_single_process("gloo")  # the CPU runtime first: the modules below import megatron's layers
    from acmoe_megatron.core.settings import ACSettings
    from acmoe_megatron.model.chunk_state import reset_states
    from acmoe_megatron.model.elliptical import EllipticalSettings

    cfg = dict(num_layers=a.layers, hidden_size=a.hidden, num_attention_heads=4, ffn_hidden_size=2 * a.hidden,
               num_moe_experts=a.experts, moe_ffn_hidden_size=2 * a.hidden, moe_z_loss_coeff=1e-3)
    tokens = torch.randint(0, 256, (a.mbs, a.seq + 1), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(a.seq).unsqueeze(0).expand(a.mbs, -1)
    dense = dict(cfg, num_moe_experts=None, moe_ffn_hidden_size=None, moe_z_loss_coeff=None)
    ellip = EllipticalSettings(enabled=True)
    variants = {  # name: (config, router, elliptical)
        "topk": (cfg, "topk", None), "ac": (cfg, "ac", None), "topk+elliptical": (cfg, "topk", ellip),
        "dense": (dense, "topk", None), "dense+elliptical": (dense, "topk", ellip),
    }
    models = {}
    for name, (c, router, el) in variants.items():
        torch.manual_seed(0)
        models[name] = build_gpt(tiny_config(**c), ACSettings(router=router, first_ac_layer=3),
                                 vocab_size=256, max_sequence_length=a.seq, elliptical=el)

    def step(model):
        reset_states(model)
        loss = model(tokens[:, :-1], pos, None, labels=tokens[:, 1:]).mean()
        loss.backward()

    times = {r: [] for r in models}
    for r, m in models.items():  # warm-up
        for _ in range(3):
            step(m)
    names = list(models)
    for i in range(a.rounds):  # rotate the order so no model always runs first after a pause
        for r in names[i % len(names):] + names[: i % len(names)]:
            m = models[r]
            for _ in range(max(1, a.steps // a.rounds)):
                t0 = time.perf_counter()
                step(m)
                times[r].append(time.perf_counter() - t0)
    med = {r: statistics.median(v) for r, v in times.items()}
    ratio = med["ac"] / med["topk"]
    ratio_el = med["topk+elliptical"] / med["topk"]
    ratio_dense = med["dense+elliptical"] / med["dense"]
    n_ac = a.layers - 2
    lines = [
        "# Overhead on CPU: AC router vs megatron top-k; elliptical attention vs standard",
        "",
        f"- date: {datetime.date.today().isoformat()}; machine: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch threads {a.threads}; torch {torch.__version__}",
        f"- model: {a.layers} layers, all MoE, hidden {a.hidden}, {a.experts} experts top-2, "
        f"{a.mbs} × {a.seq} tokens per step; AC on {n_ac} of {a.layers} MoE layers (from MoE layer 3)",
        f"- command: `python benchmarks/router_overhead.py --layers {a.layers} --hidden {a.hidden} "
        f"--experts {a.experts} --seq {a.seq} --mbs {a.mbs} --steps {a.steps} --rounds {a.rounds} "
        f"--threads {a.threads}`",
        f"- elliptical: metric on attention layers 2..{a.layers} (layer 1 standard), source sequence, scale "
        "standard; `dense` = the same GPT without MoE layers (dense MLP of the same width)",
        "- timed: forward + backward of the whole model (loss.backward(), no optimizer), median over "
        "interleaved rounds (each round runs every model in turn, in rotating order)",
        "- the 2 cores are shared with other work while this runs: compare rows of one run, not across runs",
        "",
        "| model | median step ms | p10 ms |",
        "|---|---|---|",
    ]
    for r, v in times.items():
        lines.append(f"| {r} | {1e3 * med[r]:.1f} | {1e3 * sorted(v)[len(v) // 10]:.1f} |")
    lines += ["", f"**AC / top-k step-time ratio: {ratio:.3f}** (goal on CPU: ≤ 1.03)", "",
              f"**elliptical / standard attention step-time ratio: {ratio_el:.3f} (top-k MoE GPT), "
              f"{ratio_dense:.3f} (dense GPT)** (goal on CPU: ≤ 1.05)"]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    from acmoe_megatron.runtime import cpu_runtime
    with cpu_runtime.device_redirect():  # CPU only: megatron's device="cuda" requests -> CPU
        main()
