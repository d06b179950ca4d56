"""``acmoe-plot`` on synthetic event files: the PNGs exist, are valid, have the fixed pixel size and
non-trivial content; a run directory without event files is a clear error with exit code 2.

The event files are written with torch's ``SummaryWriter`` (what Megatron itself uses) under the
TensorBoard tag contract of issue 5: 2 runs, 4 MoE layers (global numbers 2, 4, 6, 8), 8 experts,
10 logged steps; the AC run also logs instability and the ``ac/...`` tags.
"""

import json
import math
import random
import struct
from pathlib import Path

import pytest

from acmoe_megatron.cli import plot

N_EXPERTS = 8
MOE_LAYERS = (2, 4, 6, 8)
STEPS = range(1, 11)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_synthetic_run(run_dir: Path, name: str, router: str, seed: int) -> Path:
    """A run dir (summary.json, config.yaml, tensorboard/ events) following the tag contract."""
    from torch.utils.tensorboard import SummaryWriter

    rng = random.Random(seed)
    tb = run_dir / "tensorboard"
    tb.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({"name": name, "router": router}))
    (run_dir / "config.yaml").write_text(f"run:\n  name: {name}\nacmoe:\n  router: {router}\n")
    w = SummaryWriter(log_dir=str(tb))
    for step in STEPS:
        loss = 5.5 * math.exp(-step / 6) + 2.0 + 0.05 * rng.random()
        w.add_scalar("lm loss", loss, step)
        w.add_scalar("lm loss bits-per-token", loss / math.log(2), step)
        w.add_scalar("learning-rate", 1e-3 * step / 10, step)
        w.add_scalar("grad-norm", 1.0 + rng.random(), step)
        w.add_scalar("load_balancing_loss", 1.0 + 0.1 * rng.random(), step)
        w.add_scalar("z_loss", 0.01 * rng.random(), step)
        w.add_scalar("iteration-time", 0.5, step)
        w.add_scalar("throughput", 10.0, step)
        w.add_scalar("throughput/tokens_per_s", 4000.0 + rng.random(), step)
        w.add_scalar("throughput/tokens_per_s_per_device", 2000.0, step)
        w.add_scalar("memory/max_gib", 1.5, step)
        if step % 5 == 0:
            w.add_scalar("lm loss validation", loss - 0.1, step)
            w.add_scalar("lm loss validation ppl", math.exp(loss - 0.1), step)
            w.add_scalar("lm loss validation bits-per-token", (loss - 0.1) / math.log(2), step)
        for k, layer in enumerate(MOE_LAYERS):
            raw = [rng.random() + (2.0 if j == k else 0.0) for j in range(N_EXPERTS)]
            fractions = [v / sum(raw) for v in raw]
            p = f"moe/layer{layer:02d}"
            for j, frac in enumerate(fractions):
                w.add_scalar(f"{p}/load_fraction/expert{j:02d}", frac, step)
            mean = 1.0 / N_EXPERTS
            w.add_scalar(f"{p}/load_max_over_mean", max(fractions) / mean, step)
            std = math.sqrt(sum((f - mean) ** 2 for f in fractions) / N_EXPERTS)
            w.add_scalar(f"{p}/load_cv", std / mean, step)
            w.add_scalar(f"{p}/router_entropy", math.log(N_EXPERTS) * (0.8 + 0.1 * rng.random()), step)
            if router == "ac":
                if k > 0:
                    w.add_scalar(f"{p}/instability", 0.2 + 0.5 * rng.random(), step)
                a = f"ac/layer{layer:02d}"
                w.add_scalar(f"{a}/weight_mean", 1.0, step)
                w.add_scalar(f"{a}/weight_max", 3.0 + rng.random(), step)
                w.add_scalar(f"{a}/clip_rate", 0.01 * rng.random(), step)
                w.add_scalar(f"{a}/cluster_mad_mean", 0.5 + 0.1 * rng.random(), step)
                w.add_scalar(f"{a}/separation_raw", 1.0 + 0.05 * step, step)
                w.add_scalar(f"{a}/separation_ac", 1.2 + 0.08 * step, step)
    w.close()
    return run_dir


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the PNG signature."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert head[12:16] == b"IHDR", f"{path}: first chunk is not IHDR"
    return struct.unpack(">II", head[16:24])


def assert_nontrivial_png(path: Path, name: str) -> None:
    from matplotlib import image

    assert path.is_file(), f"{path} not written"
    assert png_size(path) == plot.figure_pixels(name)
    assert path.stat().st_size > 10_000, f"{path} is only {path.stat().st_size} bytes"
    pixels = image.imread(path)
    assert pixels.shape[:2] == plot.figure_pixels(name)[::-1]
    flat = pixels.reshape(-1, pixels.shape[-1])
    assert (flat != flat[0]).any(axis=1).mean() > 0.02, f"{path} is (almost) one colour"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    ac = write_synthetic_run(base / "ac_run", "tiny", "ac", seed=1)
    softmax = write_synthetic_run(base / "softmax_run", "tiny", "softmax", seed=2)
    return ac, softmax


def test_expected_figure_sizes():
    assert plot.figure_pixels("loss") == (800, 500)
    assert plot.figure_pixels("expert_load") == (800, 500)
    assert plot.figure_pixels("expert_load_over_time") == (1200, 800)
    assert plot.figure_pixels("routing") == (1200, 500)


def test_plot_two_runs_writes_all_figures(runs, tmp_path, capsys):
    ac, softmax = runs
    out = tmp_path / "plots"
    assert plot.main([str(ac), str(softmax), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    names = ["loss", "expert_load", "expert_load_over_time", "routing"]
    assert printed == [str(out / f"{n}.png") for n in names]
    for n in names:
        assert_nontrivial_png(out / f"{n}.png", n)


def test_default_out_dir_labels_and_no_routing_without_tags(runs, capsys):
    ac, softmax = runs
    assert plot.main([str(softmax), str(ac), "--label", "baseline", "adaptive"]) == 0
    out = softmax / "plots"
    assert sorted(p.name for p in out.iterdir()) == ["expert_load.png", "expert_load_over_time.png",
                                                       "loss.png"]  # softmax first: no routing.png
    assert_nontrivial_png(out / "loss.png", "loss")


def test_run_labels_from_summary(runs):
    ac, softmax = runs
    assert plot.run_label(ac) == "tiny (ac)"
    loaded = [plot.load_run(ac), plot.load_run(softmax)]
    plot._dedupe_labels(loaded)
    assert [r.label for r in loaded] == ["tiny (ac)", "tiny (softmax)"]


def test_last_load_matrix_rows_sum_to_one(runs):
    layers, n_experts, rows, step = plot.last_load_matrix(plot.load_fractions(plot.load_run(runs[0]).scalars))
    assert layers == list(MOE_LAYERS) and n_experts == N_EXPERTS and step == STEPS[-1]
    for row in rows:
        assert sum(row) == pytest.approx(1.0, abs=1e-5)


def test_missing_event_files_is_a_clear_error(tmp_path, capsys):
    run_dir = tmp_path / "not_trained"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text("{}")
    assert plot.main([str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert str(run_dir) in err and "run training first" in err
    assert not (run_dir / "plots").exists()

    assert plot.main([str(tmp_path / "does_not_exist")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_label_count_mismatch_is_an_error(runs, capsys):
    assert plot.main([str(runs[0]), str(runs[1]), "--label", "only-one"]) == 2
    assert "--label" in capsys.readouterr().err
