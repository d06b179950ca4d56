"""The router-quality benchmark's Markdown results file (``write_report``): the header lines (date,
machine, software, command, runs), the settings shared by every row, the rows, the results table
(mean ± std over seeds) and the per-seed table, the ablation table (``ablation_lines``), the AC
internals table (``ac_internal_lines``), the verdict, the figures, and the investigation-notes
block, which is kept when the file is regenerated (``_keep_notes``).
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import statistics  # the standard library's; this package's is imported by name below
from pathlib import Path

from .figures import make_figures
from .rows import ABLATIONS, ROOT, ROWS, Plan, Row, _rel
from .runner import STATS_WINDOW, load_references, load_results
from .statistics import aggregate_row, fmt_paired, paired_diff, verdict

# ---------------------------------------------------------------------------------------------
# report


def _pm(ms, nd=3, scale=1.0):
    m, s = ms
    if m is None:
        return "–"
    return f"{m * scale:.{nd}f}" + ("" if s is None else f" ± {s * scale:.{nd}f}")


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = ""
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f"; GPU {torch.cuda.device_count()} × {torch.cuda.get_device_name()}"
    except Exception:  # pragma: no cover
        pass
    return f"{cpu}, {os.cpu_count()} cores{gpu}; {platform.system()} {platform.release()}"


def versions_line() -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = [f"Python {platform.python_version()}"]
    for pkg in ("torch", "megatron-core", "numpy"):
        try:
            parts.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            pass
    from acmoe_megatron.observability.summary import code_version

    return ", ".join(parts) + f"; acmoe-megatron git {code_version(ROOT)}"


def settings_lines(plan: Plan, steps: int | None, corrupt: dict | None, threads: list[int]) -> list[str]:
    from acmoe_megatron.core import layers
    from acmoe_megatron.runtime.recipe import load_recipe

    r = load_recipe(plan.config, plan.base)
    mg = r.megatron
    freq = mg.get("moe_layer_freq", 1)
    moe = layers.moe_layers(mg["num_layers"], freq) if mg["num_experts"] else []
    ac = layers.ac_layers(mg["num_layers"], freq, r.acmoe.first_ac_layer) if mg["num_experts"] else []
    g = lambda k, d="–": mg.get(k, d)  # noqa: E731
    tokens = int(g("global_batch_size", 0)) * int(g("seq_length", 0))
    lines = [
        f"- base recipe: `{plan.config}`" + (" + the benchmark's CPU model (`CPU_DEFAULTS` in benchmarks/quality_bench/rows.py)"
                                             if plan.cpu_defaults else "")
        + f"; overrides shared by every row: `{' '.join(plan.base)}`",
        f"- model: {g('num_layers')} layers ({len(moe)} MoE: layers {moe}), hidden {g('hidden_size')}, "
        f"{g('num_attention_heads')} heads, {g('num_experts')} experts (FFN {g('moe_ffn_hidden_size')}) top-"
        f"{g('moe_router_topk')}, {g('position_embedding_type', 'learned')} positions, {g('normalization', 'LayerNorm')}; "
        f"AC rows route with AC on MoE layers {ac} (acmoe.first_ac_layer={r.acmoe.first_ac_layer}; the paper: from "
        "the 3rd MoE layer), megatron's top-k router before",
        f"- data: `{r.data.path}`, sequences of {g('seq_length')} tokens; training seed = megatron.seed = data.seed",
        f"- training: {steps} steps × {g('global_batch_size')} sequences (micro-batch {g('micro_batch_size')}) = "
        f"{tokens} tokens/step; {g('optimizer', 'adam')} lr {g('lr')} (min {g('min_lr', 0)}), warm-up "
        f"{g('lr_warmup_iters', 0)}, {g('lr_decay_style', 'linear')} decay, weight decay {g('weight_decay', 0.01)}, "
        f"clip {g('clip_grad', 1.0)}; {g('moe_router_load_balancing_type', 'aux_loss')} coefficient "
        f"{g('moe_aux_loss_coeff', 0)}, z-loss {g('moe_z_loss_coeff', 0)}; dropout {g('hidden_dropout', 0.1)}",
        f"- parallelism: {plan.nproc} process(es), EP {g('expert_model_parallel_size', 1)}, TP "
        f"{g('tensor_model_parallel_size', 1)}, PP {g('pipeline_model_parallel_size', 1)}; "
        f"{'/'.join(map(str, threads)) or plan.threads} torch thread(s) per process (OMP_NUM_THREADS; the "
        "thread count changes the floating-point reduction order: a run with another count differs slightly)",
        f"- evaluation: every {g('eval_interval')} steps on the same first {g('eval_iters')} × "
        f"{g('global_batch_size')} validation sequences (megatron's periodic evaluation, "
        "`RepeatingValidation`); final = the evaluation after the last step",
    ]
    if corrupt:
        applied = corrupt.get("applied_to", {}).get("valid", {})
        lines.append(
            f"- corrupted text: `{corrupt['path']}` (`acmoe-data prepare --corrupt {corrupt.get('spec')}`, marker "
            f"{corrupt.get('marker')!r}, seed {corrupt.get('seed')}): {applied.get('replaced', '?')} of "
            f"{applied.get('units', '?')} whitespace-delimited words of the validation split replaced (on source "
            "code a \"word\" is any run of non-whitespace bytes: identifiers, operators, `foo(x):`; stop words are "
            "not exempt); the final checkpoint is evaluated on it with `acmoe-eval` over the "
            "same number of sequences as the clean validation loss")
    lines.append(
        f"- router instability: per MoE layer the logged `moe/layerLL/instability` (1 − Rand index of the top-1 "
        f"partitions of consecutive MoE layers, spec §6.4, over training micro-batches), averaged over the log "
        f"points of the last {STATS_WINDOW:.0%} of the steps, then over the MoE layers that have a predecessor. "
        "Load imbalance: the same averaging of `moe/layerLL/load_max_over_mean` (max/mean expert load, 1 = "
        "uniform) and `load_cv` (coefficient of variation)")
    return lines


def write_report(args, plan: Plan, rows: list[Row], seeds: list[int], bhash: str, failures: dict[str, str],
                 corrupt: dict | None, missing: list[str] = ()) -> Path:
    """The results file. ``missing``: one line per (row, seed) of a SLURM sweep that has no result
    (failed, cancelled, still queued or running: its state and log), listed under the table."""
    out = Path(args.out)
    results, other = load_results(plan.results_dir, seeds, bhash)
    aggs: dict[str, dict] = {}
    topk_target = None
    if results.get("topk"):
        topk_target = aggregate_row(results["topk"], None)["loss"][0]
    for name, res in results.items():
        aggs[name] = aggregate_row(res, topk_target)
    steps = next((a["steps"] for a in aggs.values() if a["steps"]), None)
    byte_level = True
    try:
        from acmoe_megatron.data.shards.manifest import read_manifest
        from acmoe_megatron.runtime.recipe import load_recipe

        byte_level = read_manifest(load_recipe(plan.config, plan.base).data.path).tokenizer.get("name") == "bytes"
    except Exception:
        pass
    unit = "byte" if byte_level else "token"
    topk_steps = aggs.get("topk", {}).get("steps_to_target")
    header = [
        f"| row | seeds | valid loss (nats/{unit}) | bits/{unit} | perplexity | steps to topk's final loss | "
        f"ratio to topk | corrupted loss | corrupted − clean | instability | load max/mean | load CV | "
        "wall per run (s) |",
        "|---" * 13 + "|",
    ]
    table = []
    shown = [r for r in ROWS if r.name in aggs or r.name in failures or r in rows]
    for row in shown:
        a = aggs.get(row.name)
        if not a or not a["n"]:
            why = failures.get(row.name, "no results")
            table.append(f"| `{row.name}` | 0 | {why[:160]} |" + " |" * 11)
            continue
        s2t = a["steps_to_target"]
        s2t_txt = "–" if topk_target is None else (
            "not reached" if s2t is None else f"{s2t:.0f} ({a['seeds_reaching']}/{a['n']} seeds)")
        ratio = "–" if s2t is None or not topk_steps else f"{s2t / topk_steps:.2f}"
        n_txt = f"{a['n']}" + (f" ({len(a['failed'])} diverged)" if a["failed"] else "")
        table.append(
            f"| `{row.name}` | {n_txt} | {_pm(a['loss'], 4)} | {_pm(a['bits'], 4)} | {_pm(a['ppl'], 3)} | {s2t_txt} | "
            f"{ratio} | {_pm(a['corrupt'], 4)} | {_pm(a['gap'], 4)} | {_pm(a['instability'], 3)} | "
            f"{_pm(a['imbalance'], 3)} | {_pm(a['cv'], 3)} | {_pm(a['wall'], 0)} |")
    all_seeds = sorted({r["seed"] for res in results.values() for r in res})
    per_seed = ["| row | " + " | ".join(f"seed {k}" for k in all_seeds) + " |", "|---" * (len(all_seeds) + 1) + "|"]
    for name, res in results.items():
        by_seed = {r["seed"]: r for r in res}
        cells = []
        for k in all_seeds:
            r = by_seed.get(k)
            if r is None:
                cells.append("–")
            elif r.get("status") != "ok":
                cells.append(r.get("status", "?"))
            else:
                c = r.get("corrupt_valid_loss")
                cells.append(f"{r['final_valid_loss']:.4f}" + ("" if c is None else f" / {c:.4f}"))
        per_seed.append(f"| `{name}` | " + " | ".join(cells) + " |")
    run_cmds = sorted({r["command"] for res in results.values() for r in res if r.get("command")})
    shas = sorted({(r.get("git_sha") or "?")[:10] for res in results.values() for r in res})
    row_lines = ["| row | overrides | in default set | note |", "|---|---|---|---|"]
    for row in shown:
        row_lines.append(f"| `{row.name}` | `{' '.join(row.overrides)}` | {'yes' if row.default else 'no'} | {row.note} |")
    figures = make_figures(plan, results, aggs, out.with_suffix(""))
    notes = _keep_notes(out)
    total_wall = sum(r.get("wall_total_s") or 0 for res in results.values() for r in res)
    lines = [
        "# Router quality: every router on the same model, data, seeds and steps",
        "",
        f"- date: {datetime.date.today().isoformat()}; machine: {machine_line()}",
        f"- software: {versions_line()}",
        f"- command: `{args.command_line}`",
        *(["- the runs were made by: " + "; ".join(f"`{c}`" for c in run_cmds)]
          if run_cmds and run_cmds != [args.command_line] else []),
        f"- runs: {sum(len(v) for v in results.values())} (rows × seeds {seeds}), sum of per-run wall times "
        f"{total_wall / 60:.1f} min" + (f", this invocation {args.elapsed / 60:.1f} min wall with --jobs {args.jobs}"
                                          if getattr(args, "elapsed", None) else ""),
        f"- code of the runs: git {', '.join(shas) or '–'} (`git_sha` of each run's summary; a cached run is not "
        "re-run when only the code changed: use `--rerun`)",
        f"- per-run results (curves, corrupted loss, routing statistics, config hash): "
        f"`{_rel(plan.results_dir / 'runs')}/<row>/seed<k>.json`; regenerate this file from them with "
        "`python benchmarks/quality.py --report-only` (same arguments otherwise)",
        "",
        "## Settings (identical for every row)",
        "",
        *settings_lines(plan, steps, corrupt, sorted({r.get("threads") for v in results.values() for r in v
                                                      if r.get("threads")})),
        "",
        "## Rows",
        "",
        *row_lines,
        "",
        "## Results (mean ± sample std over seeds)",
        "",
        *header,
        *table,
        "",
        *([f"Runs without a result ({len(missing)}; not in the table above):", "", *(f"- {m}" for m in missing), ""]
          if missing else []),
        f"Steps to topk's final loss: first step where the seed-mean validation curve reaches topk's mean final "
        f"validation loss ({'–' if topk_target is None else f'{topk_target:.4f}'}), linearly interpolated between "
        "evaluations; in brackets how many seeds reach it on their own curve. Wall per run: training launch + "
        "corrupted-text evaluation launch (process start-up included).",
        "",
        f"Per seed: final validation loss / corrupted-text loss (nats/{unit}).",
        "",
        *per_seed,
    ]
    refs, merged = {}, dict(results)
    if getattr(args, "references", None) and steps:  # seeds this table has not run itself
        for name, res in load_references(plan, args.references, seeds, steps).items():
            own = {r["seed"] for r in results.get(name, [])}
            refs[name] = [r for r in res if r["seed"] not in own]
            merged[name] = sorted([*results.get(name, []), *refs[name]], key=lambda r: r["seed"])
        refs = {k: v for k, v in refs.items() if v}
    lines += ablation_lines(merged, refs) + length_lines(results) + ac_internal_lines(results)
    if other:
        lines += ["", f"Ignored stored results made with other base settings: {', '.join(other)}."]
    lines += ["", "## Verdict (computed from the table)", "", *verdict(aggs, results), ""]
    if figures:
        lines += ["## Figures", ""] + [f"![{cap}]({os.path.relpath(p, out.parent)})" for cap, p in figures] + [""]
    lines += ["## Investigation notes", "", "<!-- notes:begin (kept when the file is regenerated) -->",
              notes or "_(none yet)_", "<!-- notes:end -->", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    return out


def ablation_lines(results: dict[str, list[dict]], refs: dict[str, list[dict]] | None = None) -> list[str]:
    """Markdown table: AC − topk and AC − cosine (paired by seed, 95% CI) under each change of
    ``ABLATIONS`` whose AC row has results, and what the change does to AC itself. ``refs``: the
    rows among ``results`` that come from another table's longer runs (``load_references``)."""
    def paired(a, b):
        if not results.get(a) or not b or not results.get(b):
            return "–"
        return fmt_paired(*paired_diff(results[b], results[a], "final_valid_loss"))

    rows = [abl for abl in ABLATIONS if results.get(abl[1])]
    if len(rows) < 2:
        return []
    def effect(row, base):  # what the change does to one router: its row − the base recipe's row
        return "–" if row in (None, base) else paired(row, base)

    lines = ["", "## Ablations (paired by seed: same init and data order; nats per token)", "",
             "| change | AC row | AC − topk | AC − cosine | AC with the change − AC without | "
             "topk with − without | cosine with − without |", "|---|---|---|---|---|---|---|"]
    for change, ac_row, topk_row, cos_row in rows:
        lines.append(f"| {change} | `{ac_row}` | {paired(ac_row, topk_row)} | {paired(ac_row, cos_row)} | "
                     f"{effect(ac_row, 'ac')} | {effect(topk_row, 'topk')} | {effect(cos_row, 'cosine')} |")
    if refs:
        where = sorted({r["reference"].split(" at step")[0].rsplit("/runs/", 1)[0] for v in refs.values() for r in v})
        step_of = next(r["reference"].split(" at step ", 1)[1] for v in refs.values() for r in v)
        lines += ["", f"Rows {', '.join(f'`{k}`' for k in refs)} (the seeds not run here) are not run again: "
                  "they are the validation "
                  f"losses at step {step_of} of the longer runs of the same recipe and seeds in {', '.join(where)} "
                  "(the learning rate is constant after warm-up, so a run's first steps do not depend on its length: "
                  "checked bit for bit on one run, and by the base hash of every run)."]
    return lines


def length_lines(results: dict[str, list[dict]], parts: int = 4) -> list[str]:
    """Markdown table: how AC − topk and AC − cosine (paired by seed, 95% CI) move with the
    training length, from the validation curves of the same runs at 1/4, 2/4, ... of the steps."""
    def at(rows, step):
        out = []
        for r in rows:
            curve = dict(r.get("valid_curve") or [])
            if r.get("status") == "ok" and step in curve:
                out.append({"seed": r["seed"], "status": "ok", "loss": curve[step]})
        return out

    if not all(results.get(k) for k in ("ac", "topk")):
        return []
    steps = int(results["ac"][0]["train_iters"])
    marks = [steps * i // parts for i in range(1, parts + 1)]
    if not all(at(results["ac"], m) for m in marks):
        return []
    lines = ["", "## Training length (the same runs, validation loss at earlier steps; paired by seed)", "",
             "| step | topk | cosine | ac | AC − topk | AC − cosine |", "|---|---|---|---|---|---|"]
    for m in marks:
        rows = {k: at(results.get(k, []), m) for k in ("topk", "cosine", "ac")}
        mean = {k: (f"{statistics.fmean(r['loss'] for r in v):.4f}" if v else "–") for k, v in rows.items()}
        pair = {k: (fmt_paired(*paired_diff(rows[k], rows["ac"], "loss")) if rows[k] else "–")
                for k in ("topk", "cosine")}
        lines.append(f"| {m} | {mean['topk']} | {mean['cosine']} | {mean['ac']} | {pair['topk']} | {pair['cosine']} |")
    return lines


def ac_internal_lines(results: dict[str, list[dict]]) -> list[str]:
    """Markdown table of the AC layers' internals (``ac_internals``), seed means, early → late."""
    def cell(res, name, nd=3):
        vals = {w: [r["ac_internals"][name][w] for r in res if (r.get("ac_internals") or {}).get(name)
                    and r["ac_internals"][name][w] is not None] for w in ("early", "late")}
        if not vals["late"]:
            return "–"
        early = f"{statistics.fmean(vals['early']):.{nd}f} → " if vals["early"] else ""
        return early + f"{statistics.fmean(vals['late']):.{nd}f}"

    rows = [(name, [r for r in res if r.get("status") == "ok"]) for name, res in results.items()]
    rows = [(name, res) for name, res in rows if any(r.get("ac_internals") for r in res)]
    if not rows:
        return []
    lines = ["", f"## Inside the AC layers (seed means; first {STATS_WINDOW:.0%} of the steps → last {STATS_WINDOW:.0%})",
             "", "Separation = mean between-centroid L1 distance per feature / mean within-cluster MAD of the "
             "previous layer's top-1 clusters, in the raw and in the AC-transformed space (metrics.py): M "
             "tightens the clusters it is computed from when separation_ac > separation_raw.", "",
             "Weight mean = the per-token mean of the AC weights m (1 when M only reshapes; far below 1 the "
             "transformed token, and with it the router's logits, shrink: the softmax over the two selected "
             "scores then gives both experts about the same gate).", "",
             "| row | weight mean | weight max | clip rate | separation raw | separation AC |", "|---|---|---|---|---|---|"]
    for name, res in rows:
        lines.append(f"| `{name}` | {cell(res, 'weight_mean', 4)} | {cell(res, 'weight_max', 2)} | "
                     f"{cell(res, 'clip_rate', 4)} | {cell(res, 'separation_raw')} | {cell(res, 'separation_ac')} |")
    return lines


def _keep_notes(out: Path) -> str:
    if not out.is_file():
        return ""
    m = re.search(r"<!-- notes:begin[^>]*-->\n(.*?)\n<!-- notes:end -->", out.read_text(), re.S)
    text = m.group(1).strip() if m else ""
    return "" if text == "_(none yet)_" else text
