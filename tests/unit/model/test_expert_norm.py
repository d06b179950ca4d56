"""``acmoe.expert_norm``: the release's orthogonal init and rows held at norm 1.5 (expert_norm.py).

* the row maths on shards that split rows (as the distributed optimizer's shards do);
* the init of every router with expert embeddings;
* the norm holds on the tensors megatron's optimizer really updates — fp32 (``FP32Optimizer``),
  bf16 with fp32 main parameters (``Float16OptimizerWithFloat16Params``) and the distributed
  optimizer's main-parameter shards, fp32 and bf16 — and drifts without the hook;
* the learning dynamics: 10 Adam steps of our megatron router (megatron's optimizer + the hook)
  against ``reference_acmoe.ReleaseGate``, the release's gate and update written out literally.
EP=2 and resume are checked on the shared launch of tests/integration/test_train_integration.py, DP=2
with a shard boundary inside a row in tests/integration/test_expert_norm_dp2.py.

megatron's mixed-precision and distributed optimizers accept only tensors whose ``type()`` names
CUDA; ``testing.cuda_type_names`` makes CPU tensors answer with those names while the optimizer is built
and stepped (nothing else differs on CPU), so these paths run in the CPU suite.
"""

from __future__ import annotations

import pytest
import torch
from reference_acmoe import ReleaseGate

from acmoe_megatron.core.settings import ACSettings
from acmoe_megatron.model import expert_norm
from acmoe_megatron.testing import build_gpt, cuda_type_names, init_single_process, tiny_config


@pytest.fixture(scope="module", autouse=True)
def _dist():
    init_single_process()


def _megatron_optimizer(module, config, *, bf16: bool, distributed: bool, lr: float, clip: float = 0.0):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    ddp = DistributedDataParallel(
        config, DistributedDataParallelConfig(use_distributed_optimizer=distributed, grad_reduce_in_fp32=True), module)
    with cuda_type_names():
        opt = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=lr, min_lr=lr, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
                            adam_eps=1e-8, bf16=bf16, use_distributed_optimizer=distributed, clip_grad=clip),
            [ddp])
    return ddp, opt


def _step(ddp, opt, loss_fn):
    ddp.zero_grad_buffer()
    opt.zero_grad()
    loss = loss_fn()
    loss.backward()
    ddp.finish_grad_sync()
    with cuda_type_names():
        ok, _, _ = opt.step()
    assert ok
    return loss.detach()


def _owned(model):
    return [m for m in model.modules() if isinstance(m, expert_norm.ExpertEmbeddingOwner) and m.expert_norm]


# -- the maths ----------------------------------------------------------------------------------


def test_rows_split_across_shards_get_the_whole_rows_norm():
    torch.manual_seed(0)
    w = torch.randn(6, 10, dtype=torch.float64)
    whole = expert_norm.rescale_rows_(w.clone(), 1.5)
    assert torch.allclose(whole.norm(dim=1), torch.full((6,), 1.5, dtype=torch.float64))
    flat = w.clone().view(-1)
    cuts = [0, 7, 23, 24, 41, 60]  # shards end mid-row, on a row boundary, and hold a single element
    shards = [(flat[a:b], a) for a, b in zip(cuts, cuts[1:])]
    total = sum(expert_norm.row_sum_squares(s, a, 10, 6) for s, a in shards)  # what the all-reduce sums
    for s, a in shards:
        expert_norm.scale_rows_(s, a, 10, total, 1.5)
    assert torch.allclose(flat.view(6, 10), whole.float().double(), rtol=1e-6)


def test_fixed_norm_init_is_orthogonal_rows_at_the_norm():
    config = tiny_config(num_moe_experts=8, hidden_size=64)
    for router in ("ac", "cosine", "stablemoe-lite", "xmoe"):
        model = build_gpt(config, ACSettings(router=router, first_ac_layer=1, expert_norm=1.5))
        owners = _owned(model)
        assert len(owners) == 4, router  # every MoE layer (first_ac_layer=1)
        for r in owners:
            w = r.weight.detach().double()
            assert torch.allclose(w.norm(dim=1), torch.full((w.shape[0],), 1.5, dtype=torch.float64), atol=1e-6)
            if w.shape[0] <= w.shape[1]:  # orthogonal rows (XMoE's 8 x 4 space cannot hold 8 of them)
                gram = w @ w.t()
                assert torch.allclose(gram, torch.eye(w.shape[0], dtype=torch.float64) * 2.25, atol=1e-5), router
    free = build_gpt(config, ACSettings(router="ac", first_ac_layer=1))
    assert not _owned(free)  # null: megatron's N(0, init_method_std), nothing held
    norms = [m.weight.detach().norm(dim=1) for m in free.modules() if isinstance(m, expert_norm.ExpertEmbeddingOwner)]
    assert norms and all((n < 0.5).all() for n in norms)


# -- the norm holds on the optimizer's tensors ----------------------------------------------------


@pytest.mark.parametrize("bf16, distributed", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["fp32", "bf16-main-params", "fp32-distributed", "bf16-distributed"])
def test_norm_holds_on_the_tensors_the_optimizer_updates(bf16, distributed):
    dtype = torch.bfloat16 if bf16 else torch.float32
    config = tiny_config(params_dtype=dtype, bf16=bf16, pipeline_dtype=dtype, num_moe_experts=8)
    tokens = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    position_ids = torch.arange(32).expand(2, 32)

    def train(hold: bool):
        torch.manual_seed(1)
        model = build_gpt(config, ACSettings(router="ac", first_ac_layer=3, expert_norm=1.5)).to(dtype)
        ddp, opt = _megatron_optimizer(model, config, bf16=bf16, distributed=distributed, lr=1e-2)
        if hold:
            assert expert_norm.install(opt, [ddp]) == 2  # the AC layers 3 and 4
        for _ in range(3):
            _step(ddp, opt, lambda: ddp(tokens, position_ids, None, labels=tokens).float().mean())
        return _owned(model)

    for router in train(hold=True):
        w = router.weight
        main = w.main_param if bf16 else w  # fp32 main copy (or, distributed, this rank's shard = all at DP 1)
        assert main.dtype == torch.float32
        assert torch.allclose(main.detach().view(w.shape).norm(dim=1), torch.full((8,), 1.5), atol=2e-6)
        assert torch.equal(w.detach(), main.detach().view(w.shape).to(dtype))  # megatron copied it over
    drift = [(r.weight.detach().float().norm(dim=1) - 1.5).abs().max() for r in train(hold=False)]
    assert min(drift) > 1e-3, drift  # without the hook Adam moves the rows off the sphere


def test_an_embedding_no_optimizer_steps_is_an_error():
    config = tiny_config(num_moe_experts=4)
    model = build_gpt(config, ACSettings(router="cosine", first_ac_layer=3, expert_norm=1.5))
    for r in _owned(model):
        r.weight.requires_grad_(False)
    ddp, opt = _megatron_optimizer(model, config, bf16=False, distributed=False, lr=1e-3)
    with pytest.raises(ValueError, match="not stepped by the optimizer"):
        expert_norm.install(opt, [ddp])
    assert expert_norm.install(None, [ddp]) == 0  # megatron's skip_train (evaluation-only) launch: no optimizer


# -- learning dynamics against the release -------------------------------------------------------


class _OneGate(torch.nn.Module):
    """A token projection and our AC router (layer 2, labels from layer 1) — what megatron trains."""

    def __init__(self, config, state, settings):
        from megatron.core.process_groups_config import ProcessGroupCollection

        from acmoe_megatron.model.routers import ACRouter

        super().__init__()
        self.config = config
        self.proj = torch.nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.router = ACRouter(config=config, pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
                               settings=settings)
        self.router.bind_chunk_state(state)
        self.router.set_layer_number(2)

    def forward(self, x_TD):
        return self.router(self.proj(x_TD).unsqueeze(1))  # [s, b=1, h]


@pytest.mark.parametrize("hold", [True, False], ids=["release", "hook-removed"])
def test_ten_adam_steps_follow_the_release(hold):
    """Our router trained by megatron's optimizer with the hook against the release's gate and update
    (``ReleaseGate``, plain torch.optim.Adam), from the same weights: embeddings, logits and losses
    agree to 1e-5 relative after every step. Without the hook they part (the test sees it)."""
    import torch.nn.functional as F

    from acmoe_megatron.model.chunk_state import ChunkState

    T, D, E, lr = 192, 32, 16, 2e-2
    config = tiny_config(num_moe_experts=E, moe_router_topk=2, hidden_size=D, num_attention_heads=4,
                         moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0)
    gen = torch.Generator().manual_seed(0)
    x_TD = torch.randn(T, D, generator=gen)
    prev_T = torch.randint(0, E, (T,), generator=gen)
    target_TE = torch.randn(T, E, generator=gen)
    state = ChunkState([1, 2], [1, 2])

    torch.manual_seed(7)
    ours = _OneGate(config, state, ACSettings(router="ac", expert_norm=1.5))
    emb_ED = ours.router.weight.detach().clone().double()
    # the release's starting point: orthogonal_(gain 0.32) rows, rescaled to 1.5 by its first forward
    assert torch.allclose(emb_ED @ emb_ED.t(), 2.25 * torch.eye(E, dtype=torch.float64), atol=1e-5)
    ref = ReleaseGate(emb_ED.float(), ours.proj.weight.detach().clone())
    ref_opt = torch.optim.Adam(ref.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)
    ddp, opt = _megatron_optimizer(ours, config, bf16=False, distributed=False, lr=lr)
    if hold:
        assert expert_norm.install(opt, [ddp]) == 1

    seen = {}
    gating = ours.router.gating

    def recording_gating(inp):
        seen["logits"] = out = gating(inp)
        return out

    ours.router.gating = recording_gating

    def our_loss():
        one_hot = F.one_hot(prev_T, E).float()
        state.put_routing(1, one_hot, one_hot.bool())  # the previous MoE layer's top-1 (what the release passes on)
        probs_TE, _ = ddp(x_TD)
        return (probs_TE * target_TE).sum() / T

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()

    worst = 0.0
    for step in range(10):
        loss = _step(ddp, opt, our_loss)
        ref_opt.zero_grad()
        probs_ref_TE, logits_ref_TE = ref(x_TD, prev_T)
        ref_loss = (probs_ref_TE * target_TE).sum() / T
        ref_loss.backward()
        ref_opt.step()
        errs = {"logits": rel(seen["logits"].detach().reshape(T, E), logits_ref_TE.detach()),
                "loss": rel(loss, ref_loss.detach()),
                "embeddings": rel(ours.router.weight.detach(), ref.embeddings_for_next_forward()),
                "projection": rel(ours.proj.weight.detach(), ref.proj.weight.detach())}
        worst = max(worst, *errs.values())
        if hold:
            assert max(errs.values()) <= 1e-5, (step, errs)
    if not hold:
        assert worst > 1e-3, worst
