"""preflight/plan.py: the shrunk recipe keeps the layout and the precision, makes the model small."""

import pytest

from acmoe_megatron.runtime.preflight.plan import expert_shape, shrink
from acmoe_megatron.runtime.recipe import load_recipe
from acmoe_megatron.runtime.run_plan import build_plan, parallel_layout


def _shrunk(config, world, *overrides):
    recipe = load_recipe(config, list(overrides))
    layout = parallel_layout(recipe.megatron, world)
    return recipe, layout, *shrink(recipe, layout, 4, "stamp")


@pytest.mark.parametrize("pp,vpp,layers", [(1, None, 2), (2, None, 2), (4, None, 4), (2, 2, 4)])
def test_one_layer_per_virtual_stage_at_least_two(pp, vpp, layers):
    extra = [f"megatron.pipeline_model_parallel_size={pp}", "megatron.num_layers=8"]
    if vpp:
        extra.append(f"megatron.num_virtual_stages_per_pipeline_rank={vpp}")
    _, _, shrunk, _ = _shrunk("configs/tiny_cpu.yaml", 2 * pp, *extra)
    assert shrunk.megatron["num_layers"] == layers
    assert shrunk.megatron.get("num_layers_per_virtual_pipeline_stage") == (1 if vpp else None)
    assert "num_virtual_stages_per_pipeline_rank" not in shrunk.megatron
    assert shrunk.acmoe.first_ac_layer == 2  # layer 2 routes from layer 1's labels: across a stage when pp > 1


def test_layers_per_virtual_stage_keep_the_virtual_stages():
    _, _, shrunk, _ = _shrunk("configs/tiny_cpu.yaml", 4, "megatron.pipeline_model_parallel_size=2",
                              "megatron.num_layers=8", "megatron.num_layers_per_virtual_pipeline_stage=2")
    assert shrunk.megatron["num_layers_per_virtual_pipeline_stage"] == 1 and shrunk.megatron["num_layers"] == 4


def test_the_layout_and_precision_stay_the_sizes_shrink():
    recipe, layout, shrunk, dirs = _shrunk("configs/multinode_h100_fp8.yaml", 16)
    full, small = recipe.megatron, shrunk.megatron
    for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
                "expert_tensor_parallel_size", "sequence_parallel", "num_experts", "moe_router_topk", "fp8",
                "fp8_recipe", "bf16", "transformer_impl", "moe_grouped_gemm", "moe_token_dispatcher_type",
                "use_distributed_optimizer", "overlap_grad_reduce", "seq_length", "ckpt_format"):
        assert small[key] == full[key], key
    assert small["hidden_size"] == 128 and small["num_attention_heads"] == 8 and small["num_query_groups"] == 4
    assert small["moe_ffn_hidden_size"] == small["ffn_hidden_size"] == 256
    assert small["train_iters"] == 4 and small["save_interval"] == 4 and small["eval_iters"] == 0
    assert small["micro_batch_size"] == 1 and small["global_batch_size"] == layout["dp"] * 2 * layout["pp"]
    for gone in ("exit_duration_in_mins", "load", "lr_decay_iters"):
        assert gone not in small
    # checkpoints and TensorBoard on the run directory's file system, in a directory of their own
    assert dirs["checkpoint_dir"].endswith("runs/multinode_h100_fp8/preflight/stamp/checkpoints")
    assert small["save"] == dirs["checkpoint_dir"] and shrunk.run.dir in dirs["scratch"]
    assert recipe.megatron.get("save") is None  # the full recipe is not touched


def test_save_and_tensorboard_elsewhere_are_probed_there():
    _, _, _, dirs = _shrunk("configs/tiny_cpu.yaml", 2, "megatron.save=/ckpt/fs", "megatron.tensorboard_dir=/tb/fs")
    assert dirs["checkpoint_dir"] == "/ckpt/fs/preflight/stamp" and dirs["tensorboard_dir"] == "/tb/fs/preflight/stamp"
    assert {"/ckpt/fs/preflight/stamp", "/tb/fs/preflight/stamp"} <= set(dirs["scratch"])


def test_topk_router_keeps_its_settings():
    _, _, shrunk, _ = _shrunk("configs/tiny_cpu.yaml", 2, "acmoe.router=topk")
    assert shrunk.acmoe.router == "topk"


def test_shrunk_recipe_passes_megatrons_checks():
    _, layout, shrunk, _ = _shrunk("configs/tiny_cpu.yaml", 4, "megatron.pipeline_model_parallel_size=2")
    plan = build_plan(shrunk, 4, host_checks=False)
    sizes = ("tp", "pp", "cp", "ep", "etp", "dp", "expert_dp")
    assert {k: plan.layout[k] for k in sizes} == {k: layout[k] for k in sizes} and plan.args.num_layers == 2


def test_expert_shape_is_the_recipes():
    recipe = load_recipe("configs/multinode_h100_fp8.yaml")
    shape = expert_shape(recipe)
    assert shape["hidden"] == 4096 and shape["ffn"] == 2 * 14336  # swiglu: gate + up
    assert shape["tokens_per_expert"] % 16 == 0 and shape["experts"] == 8


def test_hybrid_pattern_is_kept():
    _, _, shrunk, _ = _shrunk("configs/tiny_cpu.yaml", 2, "megatron.hybrid_layer_pattern='*E*E|*E*E'",
                              "megatron.pipeline_model_parallel_size=2", "megatron.expert_model_parallel_size=1")
    assert shrunk.megatron["hybrid_layer_pattern"] == "*E*E|*E*E" and "num_layers" not in shrunk.megatron
    assert shrunk.acmoe.first_ac_layer == 3  # the recipe's: the pattern places the AC layers
