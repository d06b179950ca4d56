"""Megatron-Bridge trains the AC router exactly as our trainer does: examples/bridge_pretrain_acmoe.py.

The example takes Bridge's own ``vanilla_gpt_pretrain_config`` recipe (Bridge's recipe for Megatron-LM
correlation), Bridge's Hydra-style overrides, the plugin's ``bridge_layer_spec`` and pre-wrap hook,
and calls Bridge's ``pretrain`` with Bridge's GPT forward step. Bridge runs it on CPU/gloo through
the "bridge" stage of ``cpu_runtime`` (import stand-ins for Transformer Engine and NVRx, Bridge's
own ``initialize_megatron`` without CUDA).

Same model, data and seed as ``acmoe-pretrain``: the tiny recipe of the layout tests (4 MoE layers,
AC on layers 2-4, expert rows held at norm 1.5), megatron indexed data converted from our shards
(both sides read it through megatron's ``GPTDataset`` and ``single`` sampler), and the same initial
weights: a 1-step ``acmoe-pretrain`` checkpoint that our reference loads with ``finetune`` and Bridge
loads as ``checkpoint.pretrained_checkpoint`` (so this also shows Bridge continuing from our
checkpoints). The per-step LM loss and the reduced router gradient norms of every MoE layer must
match within 1e-5 relative: Bridge's provider API at EP=2 on 2 processes launched through NeMo-Run's
LocalExecutor (examples/nemo_run_acmoe.py), and megatron's ``GPTModelConfig`` API (``--model-api
config``) on 1 process under plain torchrun.

The Bridge settings that reproduce our recipe are ``BRIDGE_OVERRIDES`` below; the ones Bridge's recipe
sets differently from megatron's defaults are the ones that matter (weight decay 0.033 in its
scheduler, vocabulary padding off, tied embeddings, fused cross entropy).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from acmoe_megatron.testing import assert_same_run, read_parity_run

ROOT = Path(__file__).resolve().parents[2]
NEMO_RUN = ROOT / ".venv-nemo-run"  # make nemo-run (a --target directory: its pins stay out of .venv)
BRIDGE_PYTHON = ROOT / ".venv-bridge" / "bin" / "python"  # make bridge (a venv layered on .venv: Makefile)
STEPS = 3

# installed? (read from its metadata: importing megatron.bridge needs cpu_runtime.install_bridge() first)
_BRIDGE = subprocess.run([BRIDGE_PYTHON, "-c", "import importlib.metadata as m; print(m.version('megatron-bridge'))"],
                         capture_output=True, text=True) if BRIDGE_PYTHON.exists() else None
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    _BRIDGE is None or _BRIDGE.returncode != 0,
    reason="Megatron-Bridge is not installed: make bridge (README, Megatron-Bridge)")]

DIMS = {"num_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "ffn_hidden_size": 128,
        "moe_ffn_hidden_size": 128, "seq_length": 64}
OURS = [*(f"megatron.{k}={v}" for k, v in DIMS.items()), "megatron.num_experts=4",
        "megatron.max_position_embeddings=64",
        "megatron.lr_warmup_iters=0", "megatron.eval_iters=0", "megatron.eval_interval=1000",
        "megatron.log_interval=1", "megatron.expert_model_parallel_size=1", "acmoe.first_ac_layer=2",
        "megatron.lr=0.01", "megatron.make_vocab_size_divisible_by=256", "megatron.split='100,0,0'",
        "megatron.micro_batch_size=4", "megatron.global_batch_size=8", "acmoe.expert_norm=1.5"]
# configs/tiny_cpu.yaml + OURS, in Bridge's words (the recipe's own values where they already agree)
BRIDGE_OVERRIDES = [
    *(f"model.{k}={v}" for k, v in DIMS.items()), "model.num_moe_experts=4", "model.moe_router_topk=2",
    "model.moe_token_dispatcher_type=alltoall", "model.moe_router_load_balancing_type=aux_loss",
    "model.moe_aux_loss_coeff=0.01", "model.moe_z_loss_coeff=0.001", "model.position_embedding_type=rope",
    "model.normalization=RMSNorm", "model.add_bias_linear=false", "model.share_embeddings_and_output_weights=false",
    "model.should_pad_vocab=true", "model.make_vocab_size_divisible_by=256", "model.attention_dropout=0.0",
    "model.hidden_dropout=0.0", "model.cross_entropy_loss_fusion=false", "tokenizer.vocab_size=257",
    "rng.seed=1234", "optimizer.lr=0.01", "optimizer.min_lr=0.0002", "optimizer.weight_decay=0.01",
    "optimizer.clip_grad=1.0", "optimizer.adam_beta2=0.99", "scheduler.start_weight_decay=0.01",
    "scheduler.end_weight_decay=0.01", "scheduler.lr_warmup_iters=0", "scheduler.lr_decay_style=cosine",
    "scheduler.lr_decay_iters=null", f"train.train_iters={STEPS}", "train.global_batch_size=8",
    "train.micro_batch_size=4", "logger.log_interval=1", "validation.eval_iters=0", "checkpoint.save=null",
]


def _pretrain(run_dir, *overrides):
    cmd = [sys.executable, "-m", "acmoe_megatron.cli.pretrain", "--config", "configs/tiny_cpu.yaml", "--nproc", "1",
           *OURS, f"run.dir={run_dir}", *overrides]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Indexed data, the shared initial checkpoint, and acmoe-pretrain's reference run from it."""
    from acmoe_megatron.data import prepare
    from acmoe_megatron.data.megatron.convert import shards_to_indexed

    tmp = tmp_path_factory.mktemp("bridge")
    prepare(source="stdlib", out_dir=tmp / "shards", seq_length=64, max_bytes=300_000)
    prefix = shards_to_indexed(tmp / "shards", tmp / "indexed")["train"]
    data = f"megatron.data_path=[{prefix}]"
    _pretrain(tmp / "init", data, "megatron.train_iters=1", "megatron.save_interval=1", "acmoe.expert_norm=null")
    _pretrain(tmp / "ref", data, f"megatron.train_iters={STEPS}", f"megatron.load={tmp / 'init' / 'checkpoints'}",
              "megatron.finetune=true", "megatron.no_load_optim=true", "megatron.no_load_rng=true",
              "megatron.save=null", "run.log_router_grad_norms=true")
    return tmp, prefix, read_parity_run(tmp / "ref", STEPS)


def _bridge(setup, name, nproc, *args, nemo_run=False):
    """The Bridge example under torchrun; ``nemo_run``: launched by examples/nemo_run_acmoe.py through
    NeMo-Run's LocalExecutor instead (NeMo-Run from make nemo-run's --target directory)."""
    tmp, prefix, _ = setup
    run_dir = tmp / name
    run_dir.mkdir()
    example_args = ["--data-path", prefix, "--split", "100,0,0", "--acmoe-router", "ac", "--acmoe-first-ac-layer", "2",
                    "--acmoe-expert-norm", "1.5", *args, *BRIDGE_OVERRIDES,
                    f"checkpoint.pretrained_checkpoint={tmp / 'init' / 'checkpoints'}",
                    f"logger.tensorboard_dir={run_dir / 'tensorboard'}"]
    env = dict(os.environ, ACMOE_GRAD_NORM_DIR=str(run_dir))
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    if nemo_run:
        env["PYTHONPATH"] = os.pathsep.join((str(NEMO_RUN), str(ROOT)))
        cmd = [str(BRIDGE_PYTHON), "examples/nemo_run_acmoe.py", "--executor", "local", "--nproc", str(nproc),
               "--script", "tests/integration/dist/bridge_example.py", "--job-dir", str(run_dir / "jobs"),
               "--env", f"ACMOE_GRAD_NORM_DIR={run_dir}", "--", *example_args]
    else:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [str(BRIDGE_PYTHON), "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(port), "tests/integration/dist/bridge_example.py", *example_args]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return out, run_dir


def _assert_same(got, ref):
    assert_same_run(got, ref, rel=1e-5, what="acmoe-pretrain")
    assert all(set(layers) == {"1", "2", "3", "4"} for layers in ref[1].values()), ref[1]  # every MoE layer


@pytest.mark.skipif(not (NEMO_RUN / "nemo_run").is_dir(), reason="NeMo-Run is not installed: make nemo-run")
def test_bridge_pretrain_at_ep2_through_nemo_run_matches_acmoe_pretrain(setup):
    """Launched the way NVIDIA's stack launches Bridge: NeMo-Run's LocalExecutor with its torchrun
    launcher (examples/nemo_run_acmoe.py), 2 processes, EP=2."""
    out, run_dir = _bridge(setup, "bridge_ep2", 2, "model.expert_model_parallel_size=2", nemo_run=True)
    assert "NeMo-Run experiment acmoe_bridge: {'pretrain': 'SUCCEEDED" in out.stdout, out.stdout[-3000:]
    _assert_same(read_parity_run(run_dir, STEPS), setup[2])
    # our routers are in Bridge's model, the expert rows are held, the CPU shims are named
    assert "AC expert embeddings held at their row norm" in out.stdout, out.stdout[-3000:]
    summary = json.loads((run_dir / "acmoe_summary.json").read_text())
    assert summary["bridge_version"].startswith("0.6.") and summary["model_api"] == "provider"
    for shim in ("B0_bridge_import_standins", "B1_bridge_initialize_without_cuda", "T1_T2_initialize_without_cuda"):
        assert shim in summary["runtime_shims"], summary
    assert "[acmoe] runtime shims:" in out.stdout and "B0_bridge_import_standins" in out.stdout


def test_bridge_with_megatron_gpt_model_config_matches_acmoe_pretrain(setup):
    """megatron's GPTModelConfig (what Bridge's deprecated providers point to): spec and pre_wrap_hooks."""
    out, run_dir = _bridge(setup, "bridge_config", 1, "--model-api", "config")
    _assert_same(read_parity_run(run_dir, STEPS), setup[2])
    assert json.loads((run_dir / "acmoe_summary.json").read_text())["model_api"] == "config"


def test_autobridge_imports_a_hugging_face_moe_checkpoint_into_our_routers(tmp_path):
    """Bridge's AutoBridge loads a Hugging Face Qwen3-MoE checkpoint (a tiny random one made here:
    no hub access) into a Megatron model built with ``bridge_layer_spec``. With our top-k router
    everywhere the import is exact (the HF logits to 1e-5); with AC from MoE layer 3 (the paper's
    placement on an existing model) the routers of layers 3-4 are ACRouter holding the HF gate
    weights as expert embeddings, and the logits move only through the routing."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
                            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            num_experts=4, num_experts_per_tok=2, max_position_embeddings=128, norm_topk_prob=True,
                            tie_word_embeddings=False)
    Qwen3MoeForCausalLM(config).save_pretrained(tmp_path / "hf")
    out = subprocess.run([str(BRIDGE_PYTHON), "tests/integration/dist/autobridge_import.py", str(tmp_path / "hf"),
                          str(tmp_path / "result.json")], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, MASTER_PORT=str(_free_port())))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert "ACRouter" in result["registered"] and "LabelSourceRouter" in result["registered"]
    topk, ac = result["topk"], result["ac"]
    assert topk["routers"] == ["LabelSourceRouter"] * 4 and all(topk["gate_equal"]), topk
    assert topk["max_abs_logit_diff"] <= 1e-5, topk  # logits of magnitude ~0.7
    assert ac["routers"] == ["LabelSourceRouter", "LabelSourceRouter", "ACRouter", "ACRouter"], ac
    assert all(ac["gate_equal"]), ac
    assert ac["max_abs_logit_diff"] > 100 * topk["max_abs_logit_diff"], (ac, topk)  # AC does route differently


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
