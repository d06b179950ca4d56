"""Fixed-norm expert embeddings: the release's ``e_j ← 1.5 · e_j / ||e_j||`` before every forward.

The ACMoE release (and XMoE's code it copies) initialises the router's expert embeddings
``orthogonal_(gain=0.32)`` and, under ``no_grad`` before every forward, rescales each row to norm
1.5 (spec §4.10). The cosine score does not see the norm, but Adam does: its step is about ``lr``
per element whatever the gradient's scale, so the row norm sets the router's angular step size
(``lr / ||e_j||``). A free norm starting at megatron's N(0, 0.02) (||e_j|| ≈ 0.2 at d = 128) turns
the router several times faster and then drifts; ``acmoe.expert_norm`` pins it.

Where the rescale happens, and why there (docs/design.md, "Expert-embedding norm"):
rescaling the model weight at forward time does not stick under mixed precision — megatron's
optimizer keeps fp32 *main* parameters and copies them over the bf16 model weights after every
step, and the distributed optimizer keeps only a shard of each main parameter per data-parallel
rank and all-gathers the model weights from those shards (possibly overlapped with the next
forward). So the rescale runs as a ``register_step_post_hook`` of the inner torch optimizer: right
after Adam updated the tensors it owns (the model parameters for megatron's ``FP32Optimizer``, the
fp32 main parameters for ``Float16OptimizerWithFloat16Params``, the main-parameter *shards* for
``DistributedOptimizer``) and before megatron copies them to the model weights. Rescaling after
the step is the release's "before every forward" (the parameters change only at a step), and the
construction-time rescale covers the first forward. A shard may hold a row only in part: the
squared row norms are summed over the shard's rows, all-reduced once per optimizer over its
data-parallel group (one small collective for all routers, no host sync), then applied.
A checkpoint stores the rescaled parameters, so a resume continues on the sphere.

Pure maths (``row_sum_squares``, ``scale_rows_``, ``rescale_rows_``) below; ``install`` is the thin
adapter to megatron's optimizers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

ORTHOGONAL_GAIN = 0.32  # the release's init of the expert embeddings (before the first rescale)


class ExpertEmbeddingOwner:
    """Marks a router whose expert embeddings ``weight`` [E, d] keep row norm ``expert_norm`` (None = free)."""

    expert_norm: float | None = None


# -- the maths ---------------------------------------------------------------------------------


def row_sum_squares(flat: torch.Tensor, start: int, row_len: int, rows: int) -> torch.Tensor:
    """Σ of squares per row of the [rows, row_len] matrix whose flat elements ``start ...`` are ``flat``."""
    idx = torch.arange(start, start + flat.numel(), device=flat.device) // row_len
    return torch.zeros(rows, dtype=torch.float32, device=flat.device).index_add_(0, idx, flat.float().square())


@torch.no_grad()
def scale_rows_(flat: torch.Tensor, start: int, row_len: int, sumsq_R: torch.Tensor, target: float) -> None:
    """In place: the elements of ``flat`` (flat offset ``start``) times ``target / ||row||``."""
    idx = torch.arange(start, start + flat.numel(), device=flat.device) // row_len
    factor_R = target / sumsq_R.sqrt()
    flat.copy_((flat.float() * factor_R[idx]).to(flat.dtype))


@torch.no_grad()
def rescale_rows_(w_RC: torch.Tensor, target: float) -> torch.Tensor:
    """The release's ``w.mul_(target / w.norm(p=2, dim=1, keepdim=True))`` (norms in fp32)."""
    flat = w_RC.view(-1)
    scale_rows_(flat, 0, w_RC.shape[1], row_sum_squares(flat, 0, w_RC.shape[1], w_RC.shape[0]), target)
    return w_RC


def orthogonal_rows(rows: int, cols: int, norm: float) -> torch.Tensor:
    """``orthogonal_(gain=0.32)`` then every row rescaled to ``norm``: the release's starting point."""
    w = torch.empty(rows, cols, dtype=torch.float32)
    torch.nn.init.orthogonal_(w, gain=ORTHOGONAL_GAIN)
    return rescale_rows_(w, norm)


# -- megatron adapter --------------------------------------------------------------------------


@dataclass
class _Target:
    """One optimizer-owned tensor holding (part of) expert-embedding matrix number ``owner``."""

    owner: int  # index into the model's list of embeddings (the same on every data-parallel rank)
    flat: torch.Tensor  # what the inner optimizer updates (main param, its shard, or the param)
    start: int  # flat offset of ``flat`` inside the [rows, row_len] matrix


def owners(model_chunks) -> list[tuple[torch.nn.Parameter, float]]:
    """(embedding, norm) of every router with a fixed norm, in model order."""
    seen, out = set(), []
    for chunk in model_chunks:
        for module in chunk.modules():
            if isinstance(module, ExpertEmbeddingOwner) and module.expert_norm is not None:
                p = module.weight
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append((p, float(module.expert_norm)))
    return out


def _leaf_optimizers(optimizer) -> list:
    from megatron.core.optimizer.optimizer import ChainedOptimizer

    if isinstance(optimizer, ChainedOptimizer):
        return [leaf for opt in optimizer.chained_optimizers for leaf in _leaf_optimizers(opt)]
    return [optimizer]


def _plan(optimizer, index: dict[int, int]) -> tuple[list[int], list[_Target], object]:
    """For one leaf megatron optimizer: the embeddings it steps (owner indices, the same list on
    every rank of its group), the tensors of them it updates on this rank, and the process group
    whose ranks hold parts of the same rows (None: every row is whole here)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params, FP32Optimizer

    if isinstance(optimizer, DistributedOptimizer):
        if optimizer.config.use_precision_aware_optimizer:
            raise ValueError("acmoe.expert_norm cannot reach the main parameters that the precision-aware "
                             "optimizer keeps inside Transformer Engine's FusedAdam: set "
                             "megatron.use_precision_aware_optimizer: false or acmoe.expert_norm: null")
        in_buffers = {id(p) for buffer in optimizer.buffers for p in buffer.params}
        stepped = sorted(index[i] for i in in_buffers if i in index)
        targets = []
        for p in optimizer.model_param_gbuf_map:  # only the parameters with a shard on this rank
            if id(p) in index:
                param_range = optimizer._get_model_param_range_map(p)["param"]
                group_index, group_order = optimizer.model_param_group_index_map[p]
                shard = optimizer.optimizer.param_groups[group_index]["params"][group_order]
                targets.append(_Target(index[id(p)], shard.data.view(-1), param_range.start))
        group = optimizer.data_parallel_group
        return stepped, targets, (group if group is not None and dist.get_world_size(group) > 1 else None)
    if isinstance(optimizer, Float16OptimizerWithFloat16Params):
        pairs = [(m, s) for mg, sg in zip(optimizer.float16_groups, optimizer.fp32_from_float16_groups)
                 for m, s in zip(mg, sg)]
        pairs += [(p, p) for group in optimizer.fp32_from_fp32_groups for p in group]
    elif isinstance(optimizer, FP32Optimizer):
        pairs = [(p, p) for group in optimizer.optimizer.param_groups for p in group["params"]]
    else:
        raise ValueError(f"acmoe.expert_norm does not know megatron's {type(optimizer).__name__}: use "
                         "megatron's Adam/SGD optimizers (distributed or not), or acmoe.expert_norm: null")
    targets = [_Target(index[id(m)], s.data.view(-1), 0) for m, s in pairs if id(m) in index]
    return sorted(t.owner for t in targets), targets, None


def _make_hook(shapes: list[tuple[int, int, float]], stepped: list[int], targets: list[_Target], group):
    rows = [shapes[i][0] for i in stepped]
    offset = dict(zip(stepped, [sum(rows[:k]) for k in range(len(rows))]))

    @torch.no_grad()
    def rescale(_optimizer, _args, _kwargs):
        device = targets[0].flat.device if targets else torch.device(
            "cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        packed = torch.zeros(sum(rows), dtype=torch.float32, device=device)
        for t in targets:
            r, c, _ = shapes[t.owner]
            packed[offset[t.owner]:offset[t.owner] + r] += row_sum_squares(t.flat, t.start, c, r)
        if group is not None:  # rows split across the data-parallel shards: one collective
            dist.all_reduce(packed, group=group)
        for t in targets:
            r, c, norm = shapes[t.owner]
            scale_rows_(t.flat, t.start, c, packed[offset[t.owner]:offset[t.owner] + r], norm)

    return rescale


def install(optimizer, model_chunks) -> int:
    """Keep every ``ExpertEmbeddingOwner``'s embedding rows at their norm after each optimizer step
    (see the module docstring). Returns the number of embeddings held (0: nothing to do). Raises
    ValueError when an embedding is stepped by no optimizer, or by one whose tensors this cannot
    reach."""
    found = owners(model_chunks)
    if not found or optimizer is None:  # None: megatron built no optimizer (an evaluation-only launch)
        return 0
    index = {id(p): i for i, (p, _) in enumerate(found)}
    shapes = [(p.shape[0], p.shape[1], norm) for p, norm in found]
    covered: set[int] = set()
    for leaf in _leaf_optimizers(optimizer):
        if getattr(leaf, "is_stub_optimizer", False):  # megatron's: no parameters on this rank
            continue
        stepped, targets, group = _plan(leaf, index)
        covered.update(stepped)
        if stepped:
            leaf.optimizer.register_step_post_hook(_make_hook(shapes, stepped, targets, group))
    missing = [tuple(found[i][0].shape) for i in range(len(found)) if i not in covered]
    if missing:
        raise ValueError(f"acmoe.expert_norm: expert embeddings {missing} are not stepped by the optimizer "
                         "(frozen, or in no parameter group of megatron's optimizer)")
    return len(found)
