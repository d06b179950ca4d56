"""preflight/memory.py: megatron's theoretical memory, split, and the verdict against a GPU."""

import pytest

from acmoe_megatron.runtime.preflight.memory import GIB, estimate_memory, memory_verdict
from acmoe_megatron.runtime.recipe import load_recipe
from acmoe_megatron.runtime.run_plan import build_plan


@pytest.fixture(scope="module")
def multinode():
    plan = build_plan(load_recipe("configs/multinode_h100_fp8.yaml"), 16, host_checks=False, vocab_standin=32000)
    return plan.args, estimate_memory(plan.args)


def test_split_adds_up_to_megatrons_weight_and_optimizer(multinode):
    from megatron.training.theoretical_memory_usage import compute_weight_and_optimizer_memory

    args, est = multinode
    args.padded_vocab_size = args.padded_vocab_size or 32000
    parts = est["parameters_bytes"] + est["gradients_bytes"] + est["optimizer_bytes"]
    assert parts == pytest.approx(compute_weight_and_optimizer_memory(args), rel=1e-6)
    assert est["parameters_bytes"] == pytest.approx(2 * est["parameters_on_stage"], rel=1e-6)  # bf16
    assert est["gradients_bytes"] == pytest.approx(4 * est["parameters_on_stage"], rel=1e-6)
    assert "sequence parallel" in est["activation_formula"] and est["precision"] == "bf16"
    assert est["total_bytes"] == pytest.approx(parts + est["activations_bytes"], rel=1e-6)


def test_verdict_against_gpu_sizes(multinode):
    _, est = multinode
    assert memory_verdict(est, 80 * GIB, "H100")[0] == "pass"
    status, line = memory_verdict(est, 16 * GIB, "a 16 GiB GPU")
    assert status == "fail" and line.startswith("will not fit: estimated") and "a 16 GiB GPU" in line
