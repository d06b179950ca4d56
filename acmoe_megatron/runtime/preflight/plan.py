"""What the launching process derives for a preflight: the full recipe's plan and memory estimate,
and the shrunk recipe its workers train.

The shrunk recipe keeps everything that decides whether the real job can start — the parallel
layout (TP, PP, VPP, EP, ETP, CP, DP, sequence parallel), the experts, router and top-k, precision
(bf16 / FP8 and its recipe), the transformer implementation and fused paths, the token dispatcher,
the distributed optimizer and its overlaps, the data and its sequence length, the checkpoint
format — and makes the rest small: one layer per virtual pipeline stage (at least two, so the first
AC layer routes from labels of another layer, across a stage boundary when PP > 1; a HybridModel
keeps its layer pattern, which is its layout), every layer MoE, hidden 64 per tensor-parallel rank, FFN sizes twice that, one micro-batch per rank and
2 x PP micro-batches per step, no evaluation, ``steps`` iterations, a checkpoint at the last one
and TensorBoard every step. Checkpoints and TensorBoard go to a fresh directory beside the real
ones (``<run.dir>/preflight/<stamp>``, or beside ``megatron.save`` / ``tensorboard_dir`` when the
recipe puts them elsewhere), so they cross the same file systems; the worker removes it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from acmoe_megatron.core.registry import entry
from acmoe_megatron.runtime.recipe import Recipe

PLAN_FILE = "plan.json"
SHRUNK_FILE = "shrunk.yaml"

# keys of the full recipe that describe its size, length or schedule, not its layout
_DROPPED = (
    "num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage", "pipeline_model_parallel_layout",
    "decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers",
    "account_for_embedding_in_pipeline_split", "account_for_loss_in_pipeline_split",
    "num_layers_per_virtual_pipeline_stage", "kv_channels", "moe_layer_freq",
    "train_samples", "lr_decay_samples", "lr_warmup_samples", "lr_warmup_fraction", "lr_wsd_decay_samples",
    "lr_wsd_decay_iters", "rampup_batch_size", "lr_decay_iters",
    "load", "ckpt_step", "pretrained_checkpoint", "finetune", "use_checkpoint_args",
    "exit_interval", "exit_duration_in_mins", "exit_signal_handler", "exit_signal",
    "wandb_project", "wandb_exp_name", "wandb_save_dir", "wandb_entity",
    "save_retain_interval", "log_memory_interval", "profile", "profile_step_start", "profile_step_end",
)


@dataclasses.dataclass
class PreflightPlan:
    """The launcher's side of a preflight, written to ``<out>/plan.json`` for the workers."""

    config: str  # the full recipe (path, for the report)
    recipe_hash: str
    world_size: int
    layout: dict  # run_plan.parallel_layout of the full recipe at world_size
    shrunk: str  # the shrunk recipe the workers train (<out>/shrunk.yaml)
    steps: int
    out: str  # rank_<r>.json, preflight.json
    scratch: list[str]  # directories the worker creates and removes (checkpoints, TensorBoard)
    checkpoint_dir: str
    tensorboard_dir: str
    memory: dict | None  # memory.estimate_memory of the full recipe, or None with memory_error
    memory_error: str | None
    expert_shape: dict  # hidden, moe_ffn_hidden, experts, tokens of one micro-batch (the FP8 GEMM)
    fp8: str | None
    fp8_recipe: str | None
    keep: bool = False  # leave the scratch directories (debugging)
    stated_gpu_memory: int | None = None  # bytes (--gpu-memory-gib): the target when no GPU is visible

    def write(self, out: Path) -> Path:
        path = out / PLAN_FILE
        path.write_text(json.dumps(dataclasses.asdict(self), indent=1))
        return path

    @classmethod
    def read(cls, path: Path) -> PreflightPlan:
        return cls(**json.loads(Path(path).read_text()))


def shrink(recipe: Recipe, layout: dict, steps: int, stamp: str) -> tuple[Recipe, dict]:
    """(the shrunk recipe, {"checkpoint_dir", "tensorboard_dir", "scratch"}) for ``recipe`` at
    ``layout`` (run_plan.parallel_layout). Pure: nothing is created."""
    mg = {k: v for k, v in recipe.megatron.items() if k not in _DROPPED}
    tp, pp = layout["tp"], layout["pp"]
    vpp = recipe.megatron.get("num_virtual_stages_per_pipeline_rank")
    per_vstage = recipe.megatron.get("num_layers_per_virtual_pipeline_stage")
    if vpp is None and per_vstage:
        vpp = int(recipe.megatron["num_layers"]) // (pp * int(per_vstage))
    vpp = int(vpp or 1)
    stages = pp * vpp
    layers = stages * max(1, -(-2 // stages))  # one per virtual stage, at least 2
    heads = 4 * tp
    hidden = 64 * tp
    mg.update(num_layers=layers, hidden_size=hidden, num_attention_heads=heads, ffn_hidden_size=2 * hidden,
              micro_batch_size=1, global_batch_size=layout["dp"] * 2 * pp, train_iters=steps,
              lr_warmup_iters=0, lr_decay_style="constant", eval_iters=0, eval_interval=steps, save_interval=steps, log_interval=1,
              log_timers_to_tensorboard=True, log_throughput=True)
    if mg.get("hybrid_layer_pattern"):  # a HybridModel: its pattern is its layout (| stages); megatron counts it
        mg.pop("num_layers")
    if mg.get("num_experts"):
        mg["moe_ffn_hidden_size"] = 2 * hidden
    if mg.get("moe_shared_expert_intermediate_size"):
        mg["moe_shared_expert_intermediate_size"] = 2 * hidden
    if mg.get("group_query_attention"):
        mg["num_query_groups"] = 2 * tp
    mg.pop("num_virtual_stages_per_pipeline_rank", None)
    if vpp > 1:
        mg["num_layers_per_virtual_pipeline_stage"] = layers // stages
    run_dir = Path(recipe.run.dir)
    scratch = run_dir / "preflight" / stamp
    ckpt = Path(recipe.megatron["save"]) / "preflight" / stamp if recipe.megatron.get("save") else scratch / "checkpoints"
    tb = (Path(recipe.megatron["tensorboard_dir"]) / "preflight" / stamp if recipe.megatron.get("tensorboard_dir")
          else scratch / "tensorboard")
    mg.update(save=str(ckpt.absolute()), tensorboard_dir=str(tb.absolute()))
    acmoe = recipe.acmoe
    if entry(acmoe.router).from_first_ac_layer and not recipe.megatron.get("hybrid_layer_pattern"):
        acmoe = dataclasses.replace(acmoe, first_ac_layer=2)  # layer 2 routes from layer 1's labels (stage 0)
    shrunk = dataclasses.replace(recipe, megatron=mg, acmoe=acmoe,
                                 run=dataclasses.replace(recipe.run, dir=str(scratch.absolute()), image_interval=0))
    dirs = {"checkpoint_dir": str(ckpt.absolute()), "tensorboard_dir": str(tb.absolute()),
            "scratch": sorted({str(scratch.absolute()), str(ckpt.absolute()), str(tb.absolute())})}
    return shrunk, dirs


def expert_shape(recipe: Recipe) -> dict:
    """The full recipe's expert GEMM (the FP8 check's shape): tokens of one micro-batch x hidden ->
    moe_ffn_hidden (x2 with a gated MLP)."""
    mg = recipe.megatron
    hidden = int(mg.get("hidden_size") or 0)
    ffn = int(mg.get("moe_ffn_hidden_size") or mg.get("ffn_hidden_size") or 4 * hidden)
    etp = int(mg.get("expert_tensor_parallel_size") or mg.get("tensor_model_parallel_size") or 1)
    tokens = int(mg.get("micro_batch_size") or 1) * int(mg.get("seq_length") or 0) * int(mg.get("moe_router_topk") or 1)
    experts = int(mg.get("num_experts") or 1)
    return {"hidden": hidden, "ffn": ffn * (2 if mg.get("swiglu") else 1) // etp, "experts": experts,
            "tokens_per_expert": max(16, -(-tokens // experts // 16) * 16)}
