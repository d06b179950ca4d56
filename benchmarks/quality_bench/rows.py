"""The rows of the router-quality benchmark and the plan of one invocation.

A row is a name plus recipe overrides on one shared base recipe (``ROWS``; add a row there);
``ABLATIONS`` pairs each one-change AC row with its top-k and cosine references; ``CPU_DEFAULTS``
is the small default model for a 2-core CPU. ``Plan`` is what every run of one invocation shares
(base recipe and overrides, process and thread counts, where runs and results go), built from the
command-line arguments by ``build_plan``; ``run_overrides`` gives one (row, seed)'s overrides and
``base_hash`` the hash of what every row of one table shares (stored with each run's result).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository (benchmarks/quality_bench/rows.py)
DEFAULT_CONFIG = "configs/tiny_cpu.yaml"


# ---------------------------------------------------------------------------------------------
# the rows: one name + overrides on the shared base recipe. Add rows here.


@dataclass(frozen=True)
class Row:
    name: str
    overrides: tuple[str, ...]
    default: bool = True  # part of the default set (False: investigation / ablation rows)
    note: str = ""


ROWS: tuple[Row, ...] = (
    Row("topk", ("acmoe.router=topk",), note="megatron's linear top-k router on every MoE layer (SMoE baseline)"),
    Row("cosine", ("acmoe.router=cosine",), note="AC scoring with M = I (cosine router) from the first AC layer"),
    Row("ac", ("acmoe.router=ac",), note="Adaptive Clustering router from the first AC layer"),
    Row("xmoe", ("acmoe.router=xmoe",), note="XMoE (Chi et al. 2022)"),
    Row("stablemoe", ("acmoe.router=stablemoe",), note="StableMoE (Dai et al. 2022)"),
    Row("stablemoe-lite", ("acmoe.router=stablemoe-lite",), note="StableMoE, light variant"),
    Row("usmoe", ("acmoe.router=usmoe",), note="USMoE"),
    Row("etr", ("acmoe.router=etr", "megatron.moe_expert_capacity_factor=1.25"), note="ETR, capacity factor 1.25"),
    Row("elliptical", ("acmoe.router=topk", "elliptical.enabled=true"), note="top-k router + Elliptical attention"),
    Row("ac+elliptical", ("acmoe.router=ac", "elliptical.enabled=true"), note="AC router + Elliptical attention"),
    # investigation rows (not in the default set): what moves AC's result
    Row("ac-clean", ("acmoe.router=ac", "acmoe.mode=clean"), False,
        "AC, clean mode (clusters with < min_cluster_size tokens get M = I)"),
    Row("ac-first2", ("acmoe.router=ac", "acmoe.first_ac_layer=2"), False, "AC from MoE layer 2"),
    Row("ac-first4", ("acmoe.router=ac", "acmoe.first_ac_layer=4"), False, "AC on the last MoE layer only"),
    Row("ac-ema", ("acmoe.router=ac", "acmoe.source=ema"), False, "AC with running (EMA) statistics, causal-safe"),
    # AC on top of cosine-routed lead layers: its M = I reference is stablemoe-lite (cosine on every MoE layer)
    Row("ac-coslead", ("acmoe.router=ac", "acmoe.lead_router=cosine"), False,
        "AC, the MoE layers before it routed by the cosine router instead of megatron's linear one"),
    # both changes that helped AC at 2000 steps together: does M add anything over its M = I
    # reference (stablemoe-lite) once its statistics are stable?
    Row("ac-ema-coslead", ("acmoe.router=ac", "acmoe.source=ema", "acmoe.lead_router=cosine"), False,
        "AC with running (EMA) statistics on cosine-routed lead layers (M = I reference: stablemoe-lite)"),
    Row("ac-local", ("acmoe.router=ac", "acmoe.scope=local"), False,
        "AC statistics over this rank's tokens (= tp scope with 1 process)"),
    Row("ac-mb4", ("acmoe.router=ac", "megatron.micro_batch_size=4"), False,
        "AC statistics over micro-batches of 4 sequences (same global batch, 4 accumulation steps)"),
    Row("topk-mb4", ("acmoe.router=topk", "megatron.micro_batch_size=4"), False,
        "reference for ac-mb4 (aux loss per micro-batch of 4)"),
    Row("ac-mb32", ("acmoe.router=ac", "megatron.micro_batch_size=32", "megatron.global_batch_size=32"), False,
        "AC statistics over 32 sequences (4096 tokens): twice the batch, so twice the training tokens"),
    Row("topk-mb32", ("acmoe.router=topk", "megatron.micro_batch_size=32", "megatron.global_batch_size=32"), False,
        "reference for ac-mb32 (same doubled batch)"),
    # ablations of the release recipe (configs/release_cpu.yaml): one change, applied to AC and to
    # the references it affects, so that AC - topk and AC - cosine can be compared under it
    *(Row(f"{r}-balance", (f"acmoe.router={r}", "megatron.moe_router_load_balancing_type=aux_loss",
                           "megatron.moe_aux_loss_coeff=0.01"), False,
          f"{r} with megatron's aux load-balancing loss 0.01 on every MoE layer (our recipes' default)")
      for r in ("topk", "cosine", "ac")),
    *(Row(f"{r}-freenorm", (f"acmoe.router={r}", "acmoe.expert_norm=null"), False,
          f"{r} with megatron's N(0, init_method_std) expert embeddings and a free norm")
      for r in ("cosine", "ac")),
    *(Row(f"{r}-clip", (f"acmoe.router={r}", "megatron.clip_grad=1.0"), False,
          f"{r} with gradient clipping 1.0 (our recipes' default)") for r in ("topk", "cosine", "ac")),
    *(Row(f"{r}-e8", (f"acmoe.router={r}", "megatron.num_experts=8"), False, f"{r} with 8 experts instead of 16")
      for r in ("topk", "cosine", "ac")),
    *(Row(f"{r}-mb6", (f"acmoe.router={r}", "megatron.micro_batch_size=6"), False,
          f"{r}, micro-batches of 6 sequences (half the tokens per AC statistic, same global batch)")
      for r in ("topk", "ac")),
)
ROW_BY_NAME = {r.name: r for r in ROWS}
# The ablation table: one change each, (AC row, top-k reference, cosine reference) under that change
# (a reference the change does not touch is the base row itself; None: no such reference).
ABLATIONS: tuple[tuple[str, str, str | None, str | None], ...] = (
    ("none (the base recipe)", "ac", "topk", "cosine"),
    ("aux balance loss 0.01 on every MoE layer", "ac-balance", "topk-balance", "cosine-balance"),
    ("free expert norm, megatron's init", "ac-freenorm", "topk", "cosine-freenorm"),
    ("gradient clipping 1.0", "ac-clip", "topk-clip", "cosine-clip"),
    ("8 experts instead of 16", "ac-e8", "topk-e8", "cosine-e8"),
    ("half the tokens per AC statistic (micro-batch 6)", "ac-mb6", "topk-mb6", None),
    ("EMA statistics (acmoe.source=ema)", "ac-ema", "topk", "cosine"),
    ("clean mode (acmoe.mode=clean)", "ac-clean", "topk", "cosine"),
    # cosine with cosine lead layers is cosine on every MoE layer, i.e. stablemoe-lite
    ("cosine lead layers (acmoe.lead_router=cosine)", "ac-coslead", "topk", "stablemoe-lite"),
    ("EMA statistics on cosine lead layers", "ac-ema-coslead", "topk", "stablemoe-lite"),
)
DEFAULT_ROWS = tuple(r.name for r in ROWS if r.default)

# The default model, calibrated for a 2-core CPU (see the results file): on top of
# configs/tiny_cpu.yaml (4 layers, all MoE, 8 experts top-2, AC from MoE layer 3 = layers 3-4,
# AdamW lr 2e-3 cosine, aux loss 0.01, z-loss 0.001), a narrower model on 128-byte sequences in
# one process (EP 1) so that two runs can share the two cores.
CPU_DEFAULT_STEPS = 300
CPU_DEFAULTS: tuple[str, ...] = (
    "data.path=data/stdlib_s128",
    "megatron.seq_length=128",
    "megatron.max_position_embeddings=128",
    "megatron.hidden_size=64",
    "megatron.num_attention_heads=4",
    "megatron.ffn_hidden_size=128",
    "megatron.moe_ffn_hidden_size=128",
    "megatron.expert_model_parallel_size=1",
    "megatron.micro_batch_size=16",
    "megatron.global_batch_size=16",
    "megatron.lr_warmup_iters=30",
    "megatron.eval_interval=25",
    "megatron.eval_iters=16",
    "megatron.log_interval=10",
)


def merge_overrides(overrides) -> list[str]:
    """``SECTION.KEY=VALUE`` list with one entry per key: the last value, at the key's first place."""
    last: dict[str, str] = {}
    for text in overrides:
        last[text.split("=", 1)[0]] = text
    return list(last.values())


def select_rows(spec: str | None) -> list[Row]:
    """``None``/"default" → the default rows; "all" → every row; else comma/space separated names."""
    if spec is None or spec.strip() in ("", "default"):
        return [ROW_BY_NAME[n] for n in DEFAULT_ROWS]
    if spec.strip() == "all":
        return list(ROWS)
    names = [n for n in re.split(r"[,\s]+", spec.strip()) if n]
    unknown = [n for n in names if n not in ROW_BY_NAME]
    if unknown:
        raise SystemExit(f"quality.py: unknown row(s) {unknown}; rows: {[r.name for r in ROWS]}")
    seen = set()
    return [ROW_BY_NAME[n] for n in names if not (n in seen or seen.add(n))]


def parse_seeds(spec: str) -> list[int]:
    """``"3"`` → seeds 1, 2, 3; ``"1,2,5"`` → those seeds."""
    spec = spec.strip()
    if "," not in spec and spec.isdigit():
        n = int(spec)
        if n < 1:
            raise SystemExit("quality.py: --seeds needs at least one seed")
        return list(range(1, n + 1))
    seeds = [int(s) for s in re.split(r"[,\s]+", spec) if s]
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"quality.py: --seeds {spec!r}: give a count or distinct seeds (1,2,3)")
    return seeds


# ---------------------------------------------------------------------------------------------
# the plan of one invocation


@dataclass
class Plan:
    config: str
    base: list[str]  # CPU defaults (if any) + --steps + --set
    nproc: int
    runs_root: Path
    results_dir: Path  # benchmarks/results/quality
    corrupt_data: Path | None
    threads: int
    cpu_defaults: bool
    command: str = ""  # the benchmark command line, stored with each run


def run_overrides(plan: Plan, row: Row, seed: int) -> list[str]:
    run_dir = plan.runs_root / row.name / f"seed{seed}"
    return [*plan.base, *row.overrides, f"megatron.seed={seed}", f"data.seed={seed}",
            f"run.dir={run_dir}", f"run.name=quality-{row.name}-seed{seed}"]


def base_hash(plan: Plan) -> str:
    """What every row of one table shares: the base recipe (rows, seeds and run dirs left out) and
    the process count."""
    from acmoe_megatron.runtime.recipe import load_recipe

    d = load_recipe(plan.config, plan.base).identity_dict()  # keys newer than stored results, at default: out
    d["run"] = {}
    d["megatron"].pop("seed", None)
    d["data"].pop("seed", None)
    blob = json.dumps({"recipe": d, "nproc": plan.nproc}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def build_plan(args) -> Plan:
    cpu_defaults = args.config is None
    config = args.config or DEFAULT_CONFIG
    base: list[str] = list(CPU_DEFAULTS) if cpu_defaults else []
    steps = args.steps if args.steps is not None else (CPU_DEFAULT_STEPS if cpu_defaults else None)
    if steps is not None:
        base.append(f"megatron.train_iters={steps}")
        base.append(f"megatron.save_interval={steps}")  # one checkpoint: the final one
    base = merge_overrides(base + list(args.set or []))
    if args.threads:
        threads = args.threads
    else:
        threads = max(1, (os.cpu_count() or 1) // (args.jobs * args.nproc))
    results_dir = Path(args.out).with_suffix("")
    return Plan(config=config, base=base, nproc=args.nproc, runs_root=Path(args.runs_dir), results_dir=results_dir,
                corrupt_data=Path(args.corrupt_data) if args.corrupt_data else None, threads=threads,
                cpu_defaults=cpu_defaults, command=getattr(args, "command_line", ""))


def _rel(p: Path | str) -> Path:
    p = Path(p)
    try:
        return p.resolve().relative_to(ROOT)
    except ValueError:
        return p
