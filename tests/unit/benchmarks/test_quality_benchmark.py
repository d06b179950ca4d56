"""The router-quality benchmark (benchmarks/quality.py, implemented in benchmarks/quality_bench/): the
aggregation (mean/std, steps to a target loss, verdict), the row table, the paper-reproduction recipe
for enwik8, and one tiny end-to-end run of two rows (one trained and evaluated on corrupted text
through acmoe-pretrain, one from the result cache; about 40 s)."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import pytest

from acmoe_megatron.core import layers

ROOT = Path(__file__).resolve().parents[3]
if str(ROOT / "benchmarks") not in sys.path:  # benchmarks/ is not a package: quality_bench is top-level
    sys.path.insert(0, str(ROOT / "benchmarks"))

from quality_bench import report, rows, runner  # noqa: E402
from quality_bench import statistics as stats  # noqa: E402

# the command line (argument parsing and main) stays a script: load it as a module
_spec = importlib.util.spec_from_file_location("quality_benchmark", ROOT / "benchmarks" / "quality.py")
cli = importlib.util.module_from_spec(_spec)
sys.modules["quality_benchmark"] = cli
_spec.loader.exec_module(cli)


def _result(seed, final, curve=None, corrupt=None, status="ok", **extra):
    return {"seed": seed, "status": status, "final_valid_loss": final, "corrupt_valid_loss": corrupt,
            "valid_curve": curve or [[100, final]], "train_iters": 100, **extra}


# ------------------------------------------------------------------------------------ aggregation


def test_mean_std():
    assert stats.mean_std([]) == (None, None)
    assert stats.mean_std([2.0]) == (2.0, None)
    m, s = stats.mean_std([1.0, 2.0, 3.0])
    assert m == pytest.approx(2.0) and s == pytest.approx(1.0)  # sample std (ddof 1)
    assert stats.mean_std([1.0, None, float("nan"), 3.0]) == (2.0, pytest.approx(math.sqrt(2)))


def test_steps_to_target_interpolates_between_evaluations():
    curve = [(25, 3.0), (50, 2.0), (75, 1.5), (100, 1.2)]
    assert stats.steps_to_target(curve, 2.0) == 50.0  # exactly at an evaluation
    assert stats.steps_to_target(curve, 1.75) == pytest.approx(62.5)  # halfway between 50 and 75
    assert stats.steps_to_target(curve, 3.5) == 25.0  # the first evaluation already reaches it
    assert stats.steps_to_target(curve, 1.2) == 100.0
    assert stats.steps_to_target(curve, 1.0) is None  # not reached
    assert stats.steps_to_target([], 1.0) is None
    # a curve that goes up and down: the first crossing counts; unsorted input is sorted
    assert stats.steps_to_target([(30, 1.8), (10, 2.0), (20, 2.2)], 1.9) == pytest.approx(20 + 10 * 0.3 / 0.4)


def test_mean_curve_uses_common_steps():
    assert stats.mean_curve([[(10, 2.0), (20, 1.0)], [(10, 4.0), (20, 3.0), (30, 1.0)]]) == [(10, 3.0), (20, 2.0)]
    assert stats.mean_curve([]) == []


def test_aggregate_row_and_steps_to_topk():
    curve = lambda a, b, c: [[50, a], [100, b], [150, c]]  # noqa: E731
    topk = [_result(1, 2.0, curve(3.0, 2.4, 2.0), corrupt=2.2), _result(2, 2.2, curve(3.2, 2.6, 2.2), corrupt=2.5)]
    target = stats.aggregate_row(topk, None)["loss"][0]
    assert target == pytest.approx(2.1)
    agg_topk = stats.aggregate_row(topk, target)
    assert agg_topk["steps_to_target"] == pytest.approx(150.0)  # topk's mean curve ends on its own mean
    assert agg_topk["seeds_reaching"] == 1  # seed 2 ends above the mean
    assert agg_topk["gap"][0] == pytest.approx(0.25)
    assert agg_topk["bits"][0] == pytest.approx(2.1 / math.log(2))
    ac = [_result(1, 1.8, curve(2.6, 2.0, 1.8)), _result(2, 1.9, curve(2.8, 2.2, 1.9)),
          _result(3, None, status="nonfinite")]
    agg_ac = stats.aggregate_row(ac, target)
    assert agg_ac["n"] == 2 and agg_ac["failed"] == [3]
    # mean curve (2.7, 2.1, 1.85): reaches 2.1 exactly at step 100
    assert agg_ac["steps_to_target"] == pytest.approx(100.0)
    assert agg_ac["corrupt"] == (None, None)
    slow = stats.aggregate_row([_result(1, 2.5, curve(3.0, 2.8, 2.5))], target)
    assert slow["steps_to_target"] is None and slow["seeds_reaching"] == 0


def test_compare_and_paired_difference():
    ac = {"loss": (1.90, 0.01)}
    assert stats.compare(ac, {"loss": (2.00, 0.02)})["beyond_spread"] is True
    close = stats.compare(ac, {"loss": (1.915, 0.02)})
    assert close["lower"] and close["beyond_spread"] is False and close["spread"] == pytest.approx(0.02)
    assert stats.compare(ac, {"loss": (1.80, 0.01)})["lower"] is False
    assert stats.compare(ac, {"loss": (2.0, None)})["beyond_spread"] is None  # one seed: no spread
    assert stats.compare({"loss": (None, None)}, {"loss": (2.0, 0.1)}) == {"available": False}
    a = [_result(1, 2.0), _result(2, 2.1), _result(3, 2.2)]
    b = [_result(1, 1.9), _result(2, 2.05), _result(4, 1.0)]
    m, s, n = stats.paired_diff(a, b, "final_valid_loss")
    assert n == 2 and m == pytest.approx(-0.075) and s == pytest.approx(math.sqrt(2) * 0.025)


def _table(ac_finals, topk_finals, cos_finals, ac_curves=None, corrupt_shift=(0.1, 0.2, 0.2)):
    steps = [50, 100, 150, 200]

    def row(finals, shift, curves=None):
        return [_result(i + 1, f, curves[i] if curves else [[s, f + 0.5 * (200 - s) / 150] for s in steps],
                        corrupt=f + shift) for i, f in enumerate(finals)]

    results = {"ac": row(ac_finals, corrupt_shift[0], ac_curves), "topk": row(topk_finals, corrupt_shift[1]),
               "cosine": row(cos_finals, corrupt_shift[2])}
    target = stats.aggregate_row(results["topk"], None)["loss"][0]
    aggs = {k: stats.aggregate_row(v, target) for k, v in results.items()}
    return "\n".join(stats.verdict(aggs, results))


def test_verdict_when_ac_wins():
    fast = [[[50, 2.2], [100, 1.9], [150, 1.85], [200, 1.8]],
            [[50, 2.2], [100, 1.95], [150, 1.85], [200, 1.81]],
            [[50, 2.2], [100, 1.9], [150, 1.86], [200, 1.79]]]
    text = _table([1.80, 1.81, 1.79], [2.00, 2.01, 1.99], [1.95, 1.96, 1.94], ac_curves=fast)
    assert "AC vs topk, validation loss** (goal: AC lower by more than the seed spread): topk 2.0000 − AC 1.8000" in text
    assert text.count("**met**: AC is lower by more than the seed spread") == 2
    # the seed-mean AC curve (2.2 at 50, 1.9167 at 100) crosses topk's 2.0 at step 85.3 of topk's 200
    assert "AC 85 vs topk 200 steps, ratio 0.43 → **met** (3/3 AC seeds" in text
    assert text.count("(goal: AC loses less)") == 2 and "**not met**" not in text
    assert "lowest mean validation loss: `ac`" in text


def test_verdict_when_ac_does_not_win():
    text = _table([2.00, 2.05, 1.95], [2.00, 2.01, 1.99], [1.99, 2.00, 1.98], corrupt_shift=(0.3, 0.2, 0.2))
    assert "AC is lower, but by less than the seed spread" not in text
    assert "**not met**: AC is not lower" in text  # vs cosine
    assert "**not met**" in text.split("steps to topk")[1].split("\n")[0]
    assert "AC 0.3000 vs topk 0.2000 nats" in text and "→ **not met**" in text.split("corrupted text vs topk")[1]
    one_seed = _table([1.9], [2.0], [2.0])
    assert "undetermined (fewer than 2 seeds" in one_seed
    assert stats.verdict({}, {}) == ["- no finished `ac` runs: nothing to judge."]


def test_verdict_lists_every_other_row_paired_by_seed():
    results = {name: [_result(i + 1, f) for i, f in enumerate(finals)]
               for name, finals in (("topk", [2.0, 2.1]), ("ac", [1.9, 2.0]), ("ac-clean", [1.85, 1.9]),
                                    ("stablemoe-lite", [1.8, 1.95]))}
    aggs = {k: stats.aggregate_row(v, 2.05) for k, v in results.items()}
    text = "\n".join(stats.verdict(aggs, results))
    assert "investigation row `ac-clean`: validation loss 1.8750; paired ac-clean − ac = -0.0750" in text
    assert "ac-clean − topk = -0.1750 ± 0.0354 (2 seeds; 95% CI [-0.4927, +0.1427])" in text
    # baselines get the same paired comparison (against ac and topk), labelled as baselines
    assert ("baseline row `stablemoe-lite`: validation loss 1.8750; paired stablemoe-lite − ac = "
            "-0.0750 ± 0.0354 (2 seeds; 95% CI [-0.39") in text
    assert "stablemoe-lite − topk = -0.1750 ± 0.0354 (2 seeds; 95% CI [-0.49" in text
    assert "row `ac`:" not in text and "row `topk`:" not in text


def test_extract_run_windows_the_routing_statistics():
    scalars = {
        "lm loss validation": [(25, 3.0), (50, 2.5)],
        "lm loss": [(10, 4.0), (50, 2.4)],
        "moe/layer02/instability": [(10, 0.9), (40, 0.3), (50, 0.1)],
        "moe/layer03/instability": [(10, 0.9), (40, 0.5), (50, 0.5)],
        "moe/layer01/load_max_over_mean": [(50, 1.5)],
        "moe/layer02/load_max_over_mean": [(50, 2.5)],
        "moe/layer01/load_cv": [(10, 9.0)],  # outside the window: no value for the layer
    }
    out = runner.extract_run(scalars, train_iters=50)  # window: steps >= 40
    assert out["valid_curve"] == [[25, 3.0], [50, 2.5]]
    assert out["instability"] == pytest.approx((0.2 + 0.5) / 2)
    assert out["load_max_over_mean"] == pytest.approx(2.0)
    assert out["load_cv"] is None
    assert out["per_layer"]["instability"] == {"2": 0.2, "3": 0.5}


def test_extract_run_ac_internals_early_and_late():
    scalars = {
        "ac/layer03/separation_raw": [(10, 1.0), (20, 3.0), (90, 2.0), (100, 4.0)],
        "ac/layer04/separation_raw": [(10, 2.0), (100, 2.0)],
        "ac/layer03/separation_ac": [(10, 5.0), (100, 7.0)],
        "ac/layer03/clip_rate": [(50, 0.5)],  # neither window: no value
    }
    out = runner.extract_run(scalars, train_iters=100)["ac_internals"]  # early: <= 20, late: >= 80
    assert out["separation_raw"] == {"early": pytest.approx((2.0 + 2.0) / 2), "late": pytest.approx((3.0 + 2.0) / 2)}
    assert out["separation_ac"] == {"early": 5.0, "late": 7.0}
    assert out["clip_rate"] == {"early": None, "late": None}
    assert runner.extract_run({}, train_iters=100)["ac_internals"] is None


def test_paired_95_ci_uses_student_t():
    assert stats.ci95(0.0, 1.0, 1) is None and stats.ci95(0.1, None, 3) is None
    lo, hi = stats.ci95(-0.01, 0.005, 5)  # t(4) = 2.776
    assert (lo, hi) == (pytest.approx(-0.01 - 2.776 * 0.005 / math.sqrt(5)), pytest.approx(-0.01 + 2.776 * 0.005 / math.sqrt(5)))
    assert hi < 0
    assert stats.fmt_paired(-0.01, 0.005, 5) == "-0.0100 ± 0.0050 (5 seeds; 95% CI [-0.0162, -0.0038])"
    assert "95% CI excludes 0" in stats._ci_verdict(-0.01, 0.005, 5)
    assert "includes 0" in stats._ci_verdict(-0.01, 0.02, 5)


def test_ablation_table_pairs_each_change_with_its_references():
    results = {name: [_result(i + 1, f) for i, f in enumerate(finals)] for name, finals in (
        ("topk", [2.0, 2.1]), ("cosine", [1.95, 2.0]), ("ac", [1.9, 2.0]),
        ("ac-balance", [2.0, 2.05]), ("topk-balance", [2.1, 2.1]), ("ac-freenorm", [1.95, 2.05]))}
    lines = report.ablation_lines(results)
    table = "\n".join(lines)
    assert "| none (the base recipe) | `ac` | -0.1000 ± 0.0000 (2 seeds" in table
    assert "| aux balance loss 0.01 on every MoE layer | `ac-balance` | -0.0750 ± 0.0354 (2 seeds" in table
    assert "| – | +0.0750" in table  # no cosine-balance runs; ac-balance − ac
    balance = next(ln for ln in lines if "aux balance" in ln).split("|")
    assert balance[6].strip().startswith("+0.0500 ± 0.0707 (2 seeds") and balance[7].strip() == "–"  # topk's own
    freenorm = next(ln for ln in lines if "free expert norm" in ln)
    assert "-0.0500" in freenorm.split("|")[3]  # against the base topk: the norm does not touch it
    assert report.ablation_lines({"ac": results["ac"]}) == []


def test_training_length_table_pairs_the_curves_at_each_quarter():
    curve = lambda *v: [[100 * (i + 1), x] for i, x in enumerate(v)]  # noqa: E731
    results = {"topk": [_result(1, 2.0, curve(4, 3, 2.5, 2.0)), _result(2, 2.2, curve(4, 3, 2.5, 2.2))],
               "ac": [_result(1, 1.9, curve(4.2, 3.1, 2.5, 1.9)), _result(2, 2.0, curve(4.2, 3.3, 2.5, 2.0))]}
    for r in results["topk"] + results["ac"]:
        r["train_iters"] = 400
    lines = report.length_lines(results)
    table = {ln.split("|")[1].strip(): ln.split("|") for ln in lines if ln.startswith("| ") and "step" not in ln}
    assert list(table) == ["100", "200", "300", "400"]
    assert table["100"][5].strip().startswith("+0.2000 ± 0.0000 (2 seeds")  # AC − topk at step 100
    assert table["200"][5].strip().startswith("+0.2000 ± 0.1414 (2 seeds")
    assert table["400"][5].strip().startswith("-0.1500 ± 0.0707 (2 seeds") and table["400"][2].strip() == "2.1000"
    assert table["400"][6].strip() == "–"  # no cosine runs
    assert report.length_lines({"ac": results["ac"]}) == []


def test_references_are_the_longer_runs_of_the_same_recipe_at_this_length(tmp_path):
    base = ["--config", str(ROOT / "configs" / "tiny_cpu.yaml"), "--out", str(tmp_path / "short.md"),
            "--set", "megatron.lr_decay_style=constant", "--set", "megatron.lr_warmup_iters=1"]
    short = rows.build_plan(cli.parse_args([*base, "--steps", "4"]))
    longer = rows.build_plan(cli.parse_args([*base, "--steps", "8", "--out", str(tmp_path / "long.md")]))
    other = rows.build_plan(cli.parse_args([*base, "--steps", "8", "--set", "megatron.lr=1e-3"]))
    for seed, plan in ((1, longer), (2, longer), (3, other)):
        runner._write_json(runner.result_path(tmp_path / "long", "topk", seed), {
            "row": "topk", "seed": seed, "status": "ok", "train_iters": 8, "base_hash": rows.base_hash(plan),
            "valid_curve": [[4, 3.0 + seed], [8, 2.0]], "final_valid_loss": 2.0})
    refs = runner.load_references(short, tmp_path / "long.md", [1, 2, 3], 4)
    assert [(r["seed"], r["final_valid_loss"]) for r in refs["topk"]] == [(1, 4.0), (2, 5.0)]  # not seed 3: lr
    assert "at step 4 of 8" in refs["topk"][0]["reference"]
    decaying = rows.build_plan(cli.parse_args([*base[:4], "--steps", "4"]))  # tiny_cpu's cosine decay
    with pytest.raises(SystemExit, match="constant learning rate after warm-up"):
        runner.load_references(decaying, tmp_path / "long.md", [1], 4)


# ------------------------------------------------------------------------------------ rows, CLI


def test_row_table():
    names = [r.name for r in rows.ROWS]
    assert len(names) == len(set(names))
    assert list(rows.DEFAULT_ROWS) == ["topk", "cosine", "ac", "xmoe", "stablemoe", "stablemoe-lite", "usmoe",
                                          "etr", "elliptical", "ac+elliptical"]
    assert rows.ROW_BY_NAME["etr"].overrides == ("acmoe.router=etr", "megatron.moe_expert_capacity_factor=1.25")
    assert rows.ROW_BY_NAME["elliptical"].overrides == ("acmoe.router=topk", "elliptical.enabled=true")
    for name in ("ac-clean", "ac-first2", "ac-ema", "ac-local"):
        assert not rows.ROW_BY_NAME[name].default
    assert [r.name for r in rows.select_rows("ac, topk,ac")] == ["ac", "topk"]
    assert len(rows.select_rows("all")) == len(rows.ROWS)
    with pytest.raises(SystemExit, match="unknown row"):
        rows.select_rows("nope")
    assert rows.parse_seeds("3") == [1, 2, 3] and rows.parse_seeds("1,2,5") == [1, 2, 5]
    assert rows.merge_overrides(["a.b=1", "c.d=2", "a.b=3"]) == ["a.b=3", "c.d=2"]


def test_ac_rows_of_the_default_model_use_two_ac_layers():
    from acmoe_megatron.runtime.recipe import load_recipe

    plan = rows.build_plan(cli.parse_args([]))
    recipe = load_recipe(plan.config, plan.base + ["acmoe.router=ac"])
    mg = recipe.megatron
    assert mg["num_experts"] and mg.get("moe_layer_freq", 1) == 1
    assert layers.moe_layers(mg["num_layers"], 1) == [1, 2, 3, 4]
    assert layers.ac_layers(mg["num_layers"], 1, recipe.acmoe.first_ac_layer) == [3, 4]
    assert mg["train_iters"] == rows.CPU_DEFAULT_STEPS and mg["expert_model_parallel_size"] == 1
    assert plan.nproc == 1 and plan.threads >= 1


# ------------------------------------------------------------------------------------ enwik8 recipe


def test_switch_m_enwik8_recipe():
    from acmoe_megatron.runtime.recipe import load_recipe, megatron_argv
    from acmoe_megatron.runtime.run_plan import parallel_layout

    recipe = load_recipe(ROOT / "configs" / "switch_m_enwik8.yaml")
    mg = recipe.megatron
    assert (mg["num_layers"], mg["hidden_size"], mg["num_attention_heads"]) == (8, 352, 8)
    assert (mg["num_experts"], mg["moe_router_topk"], mg["moe_ffn_hidden_size"]) == (16, 2, 352)
    assert mg["seq_length"] == 512 and mg["global_batch_size"] == 48 and mg["train_iters"] == 80000
    assert mg["lr"] == pytest.approx(7e-4) and mg["lr_warmup_iters"] == 4000 and mg["lr_decay_style"] == "constant"
    assert mg["optimizer"] == "adam" and mg["hidden_dropout"] == 0.1
    freq = mg.get("moe_layer_freq", 1)
    assert layers.moe_layers(8, freq) == list(range(1, 9))
    assert layers.ac_layers(8, freq, recipe.acmoe.first_ac_layer) == [3, 4, 5, 6, 7, 8]
    assert recipe.data.path == "data/enwik8" and not recipe.data.prepare_stdlib
    assert parallel_layout(mg, 4)["grad_accum"] == 2  # the paper: 4 GPUs, batch split 2
    megatron_argv(mg)  # every key is a megatron flag


def test_switch_m_enwik8_renders_for_slurm(capsys):
    from acmoe_megatron.cli import launch as slurm_launch
    rc = slurm_launch.main(["slurm", "--config", "configs/switch_m_enwik8.yaml", "--nodes", "1",
                            "--gpus-per-node", "4", "--time", "04:00:00", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0 and "--nodes=1" in out and "switch_m_enwik8" in out


def test_slurm_dry_run_lists_the_jobs_and_their_cost_and_a_bad_row_refuses_the_sweep(tmp_path, capsys, monkeypatch):
    """--slurm --dry-run: every (row, seed) planned by acmoe-launch slurm, with its overrides, tokens,
    GPU-hours (assumed MFU, or the tokens/s of a previous run's summary.json) and the tokens of one AC
    statistic; a row acmoe-launch refuses refuses the whole sweep (exit 2) before any sbatch."""
    import shutil

    which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: pytest.fail("sbatch looked up in a dry run")
                        if name == "sbatch" else which(name, *a, **k))
    argv = ["--config", "configs/release_switch_m_wt103.yaml", "--rows", "topk,ac", "--seeds", "2", "--skip-corrupt",
            "--out", str(tmp_path / "q.md"), "--runs-dir", str(tmp_path / "runs"), "--slurm", "--launch",
            "--nodes 1 --gpus-per-node 4", "--dry-run", "--vocab-size", "267735"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("# job quality-") == 4 and "# job quality-ac-s2: 1 node(s) x 4 process(es) = world size 4" in out
    assert "acmoe.router=ac megatron.seed=2 data.seed=2" in out
    tokens = 80000 * 96 * 512  # the release recipe: 80k steps of 96 x 512 tokens
    assert out.count(f"{tokens:,} tokens (80000 steps x 96 x 512)") == 4
    per_run = float(re.search(r"\); ([0-9.,]+) GPU-hours \(", out).group(1).replace(",", ""))
    total = float(re.search(r"# total: 4 jobs, [0-9,]+ tokens, ([0-9.,]+) GPU-hours", out).group(1).replace(",", ""))
    assert total == pytest.approx(4 * per_run, rel=0.01) and per_run > 0
    assert "10% MFU of H100" in out and "AC statistic over 6,144 tokens (local scope, each micro-batch)" in out
    assert "AC statistic over — (topk routes without AC statistics)" in out
    # measured throughput: 50,000 tokens/s on 4 processes -> 12,500 per process
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"tokens_per_s": 50000.0, "world_size": 4}))
    assert cli.main([*argv, "--throughput-from", str(summary)]) == 0
    out = capsys.readouterr().out
    assert f"{tokens / 12500 / 3600:,.1f} GPU-hours" in out and "measured 12,500 tokens/s per process" in out
    # a row acmoe-launch refuses (here every row: 4 processes cannot hold expert parallel 8)
    assert cli.main([*argv, "--set", "megatron.expert_model_parallel_size=8"]) == 2
    err = capsys.readouterr().err
    assert "the sweep is refused, nothing was submitted" in err and "row topk (seed 1)" in err


# ------------------------------------------------------------------------------------ end to end


@pytest.mark.slow  # trains two tiny runs through acmoe-pretrain
def test_end_to_end_two_rows(tmp_path, capsys):
    """Rows topk and ac, 1 seed, 6 steps of a tiny model on a small corpus. ``ac`` really runs (an
    ``acmoe-pretrain`` training launch, then the corrupted-text evaluation launch); ``topk`` comes from
    a stored result JSON with the matching config hash (the cache: it must not be trained). Checks the
    run JSON, the table with both rows, the verdict, the figures, and that hand-written investigation
    notes survive the regeneration. About 40 s (two launches, one after the other)."""
    from acmoe_megatron.data import prepare
    from acmoe_megatron.runtime.recipe import load_recipe

    data = tmp_path / "data"
    prepare(source="stdlib", out_dir=data, seq_length=32, max_bytes=100_000)
    out = tmp_path / "results" / "quality.md"
    tiny = ["data.path=" + str(data), "megatron.seq_length=32", "megatron.max_position_embeddings=32",
            "megatron.hidden_size=32", "megatron.num_attention_heads=2", "megatron.ffn_hidden_size=32",
            "megatron.moe_ffn_hidden_size=32", "megatron.num_layers=3", "megatron.expert_model_parallel_size=1",
            "megatron.micro_batch_size=4", "megatron.global_batch_size=4", "megatron.lr_warmup_iters=1",
            "megatron.eval_interval=3", "megatron.eval_iters=2", "megatron.log_interval=3",
            "megatron.save_interval=6", "acmoe.first_ac_layer=2"]
    argv = ["--config", str(ROOT / "configs" / "tiny_cpu.yaml"), "--rows", "topk,ac", "--seeds", "1", "--steps", "6",
            "--jobs", "2", "--out", str(out), "--runs-dir", str(tmp_path / "runs")] + [f"--set={o}" for o in tiny]
    plan = rows.build_plan(cli.parse_args(argv))
    topk_row = rows.ROW_BY_NAME["topk"]
    stored = {"row": "topk", "seed": 1, "status": "ok", "base_hash": rows.base_hash(plan),
              "config_hash": load_recipe(plan.config, rows.run_overrides(plan, topk_row, 1)).hash(),
              "train_iters": 6, "valid_curve": [[3, 5.6], [6, 5.5]], "final_valid_loss": 5.5,
              "corrupt_valid_loss": 5.52, "instability": 0.2, "load_max_over_mean": 1.3, "load_cv": 0.2,
              "wall_total_s": 1.0}
    runner._write_json(runner.result_path(plan.results_dir, "topk", 1), stored)
    out.write_text("old\n<!-- notes:begin -->\nAC layer 2 was checked.\n<!-- notes:end -->\n")

    rc = cli.main(argv)
    captured = capsys.readouterr()
    assert rc == 0, captured.out[-3000:] + captured.err[-3000:]
    assert "ac seed 1: training in" in captured.out and "topk seed 1: training" not in captured.out
    assert not (tmp_path / "runs" / "topk").exists()
    assert (tmp_path / "data_wordswap0.025" / "manifest.json").is_file()
    r = json.loads(runner.result_path(plan.results_dir, "ac", 1).read_text())
    assert r["status"] == "ok" and r["train_iters"] == 6 and r["base_hash"] == stored["base_hash"]
    assert [s for s, _ in r["valid_curve"]] == [3, 6]
    assert r["final_valid_loss"] == pytest.approx(r["valid_curve"][-1][1])
    assert r["corrupt_valid_loss"] is not None and math.isfinite(r["corrupt_valid_loss"])
    corrupt = json.loads((tmp_path / "runs" / "ac" / "seed1" / "eval_corrupt.json").read_text())
    assert corrupt["results"]["valid"]["samples"] == 2 * 4  # eval_iters x global batch, as the clean loss
    assert corrupt["results"]["valid"]["data"] == str(tmp_path / "data_wordswap0.025")
    assert r["config_hash"] == r["summary_config_hash"] and r["instability"] is not None
    text = out.read_text()
    assert "| `topk` | 1 | 5.5000 |" in text and "| `ac` | 1 |" in text and "## Verdict" in text
    assert "AC vs topk, validation loss" in text and "AC layer 2 was checked." in text
    assert "AC rows route with AC on MoE layers [2, 3]" in text
    assert (out.with_suffix("") / "valid_loss.png").is_file() and (out.with_suffix("") / "seed1" / "loss.png").is_file()


def test_recorded_runs_keep_their_config_hash():
    """Every committed per-run result is found again by the cache: a settings key added without
    ``config.HASH_OMITS_AT_DEFAULT``, or a changed recipe default, would make the benchmark re-run
    (and the reports drop) every recorded run."""
    from acmoe_megatron.runtime.recipe import load_recipe

    stale, paths = [], sorted((ROOT / "benchmarks" / "results").glob("*/runs/*/seed*.json"))
    assert paths, "no recorded runs found"
    for path in paths:
        result = json.loads(path.read_text())
        if load_recipe(ROOT / result["config"], result["overrides"]).hash() != result["config_hash"]:
            stale.append(str(path.relative_to(ROOT)))
    assert not stale, (f"{len(stale)} recorded runs no longer match their recipe's hash, e.g. {stale[:3]}: "
                       "list a new settings key in config.HASH_OMITS_AT_DEFAULT, or re-run those tables")
