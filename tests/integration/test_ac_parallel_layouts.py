"""The AC router is exact under every parallel layout: real Megatron-trainer runs on gloo.

A tiny ACMoE GPT (4 layers, all MoE, 4 experts, AC on MoE layers 2-4, fp32) starts from the same
weights in every layout (one world-size-1 checkpoint, loaded with megatron's resharding
``torch_dist`` loader) and trains 3 steps on the same data. Per-step LM loss (TensorBoard) and
per-layer router gradient norms after megatron's gradient reduction must match the single-process
run within 1e-5 relative. PP=2 puts AC layer 3 on stage 1 with its predecessor on stage 0; PP=2
with virtual stages additionally sends labels from the last rank back to rank 0 (layers 1,3 on
rank 0; 2,4 on rank 1). Recompute (selective "moe" and full) must give identical numbers.

Elliptical attention (elliptical.py) rides on some of these runs at no extra launch: TP=2+SP (heads
split across ranks, no communication), PP=2 with full recompute (the values of layer 2 cross the
stage boundary and stage 1's replays read them) and both single-process recompute runs (selective
also replays ``core_attn``) run with ``elliptical.enabled=true`` and are compared with a
single-process reference that has it on too.

``acmoe.expert_norm`` (the release's rows held at norm 1.5 after every optimizer step) rides on a
PP=2 + virtual-stage run: each stage's optimizer holds its own routers, and steps 2-3 must equal a
single-process reference with the same setting (EP=2 and resume: test_train_integration; DP=2 with
a distributed-optimizer shard boundary inside a row: test_expert_norm_dp2).

The plugin API: ``examples/pretrain_gpt_acmoe.py`` (a plain Megatron script: megatron's own
``pretrain`` and a stock forward step, plus ``plugin.add_arguments/validate_args/patch_block_spec/
attach``) must give exactly our launcher's numbers on the same recipe, with PP=2 + full recompute
(the launcher's run is shared with the layout test) and with EP=2 + a spec the script customised
(``qk_l2_norm``).
"""

import subprocess
import sys
from pathlib import Path

import pytest

from acmoe_megatron.testing import assert_same_run, read_parity_run

ROOT = Path(__file__).resolve().parents[2]
STEPS = 3
BASE = [
    "megatron.num_layers=4", "megatron.hidden_size=64", "megatron.num_attention_heads=4",
    "megatron.ffn_hidden_size=128", "megatron.moe_ffn_hidden_size=128", "megatron.num_experts=4",
    "megatron.seq_length=64", "megatron.max_position_embeddings=64", "megatron.lr_warmup_iters=0",
    "megatron.eval_iters=0", "megatron.eval_interval=1000", "megatron.log_interval=1",
    "megatron.expert_model_parallel_size=1", "acmoe.first_ac_layer=2", "megatron.lr=0.01",
    "megatron.make_vocab_size_divisible_by=256",  # padded vocab 512 for TP=1 and TP=2 alike
]


def _launch(nproc, run_dir, *overrides, timeout=600):
    cmd = [sys.executable, "-m", "acmoe_megatron.cli.pretrain", "--config", "configs/tiny_cpu.yaml",
           "--nproc", str(nproc), *BASE, f"run.dir={run_dir}", *overrides]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from acmoe_megatron.data import prepare

    tmp = tmp_path_factory.mktemp("layouts")
    prepare(source="stdlib", out_dir=tmp / "data", seq_length=64, max_bytes=300_000)
    _launch(1, tmp / "init", f"data.path={tmp / 'data'}", "megatron.train_iters=1",
            "megatron.micro_batch_size=4", "megatron.global_batch_size=8", "megatron.save_interval=1")
    return tmp


def _init(setup, overrides) -> Path:
    """The checkpoint every run starts from. A model with running AC statistics (acmoe.source=ema)
    has buffers a batch-statistics checkpoint lacks: it starts from its own, made the same way."""
    if "acmoe.source=ema" not in overrides:
        return setup / "init" / "checkpoints"
    init = setup / "init_ema"
    if not (init / "checkpoints").is_dir():
        _launch(1, init, f"data.path={setup / 'data'}", "megatron.train_iters=1", "megatron.micro_batch_size=4",
                "megatron.global_batch_size=8", "megatron.save_interval=1", "acmoe.source=ema")
    return init / "checkpoints"


def _overrides(setup, name, *overrides, mbs=4, gbs=8) -> list[str]:
    return [f"data.path={setup / 'data'}", f"megatron.train_iters={STEPS}",
            f"megatron.micro_batch_size={mbs}", f"megatron.global_batch_size={gbs}",
            f"megatron.load={_init(setup, overrides)}", "megatron.finetune=true",
            "megatron.no_load_optim=true", "megatron.no_load_rng=true", "megatron.save=null",
            "run.log_router_grad_norms=true", *overrides]


def _run(setup, name, nproc, *overrides, mbs=4, gbs=8):
    run_dir = setup / name
    out = _launch(nproc, run_dir, *_overrides(setup, name, *overrides, mbs=mbs, gbs=gbs))
    if EXPERT_NORM in overrides:
        assert "held at their fixed row norm after every optimizer step" in out.stdout  # the hook is installed
    return _read(run_dir)


def _read(run_dir):
    return read_parity_run(run_dir, STEPS)


_SHARED: dict[str, tuple] = {}  # launcher runs read by several tests of this module: one launch each


def _shared_run(setup, name, nproc, *overrides):
    if name not in _SHARED:
        _SHARED[name] = _run(setup, name, nproc, *overrides)
    return _SHARED[name]


def _run_example(setup, name, nproc, *overrides):
    """examples/pretrain_gpt_acmoe.py (a plain Megatron script using the plugin API) under torchrun,
    with the Megatron flags our trainer derives from the same recipe plus the --acmoe-* flags."""
    import os
    import socket

    from acmoe_megatron.data.shards.manifest import read_manifest
    from acmoe_megatron.plugin import settings_argv
    from acmoe_megatron.runtime.megatron_args import build_argv
    from acmoe_megatron.runtime.recipe import load_recipe

    run_dir = setup / name
    recipe = load_recipe(ROOT / "configs/tiny_cpu.yaml", [*BASE, f"run.dir={run_dir}", *_overrides(setup, name, *overrides)])
    argv = build_argv(recipe, read_manifest(recipe.data.path)) + settings_argv(recipe.acmoe, recipe.elliptical)
    argv += ["--shards", recipe.data.path, "--shards-seed", str(recipe.data.seed)]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, ACMOE_GRAD_NORM_DIR=str(run_dir))
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))  # as acmoe-pretrain
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(port), "tests/integration/dist/plugin_example.py", *argv]
    run_dir.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return _read(run_dir)


ELLIPTICAL = "elliptical.enabled=true"
EXPERT_NORM = "acmoe.expert_norm=1.5"
EMA_COSLEAD = ("acmoe.source=ema", "acmoe.lead_router=cosine")


def _close(a, b, rel):
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)


_assert_same = assert_same_run


@pytest.fixture(scope="module")
def reference(setup):
    return _run(setup, "ref", 1)


@pytest.fixture(scope="module")
def reference_elliptical(setup, reference):
    ref = _run(setup, "ref_elliptical", 1, ELLIPTICAL)
    # the trainer really switched the metric on (runtime/model_provider.py passes recipe.elliptical)
    assert not _close(ref[0][-1], reference[0][-1], 1e-5), (ref[0], reference[0])
    return ref


@pytest.fixture(scope="module")
def reference_expert_norm(setup, reference):
    ref = _run(setup, "ref_expert_norm", 1, EXPERT_NORM)
    # the setting took effect: after step 1 the AC embeddings (layers 2-4) sit at norm 1.5 instead of
    # megatron's ~0.16, and the cosine score's gradient scales with 1 / ||e||
    for layer in ("2", "3", "4"):
        assert ref[1][2][layer] < 0.5 * reference[1][2][layer], (layer, ref[1], reference[1])
    return ref


@pytest.fixture(scope="module")
def reference_ema_coslead(setup, reference):
    ref = _run(setup, "ref_ema_coslead", 1, *EMA_COSLEAD)
    assert not _close(ref[0][-1], reference[0][-1], 1e-5), (ref[0], reference[0])  # the settings took effect
    return ref


def _reference_for(request, overrides):
    if EMA_COSLEAD[0] in overrides:
        return request.getfixturevalue("reference_ema_coslead")
    if EXPERT_NORM in overrides:
        return request.getfixturevalue("reference_expert_norm")
    return request.getfixturevalue("reference_elliptical" if ELLIPTICAL in overrides else "reference")


LAYOUTS = {
    # EP=2 runs DP=2 over the dense part; with scope=local each replica's statistics are its own
    # micro-batch's, which is what the reference computes per micro-batch (with TP=1 the default
    # scope "tp" is the same set: scope tp with TP=2 is ep2_tp2's)
    "ep2": (2, ["megatron.expert_model_parallel_size=2", "acmoe.scope=local"]),
    "tp2_sp": (2, ["megatron.tensor_model_parallel_size=2", "megatron.sequence_parallel=true", ELLIPTICAL]),
    "pp2_vpp2": (2, ["megatron.pipeline_model_parallel_size=2",
                     "megatron.num_layers_per_virtual_pipeline_stage=1"]),
    "pp2_vpp2_expert_norm": (2, ["megatron.pipeline_model_parallel_size=2",
                                 "megatron.num_layers_per_virtual_pipeline_stage=1", EXPERT_NORM]),
    "ep2_tp2": (4, ["megatron.expert_model_parallel_size=2", "megatron.tensor_model_parallel_size=2",
                    "megatron.sequence_parallel=true", "megatron.expert_tensor_parallel_size=1"]),
    # PP=2 (stage 0: layers 1-2, stage 1: 3-4) with full recompute: labels and elliptical values
    # cross the stage boundary and recompute replays on stage 1 find them under the right micro-batch
    "pp2_full_recompute": (2, ["megatron.pipeline_model_parallel_size=2",
                               "megatron.recompute_granularity=full", "megatron.recompute_method=uniform",
                               "megatron.recompute_num_layers=1", ELLIPTICAL]),
    # the real-run recipes' AC (cosine lead layers, running statistics; configs/gpu_*.yaml, multinode):
    # with one data-parallel replica every micro-batch updates the running statistics in the reference's
    # order, so TP+SP and PP+VPP must give its numbers (with DP > 1 the update is the all-reduced
    # statistics of all replicas' micro-batches at once, by design: another sequence of updates than one
    # process's, so there is no single-process reference)
    "tp2_sp_ema_coslead": (2, ["megatron.tensor_model_parallel_size=2", "megatron.sequence_parallel=true",
                               *EMA_COSLEAD]),
    "pp2_vpp2_ema_coslead": (2, ["megatron.pipeline_model_parallel_size=2",
                                 "megatron.num_layers_per_virtual_pipeline_stage=1", *EMA_COSLEAD]),
}


# Measured (2026-12-07): TP=2+SP with running statistics gives the reference's losses within 1e-5 but
# one lead router's gradient norm 7.6e-5 (relative) off at step 3; with cosine lead layers and batch
# statistics the same layout is 1.1e-5 off at that step. The statistics' TP all-reduce sums in another
# order and three steps at lr 0.01 amplify it; a wrong statistics scope or label is off by O(1).
TOLERANCE = {"tp2_sp_ema_coslead": 1e-4}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(setup, request, name):
    nproc, overrides = LAYOUTS[name]
    _assert_same(_shared_run(setup, name, nproc, *overrides), _reference_for(request, overrides),
                 rel=TOLERANCE.get(name, 1e-5))


# The plugin API (plugin.py) in a plain Megatron script, against our own launcher on the same recipe:
# megatron's parse_and_validate_args + pretrain, a stock forward step, and only add_arguments /
# validate_args / patch_block_spec / attach. PP=2 with full recompute (labels and elliptical values
# cross the stage boundary in the hooks, replays read them) and EP=2 with a spec the script
# customised itself (qk_l2_norm, which must survive the patch and change the result).
QK_L2_NORM = "megatron.qk_l2_norm=true"
PLUGIN_CASES = {
    "pp2_full_recompute": (2, LAYOUTS["pp2_full_recompute"][1]),
    "ep2_qk_l2_norm": (2, [*LAYOUTS["ep2"][1], QK_L2_NORM]),
}


@pytest.mark.parametrize("name", list(PLUGIN_CASES))
def test_plain_megatron_script_with_the_plugin_matches_our_launcher(setup, name):
    nproc, overrides = PLUGIN_CASES[name]
    ours = _shared_run(setup, name, nproc, *overrides)
    example = _run_example(setup, f"example_{name}", nproc, *overrides)
    _assert_same(example, ours, rel=0.0)
    if QK_L2_NORM in overrides:  # the customisation is in both models: the numbers differ from plain EP=2
        plain = _shared_run(setup, "ep2", LAYOUTS["ep2"][0], *LAYOUTS["ep2"][1])
        assert not _close(example[0][0], plain[0][0], 1e-6), (example[0], plain[0])


@pytest.mark.parametrize("name, overrides", [
    ("selective_recompute", ["megatron.recompute_granularity=selective",
                             "megatron.recompute_modules=[moe,core_attn]", ELLIPTICAL]),
    ("full_recompute", ["megatron.recompute_granularity=full", "megatron.recompute_method=uniform",
                        "megatron.recompute_num_layers=1", ELLIPTICAL]),
])
def test_recompute_is_identical(setup, request, name, overrides):
    _assert_same(_run(setup, name, 1, *overrides), _reference_for(request, overrides), rel=0.0)


def test_dp_scope_matches_one_big_micro_batch(setup):
    """DP=2 with scope=dp equals one process whose micro-batch holds both replicas' samples.

    The load-balancing loss is switched off here: megatron's aux losses are not linear in the
    tokens and are normalised per replica, so their gradients differ between 1×8 and 2×4 whatever
    the router (the z-loss is a per-token mean and stays on).
    """
    common = ["acmoe.scope=dp", "megatron.moe_router_load_balancing_type=none", "megatron.moe_aux_loss_coeff=0"]
    ref = _run(setup, "ref_dp", 1, *common, mbs=8, gbs=8)
    _assert_same(_run(setup, "dp2_dp_scope", 2, *common, mbs=4, gbs=8), ref)
