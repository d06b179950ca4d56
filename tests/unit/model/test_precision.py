"""FP8 rules and the fused-path report (precision.py), checked on CPU."""

import types

import pytest

from acmoe_megatron.model.precision import check_fp8, fused_paths, have_nvidia_apex

HOPPER, ADA, AMPERE, BLACKWELL = (9, 0), (8, 9), (8, 0), (10, 0)


def test_fp8_off_is_always_fine():
    check_fp8(None, None, have_te=False, cuda_capability=None)


@pytest.mark.parametrize(
    "fmt, recipe, te, cap, message",
    [
        ("hybrid", "delayed", True, None, "needs a CUDA GPU"),
        ("hybrid", "delayed", False, HOPPER, "Transformer Engine"),
        ("hybrid", "delayed", True, AMPERE, "compute capability >= 8.9"),
        ("hybrid", "blockwise", True, BLACKWELL, "Hopper-only"),
        ("hybrid", "blockwise", True, ADA, "Hopper-only"),
        ("e4m3", "mxfp8", True, HOPPER, "Blackwell"),
        ("e5m2", "delayed", True, HOPPER, "choose one of"),
        ("hybrid", "fancy", True, HOPPER, "choose one of"),
    ],
)
def test_fp8_requests_that_cannot_run_name_the_fix(fmt, recipe, te, cap, message):
    with pytest.raises(ValueError, match=message):
        check_fp8(fmt, recipe, have_te=te, cuda_capability=cap)


@pytest.mark.parametrize(
    "fmt, recipe, cap",
    [("hybrid", "delayed", HOPPER), ("e4m3", "tensorwise", ADA), ("hybrid", "blockwise", HOPPER),
     ("hybrid", "mxfp8", BLACKWELL), ("hybrid", None, HOPPER)],
)
def test_supported_fp8_requests_pass(fmt, recipe, cap):
    check_fp8(fmt, recipe, have_te=True, cuda_capability=cap)


def test_fused_path_report_on_this_machine():
    args = types.SimpleNamespace(transformer_impl="local", moe_grouped_gemm=False, fp8=None,
                                 gradient_accumulation_fusion=False)
    report = fused_paths(args)
    assert report["layers"] == "megatron local (torch)"
    assert report["experts"].startswith("SequentialMLP")
    assert report["fp8"] == "off"
    assert report["nvidia_apex"] == ("available" if have_nvidia_apex() else "absent")
    te_args = types.SimpleNamespace(transformer_impl="transformer_engine", moe_grouped_gemm=True,
                                    fp8="hybrid", fp8_recipe="delayed")
    assert fused_paths(te_args)["experts"].startswith("TEGroupedMLP")


def test_requested_fused_paths_against_the_machine():
    from types import SimpleNamespace

    from acmoe_megatron.model.precision import requested_fused

    args = SimpleNamespace(transformer_impl="transformer_engine", moe_grouped_gemm=True, moe_permute_fusion=False,
                           cross_entropy_loss_fusion=False, gradient_accumulation_fusion=True, fp8="hybrid",
                           fp8_recipe="blockwise")
    ok = requested_fused(args, have_te=True, have_apex=False, cuda_capability=(9, 0))
    assert [w["path"] for w in ok] == ["transformer_impl=transformer_engine", "moe_grouped_gemm (TEGroupedMLP)",
                                       "gradient_accumulation_fusion", "fp8 hybrid / blockwise"]
    assert all(w["available"] for w in ok)
    no_te = {w["path"]: w for w in requested_fused(args, have_te=False, have_apex=False, cuda_capability=(9, 0))}
    assert not no_te["moe_grouped_gemm (TEGroupedMLP)"]["available"] and "NGC" in no_te["moe_grouped_gemm (TEGroupedMLP)"]["fix"]
    assert not no_te["fp8 hybrid / blockwise"]["available"] and "Transformer Engine" in no_te["fp8 hybrid / blockwise"]["fix"]
    ada = {w["path"]: w for w in requested_fused(args, have_te=True, have_apex=False, cuda_capability=(8, 9))}
    assert not ada["fp8 hybrid / blockwise"]["available"] and "Hopper-only" in ada["fp8 hybrid / blockwise"]["fix"]
    assert requested_fused(SimpleNamespace(transformer_impl="local"), False, False, None) == []
