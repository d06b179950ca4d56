"""End to end through ``acmoe-pretrain``: torchrun, 2 gloo ranks (EP=2), megatron's own trainer.

One short training run (12 iterations) is shared by the assertions on its outputs (summary,
TensorBoard, torch_dist checkpoint, resolved recipe); a copy of its run directory is then resumed
to 16 iterations. Two more launches check that bad recipes fail before any training. About a
minute and a half on 2 CPU cores.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from acmoe_megatron.data import prepare, read_manifest
from acmoe_megatron.observability.summary import read_scalars
from acmoe_megatron.runtime.checkpoint_check import INFERENCE_STATS_FILE
from acmoe_megatron.runtime.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]
_TINY = load_recipe(ROOT / "configs" / "tiny_cpu.yaml").megatron
LR, MIN_LR = float(_TINY["lr"]), float(_TINY["min_lr"])  # cosine decay (lr_decay_style in the recipe)
WARMUP, DECAY = 2, 16  # the overrides below


def common_overrides(tmp: Path, run: str) -> list[str]:
    return [
        "megatron.lr_warmup_iters=2", f"megatron.lr_decay_iters={DECAY}",
        "megatron.eval_interval=6", "megatron.eval_iters=2", "megatron.log_interval=2",
        f"run.dir={tmp / run}", f"data.path={tmp / 'data'}",
        "megatron.seq_length=64", "megatron.max_position_embeddings=64",
        "megatron.micro_batch_size=4", "megatron.global_batch_size=8",
        "acmoe.expert_norm=1.5",  # the release's fixed-norm expert embeddings (AC layers 3-4)
    ]


def wandb_overrides(tmp: Path) -> list[str]:
    return ["megatron.wandb_project=acmoe-tests", "megatron.wandb_exp_name=first",
            f"megatron.wandb_save_dir={tmp / 'wandb'}"]


def launch(*overrides: str, nproc: int = 2, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "acmoe_megatron.cli.pretrain", "--config", "configs/tiny_cpu.yaml",
           "--nproc", str(nproc), *overrides]
    return subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def _tail(out: subprocess.CompletedProcess, n: int = 6000) -> str:
    return f"exit {out.returncode}; output tail:\n{out.stdout[-n:]}"


def _cosine_lr(step: int) -> float:
    """megatron's linear warm-up + cosine decay, as configured above, at iteration ``step``."""
    if step <= WARMUP:
        return LR * step / WARMUP
    ratio = (step - WARMUP) / (DECAY - WARMUP)
    return MIN_LR + (LR - MIN_LR) * 0.5 * (math.cos(math.pi * ratio) + 1.0)


def _snapshot(run_dir: Path) -> dict:
    """Everything the tests read from a finished run, taken before anything else touches it."""
    ckpt = run_dir / "checkpoints"
    return {
        "summary": json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else None,
        "scalars": read_scalars(run_dir / "tensorboard") if (run_dir / "tensorboard").is_dir() else {},
        "event_files": sorted(p.name for p in (run_dir / "tensorboard").glob("events.out.tfevents*")),
        "iter_dirs": sorted(p.name for p in ckpt.glob("iter_*")) if ckpt.is_dir() else [],
        "latest": (ckpt / "latest_checkpointed_iteration.txt").read_text().strip()
        if (ckpt / "latest_checkpointed_iteration.txt").is_file() else None,
    }


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("train_integration")
    # a small stdlib shard set (the launcher would otherwise build the whole stdlib, ~10 s)
    prepare(source="stdlib", out_dir=tmp / "data", seq_length=64, max_bytes=200_000)
    return tmp


@pytest.fixture(scope="module")
def first_run(workdir):
    # with Weights & Biases in offline mode: megatron's W&B writer gets our scalars too
    out = launch("megatron.train_iters=12", "megatron.save_interval=12", *common_overrides(workdir, "run"),
                 *wandb_overrides(workdir), env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert out.returncode == 0, _tail(out)
    return out, workdir / "run", _snapshot(workdir / "run")


@pytest.fixture(scope="module")
def resumed_run(first_run, workdir):
    _, run_dir, _ = first_run
    resume_dir = workdir / "resume"
    shutil.copytree(run_dir, resume_dir)  # keep the first run's directory as it was
    out = launch("megatron.train_iters=16", "megatron.save_interval=4",
                 "megatron.override_opt_param_scheduler=true", *common_overrides(workdir, "resume"))
    assert out.returncode == 0, _tail(out)
    return out, resume_dir, _snapshot(resume_dir)


# ---------------------------------------------------------------------------------------------


def test_run_writes_summary_with_learned_losses(first_run, workdir):
    out, run_dir, snap = first_run
    summary = snap["summary"]
    assert summary is not None, _tail(out)
    valid, train = summary["final_valid_loss"], summary["final_train_loss"]
    assert valid is not None and math.isfinite(valid) and 0 < valid < math.log(256), summary
    assert train is not None and math.isfinite(train) and 0 < train < math.log(256), summary
    assert summary["iterations"] == 12 and summary["train_iters"] == 12
    assert summary["train_tokens"] == 12 * 8 * 64
    assert summary["world_size"] == 2
    assert summary["parallel"] == {"tp": 1, "pp": 1, "ep": 2, "dp": 2}
    assert summary["router"] == "ac"
    assert summary["final_valid_ppl"] == pytest.approx(math.exp(valid))
    assert summary["uniform_baseline_loss"] == pytest.approx(math.log(256))
    assert summary["checkpoint_dir"] == str(run_dir / "checkpoints")
    assert summary["tensorboard_dir"] == str(run_dir / "tensorboard")
    # the summary reports what TensorBoard holds
    assert valid == pytest.approx(snap["scalars"]["lm loss validation"][-1][1])
    assert train == pytest.approx(snap["scalars"]["lm loss"][-1][1])
    # the hash is the one of the resolved recipe the workers ran
    assert summary["config_hash"] == load_recipe(run_dir / "config.yaml").hash()
    assert {"streams", "cudamode", "T1_T2_initialize_without_cuda"} <= set(summary["runtime_shims"])
    # the launcher's closing report
    assert "[acmoe] run finished" in out.stdout
    assert f"run summary      : {run_dir / 'summary.json'}" in out.stdout
    assert "building the embedded stdlib corpus" not in out.stdout  # data dir was already there


def test_tensorboard_has_loss_lr_and_moe_scalars(first_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir, snap = first_run
    assert len(snap["event_files"]) == 1, snap["event_files"]
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("lm loss", "lm loss validation", "learning-rate", "grad-norm", "load_balancing_loss", "z_loss"):
        assert tag in tags, f"{tag!r} missing from {sorted(tags)}"
    steps = {tag: [e.step for e in acc.Scalars(tag)] for tag in tags}
    assert steps["lm loss"] == list(range(1, 13))
    # eval_interval=6, plus megatron's final evaluation after training (again at step 12)
    assert sorted(set(steps["lm loss validation"])) == [6, 12]
    assert steps["load_balancing_loss"] == list(range(1, 13))
    values = {tag: [e.value for e in acc.Scalars(tag)] for tag in tags}
    assert all(math.isfinite(v) for tag in values for v in values[tag])
    # the model learns: 12 steps at the recipe's lr take the byte-level loss well below its start
    assert values["lm loss"][-1] < values["lm loss"][0] - 0.5, values["lm loss"]
    assert values["lm loss validation"][-1] < values["lm loss validation"][0], values["lm loss validation"]
    # the aux loss is near its balanced value of 1 (top-2 of 8 experts), the z-loss positive
    assert all(0.5 < v < 3.0 for v in values["load_balancing_loss"]), values["load_balancing_loss"]
    assert all(v > 0 for v in values["z_loss"])
    # the schedule flags reached megatron: warm-up to lr over 2 steps, cosine to min_lr at 16
    for step, lr in zip(steps["learning-rate"], values["learning-rate"]):
        assert lr == pytest.approx(_cosine_lr(step), rel=1e-4), (step, lr)


def _wandb_history_keys(path):
    """Keys and steps of the history records of a .wandb file (W&B's LevelDB-log format: a 7-byte
    ':W&B' header, 32 KiB blocks of records with a 7-byte header each; records are protobufs).
    wandb 0.31 writes no summary file for offline runs and no longer ships a Python reader."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, block, pending, keys, steps = 7, 32768, b"", set(), set()
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL/FIRST start a record
        if kind in (1, 4):  # FULL/LAST end it
            rec = pb.Record()
            rec.ParseFromString(pending)
            if rec.WhichOneof("record_type") == "history":
                keys.update(item.key or "/".join(item.nested_key) for item in rec.history.item)
                steps.add(rec.history.step.num)
    return keys, steps


def test_wandb_gets_our_scalars(first_run, workdir):
    """megatron.wandb_project set (offline mode): the run's W&B history holds megatron's scalars and
    ours (routing, AC, throughput, memory, bits per token) through the same writer as TensorBoard."""
    _, run_dir, _ = first_run
    (run_file,) = (workdir / "wandb").glob("wandb/offline-run-*/run-*.wandb")
    keys, steps = _wandb_history_keys(run_file)
    for key in ("lm loss", "lm loss validation", "moe/layer01/load_max_over_mean", "moe/layer02/instability",
                "ac/layer03/weight_mean", "throughput/tokens_per_s", "throughput/eval_s", "memory/max_gib",
                "lm loss bits-per-token", "lm loss validation bits-per-token"):
        assert key in keys, f"{key!r} not in the W&B history: {sorted(keys)}"
    assert steps >= {2, 4, 6, 8, 10, 12}
    from acmoe_megatron.observability.summary import read_scalars

    ours = {t for t in read_scalars(run_dir / "tensorboard") if t.startswith(("moe/", "ac/", "throughput/"))}
    assert ours <= keys, sorted(ours - keys)  # every scalar of ours in TensorBoard is in W&B too


def test_torch_dist_checkpoint_is_saved(first_run):
    _, run_dir, snap = first_run
    assert snap["iter_dirs"] == ["iter_0000012"]  # save_interval=12: only the final iteration
    assert snap["latest"] == "12"
    ckpt = run_dir / "checkpoints" / "iter_0000012"
    assert (ckpt / "metadata.json").is_file()
    assert json.loads((ckpt / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    assert len(list(ckpt.glob("*.distcp"))) == 2  # one file per rank


def test_resolved_recipe_is_written(first_run, workdir):
    _, run_dir, _ = first_run
    resolved = run_dir / "config.yaml"
    assert resolved.is_file()
    recipe = load_recipe(resolved)
    assert recipe.megatron["train_iters"] == 12 and recipe.megatron["seq_length"] == 64
    assert recipe.megatron["num_experts"] == 8 and recipe.acmoe.first_ac_layer == 3
    assert recipe.run.dir == str(run_dir) and recipe.data.path == str(workdir / "data")
    # it is the tiny recipe plus the command-line overrides, nothing else
    expected = load_recipe(ROOT / "configs" / "tiny_cpu.yaml",
                           ["megatron.train_iters=12", "megatron.save_interval=12",
                            *common_overrides(workdir, "run"), *wandb_overrides(workdir)])
    assert recipe.to_dict() == expected.to_dict()
    assert yaml.safe_load(resolved.read_text()) == expected.to_dict()
    assert read_manifest(workdir / "data").seq_length == recipe.megatron["seq_length"]


def test_resume_continues_from_iteration_12_to_16(resumed_run):
    out, resume_dir, snap = resumed_run
    log = out.stdout
    assert re.search(r"loading distributed checkpoint from \S*resume/checkpoints at iteration 12", log), _tail(out)
    assert re.search(r"successfully loaded checkpoint from \S*resume/checkpoints .* at iteration 12", log), _tail(out)
    assert re.search(r"saving checkpoint at iteration\s+16 ", log), _tail(out)
    logged = [int(m) for m in re.findall(r"\] iteration\s+(\d+)/\s*16 \|", log)]
    assert logged and min(logged) > 12 and max(logged) == 16, logged  # no restart from iteration 1
    assert snap["iter_dirs"] == ["iter_0000012", "iter_0000016"]
    assert snap["latest"] == "16"
    assert len(list((resume_dir / "checkpoints" / "iter_0000016").glob("*.distcp"))) == 2
    summary = snap["summary"]
    assert summary["iterations"] == 16 and summary["train_tokens"] == 16 * 8 * 64
    assert math.isfinite(summary["final_valid_loss"])
    # TensorBoard: the new event file continues the old series at 13..16
    assert len(snap["event_files"]) == 2
    scalars = snap["scalars"]
    assert [s for s, _ in scalars["lm loss"]] == list(range(1, 17))
    assert [s for s, _ in scalars["lm loss validation"]][-1] == 16
    for step, lr in scalars["learning-rate"]:
        assert lr == pytest.approx(_cosine_lr(step), rel=1e-4), (step, lr)
    assert scalars["learning-rate"][-1][1] == pytest.approx(MIN_LR, rel=1e-4)


def _router_weights(iter_dir: Path):
    """megatron's stacked router weights [MoE layers, experts, hidden] from a torch_dist checkpoint."""
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(str(iter_dir))
    meta = reader.read_metadata().state_dict_metadata["decoder.layers.mlp.router.weight"]
    weights = torch.empty(meta.size, dtype=meta.properties.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... load in a single process"
        dcp.load({"decoder.layers.mlp.router.weight": weights}, storage_reader=reader, no_dist=True)
    return weights


def test_expert_norm_holds_through_ep2_training_and_resume(first_run, resumed_run):
    """acmoe.expert_norm=1.5 on the EP=2 run (2 ranks, dense part data parallel) and its resume:
    the AC layers' expert embeddings (3-4) are at row norm 1.5 in both checkpoints, and moved
    between them; the linear top-k routers of layers 1-2 keep a free norm."""
    import torch

    out, run_dir, _ = first_run
    assert "expert embeddings of 2 router(s) held" in out.stdout, _tail(out)
    at12 = _router_weights(run_dir / "checkpoints" / "iter_0000012")
    at16 = _router_weights(resumed_run[1] / "checkpoints" / "iter_0000016")
    for w in (at12, at16):
        norms = w.double().norm(dim=-1)
        assert torch.allclose(norms[2:], torch.full_like(norms[2:], 1.5), atol=1e-5), norms
        assert (norms[:2] - 1.5).abs().min() > 0.1, norms
    assert (at16[2:] - at12[2:]).abs().max() > 1e-4  # the resumed run trained them, on the sphere


def test_bad_key_fails_fast_with_exit_2(workdir):
    run_dir = workdir / "bad_key"
    out = launch("acmoe.first_ac_lyer=2", f"run.dir={run_dir}", f"data.path={workdir / 'data'}", timeout=300)
    assert out.returncode == 2, _tail(out)
    assert "config error" in out.stdout
    assert "acmoe.first_ac_lyer" in out.stdout and "did you mean 'first_ac_layer'" in out.stdout
    assert "torch.distributed.run" not in out.stdout  # torchrun never started
    assert not run_dir.exists()


def test_first_ac_layer_beyond_the_moe_layers_fails_before_training(workdir):
    """Refused by the run plan in the launching process: exit 2, no worker started."""
    run_dir = workdir / "too_deep"
    out = launch("acmoe.first_ac_layer=5", "megatron.train_iters=4", *common_overrides(workdir, "too_deep"),
                 timeout=300)
    assert out.returncode == 2, _tail(out)
    assert "acmoe.first_ac_layer=5 but the model has only 4 MoE layers" in out.stdout, _tail(out)
    assert "torch.distributed.run" not in out.stdout  # torchrun never started
    assert not re.search(r"\] iteration\s+1/", out.stdout), "training started"
    assert not run_dir.exists()


def test_acmoe_eval_reproduces_the_runs_validation_and_scores_a_corrupted_copy(first_run, workdir):
    """acmoe-eval on a copy of the EP=2 run: its first 16 validation samples (the training run's
    eval_iters x global batch) score the run's final validation loss; a corrupted copy made with only
    a valid split (no train split) is scored in the same start-up; TensorBoard gets the scalars."""
    _, run_dir, snap = first_run
    eval_dir = workdir / "eval"
    shutil.copytree(run_dir, eval_dir)
    corrupt = workdir / "data_corrupt"
    prepare(source="stdlib", out_dir=corrupt, seq_length=64, max_bytes=200_000, splits=["valid"],
            corrupt="word-swap:0.2")
    cmd = [sys.executable, "-m", "acmoe_megatron.cli.eval", str(eval_dir), "--max-samples", "16",
           "--data", str(workdir / "data"), "--corrupt", str(corrupt)]
    out = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert out.returncode == 0, _tail(out)
    result = json.loads((eval_dir / "eval.json").read_text())
    assert result["iteration"] == 12 and result["world_size"] == 2
    assert result["layout"] == {"tp": 1, "pp": 1, "ep": 2, "dp": 2}
    assert result["statistics_source"].startswith("batch (each micro-batch of 4 samples")
    valid, corrupted = result["results"]["valid"], result["results"]["valid_corrupt"]
    assert valid["samples"] == corrupted["samples"] == 16 and valid["tokens"] == 16 * 64
    assert valid["loss"] == pytest.approx(snap["summary"]["final_valid_loss"], rel=1e-5)
    assert valid["bits_per_token"] == pytest.approx(valid["loss"] / math.log(2))
    assert corrupted["loss"] > valid["loss"]
    scalars = read_scalars(eval_dir / "tensorboard")
    assert scalars["eval/valid/loss"][-1] == (12, pytest.approx(valid["loss"]))
    assert scalars["eval/valid_corrupt/perplexity"][-1][0] == 12


def test_acmoe_eval_refuses_a_missing_split_before_starting(first_run, workdir, capsys, monkeypatch):
    from acmoe_megatron.cli import eval as eval_cli
    _, run_dir, _ = first_run
    only_valid = workdir / "data_valid_only"
    prepare(source="stdlib", out_dir=only_valid, seq_length=64, max_bytes=50_000, splits=["valid"])
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: pytest.fail("a process was started"))
    assert eval_cli.main([str(run_dir), "--split", "test", "--data", str(only_valid)]) == 2
    assert f"--data {only_valid} has no 'test' split (it has ['valid'])" in capsys.readouterr().err


def test_calibrated_run_is_evaluated_in_another_layout_generated_from_and_exported(first_run, workdir):
    """--calibrate on the EP=2 run, loaded in 1 process (EP=1, resharded): the calibrated table is
    stored beside the checkpoint, labelled in eval.json, and what acmoe-eval picks from then on. The
    same start-up writes the expert-specialisation report (--report)."""
    from acmoe_megatron.cli import eval as eval_cli
    from acmoe_megatron.cli import export as export_cli
    from acmoe_megatron.cli import generate as generate_cli
    from acmoe_megatron.inference import calibration as inference_stats
    _, run_dir, snap = first_run
    cal_dir = workdir / "calibrated"
    shutil.copytree(run_dir, cal_dir)
    stats_file = cal_dir / "checkpoints" / "iter_0000012" / INFERENCE_STATS_FILE
    cli = eval_cli._parser().parse_intermixed_args
    assert "--statistics batch" in " ".join(eval_cli.plan(cli([str(cal_dir)]))[2])
    gen_cli = generate_cli._parser().parse_intermixed_args
    with pytest.raises(generate_cli.ConfigError, match="trained with acmoe.source=batch.*Calibrate them first"):
        generate_cli.plan(gen_cli([str(cal_dir), "--prompt", "def "]))
    cmd = [sys.executable, "-m", "acmoe_megatron.cli.eval", str(cal_dir), "--nproc", "1", "--calibrate", "3",
           "--max-samples", "16", "--report", "megatron.expert_model_parallel_size=1"]
    out = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert out.returncode == 0, _tail(out)
    result = json.loads((cal_dir / "eval.json").read_text())
    assert result["statistics"] == "calibrated" and result["layout"]["ep"] == 1
    assert result["statistics_source"].startswith(
        f"calibrated (3 micro-batches of 4 samples per replica x 1 replicas of {workdir / 'data'}:train at iteration 12")
    tables, meta = inference_stats.load(stats_file)
    assert sorted(tables) == [3, 4] and meta["micro_batches"] == 3  # tiny_cpu: AC from MoE layer 3
    assert all(float(t["counts_K"].sum()) == 3 * 4 * 64 for t in tables.values())
    report = cal_dir / "specialisation"
    assert result["specialisation_report"] == {"dir": str(report), "data": str(workdir / "data"), "split": "valid",
                                               "samples": 16}
    numbers = json.loads((report / "specialisation.json").read_text())
    assert [layer["layer"] for layer in numbers["layers"]] == [1, 2, 3, 4]  # every MoE layer of tiny_cpu
    for layer in numbers["layers"]:
        assert layer["tokens"] == 16 * 64 and sum(layer["load_top1"]) == pytest.approx(1.0)
    text = (report / "specialisation.md").read_text()
    assert "(inference weights)" in text  # the AC layers' transformed separation used the calibrated table
    assert (report / "layer04_cooccurrence.png").stat().st_size > 0
    # before calibrating, the same start-up scored with the batch statistics: 1 process (EP=1) gives the
    # loss the 2-process EP=2 run reported
    batch = result["batch_statistics_results"]["valid"]
    assert batch["samples"] == 16 and batch["loss"] == pytest.approx(snap["summary"]["final_valid_loss"], rel=1e-5)
    # the batch-independent table changes the scores a little, not the model
    assert result["results"]["valid"]["loss"] == pytest.approx(snap["summary"]["final_valid_loss"], rel=0.05)
    assert result["results"]["valid"]["loss"] != pytest.approx(snap["summary"]["final_valid_loss"], rel=1e-6)
    # acmoe-generate now runs (one process, KV cache): greedy is deterministic (the same prompt twice)
    cmd = [sys.executable, "-m", "acmoe_megatron.cli.generate", str(cal_dir), "--prompt", "def ", "--prompt", "def ",
           "--max-new-tokens", "5", "--out", str(workdir / "generations.json")]
    out = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert out.returncode == 0, _tail(out)
    gen = json.loads((workdir / "generations.json").read_text())
    assert gen["ac_statistics"] == "calibrated" and gen["iteration"] == 12
    first, second = gen["generations"]
    assert first == second and 1 <= len(first["new_token_ids"]) <= 5 and first["prompt_tokens"] == 4
    with pytest.raises(generate_cli.ConfigError, match=r"exceeds the model's 64 positions"):
        generate_cli.plan(gen_cli([str(cal_dir), "--prompt", "x" * 60, "--max-new-tokens", "5"]))
    # acmoe-export-hf: a transformers directory whose logits the worker checked against megatron's
    hf_dir = workdir / "hf_export"
    out = subprocess.run([sys.executable, "-m", "acmoe_megatron.cli.export", str(cal_dir), str(hf_dir)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert out.returncode == 0, _tail(out)
    record = json.loads((hf_dir / "acmoe_export.json").read_text())
    assert record["ac_statistics"] == "calibrated" and record["check"]["passed"]
    assert record["check"]["max_abs_logit_difference"] <= 1e-4 and record["check"]["tokens"] == 64
    assert {"config.json", "model.safetensors", "modeling_acmoe.py", "tokenizer_config.json"} <= {
        p.name for p in hf_dir.iterdir()}
    with pytest.raises(export_cli.ConfigError, match="exists and is not an empty directory"):
        export_cli.plan(export_cli._parser().parse_intermixed_args([str(cal_dir), str(hf_dir)]))
    # from now on the default is the calibrated table; asking for what the run lacks is refused
    worker = " ".join(eval_cli.plan(cli([str(cal_dir)]))[2])
    assert f"--statistics calibrated --stats-file {stats_file}" in worker
    with pytest.raises(eval_cli.ConfigError, match="trained with acmoe.source=batch and has no running statistics"):
        eval_cli.plan(cli([str(cal_dir), "--statistics", "ema"]))
    stats_file.unlink()
    with pytest.raises(eval_cli.ConfigError, match="does not exist; make it with --calibrate N"):
        eval_cli.plan(cli([str(cal_dir), "--statistics", "calibrated"]))
    with pytest.raises(eval_cli.ConfigError, match="router is 'topk', which has no cluster statistics"):
        eval_cli.plan(cli([str(cal_dir), "--calibrate", "2", "acmoe.router=topk"]))
