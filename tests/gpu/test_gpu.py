"""GPU checks (``pytest -m gpu``): BF16/FP8 training steps, no host syncs on the AC path, NCCL
all-to-all dispatch. Skipped, with the reason printed by ``-ra``, where no CUDA GPU is present."""


import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU on this machine: GPU tests need one (run `pytest -m gpu` on a GPU node)",
                allow_module_level=True)

from acmoe_megatron.core.settings import ACSettings  # noqa: E402
from acmoe_megatron.model.chunk_state import reset_states, state_of  # noqa: E402
from acmoe_megatron.model.precision import have_transformer_engine  # noqa: E402
from acmoe_megatron.testing import build_gpt, tiny_config  # noqa: E402

VOCAB, SEQ, MBS = 256, 128, 4


@pytest.fixture(scope="module")
def nccl_ws1():
    from acmoe_megatron.testing import init_single_process

    init_single_process("nccl")
    yield


def _gpu_config(**kw):
    base = dict(
        num_layers=4, hidden_size=128, num_attention_heads=4, ffn_hidden_size=256,
        num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=256,
        moe_router_dtype="fp32", use_cpu_initialization=False, bf16=True,
        params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16,
    )
    base.update(kw)
    return tiny_config(**base)


def _train(config, steps=30, seed=0, use_te=False):
    from megatron.core.transformer.module import Float16Module

    torch.manual_seed(seed)
    inner = build_gpt(config, ACSettings(first_ac_layer=2), vocab_size=VOCAB,
                      max_sequence_length=SEQ, use_te=use_te).cuda()
    model = Float16Module(config, inner)  # what megatron's trainer does for bf16: params in bf16
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(11)
    # a learnable stream: repeated random phrases
    phrases = torch.randint(0, VOCAB, (16, 16), generator=g)
    losses = []
    for step in range(steps):
        idx = torch.randint(0, 16, (MBS, (SEQ + 1) // 16 + 1), generator=g)
        data = phrases[idx].reshape(MBS, -1)[:, : SEQ + 1].cuda()
        pos = torch.arange(SEQ, device="cuda").unsqueeze(0).expand(MBS, -1)
        reset_states(inner)
        loss = model(data[:, :-1], pos, None, labels=data[:, 1:]).float().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return inner, losses


def test_bf16_training_steps_learn(nccl_ws1):
    model, losses = _train(_gpu_config())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0, losses
    routers = [m for m in model.modules() if type(m).__name__ == "ACRouter"]
    x = torch.randn(64, 1, 128, device="cuda", dtype=torch.bfloat16)
    state_of(model).put_routing(1, torch.ones(64, 8, device="cuda") / 8, torch.eye(8, device="cuda", dtype=torch.bool)[torch.arange(64) % 8])
    assert routers and routers[0].gating(x).dtype == torch.float32  # AC scores stay fp32 under bf16


@pytest.mark.skipif(not have_transformer_engine(), reason="Transformer Engine is not installed: FP8 needs it")
def test_fp8_loss_close_to_bf16(nccl_ws1):
    cap = torch.cuda.get_device_capability()
    if cap < (8, 9):
        pytest.skip(f"FP8 needs compute capability >= 8.9, this GPU has {cap}")
    _, bf16 = _train(_gpu_config(), use_te=True)
    _, fp8 = _train(_gpu_config(fp8="hybrid", fp8_recipe="delayed", moe_grouped_gemm=True), use_te=True)
    assert abs(sum(fp8[-5:]) - sum(bf16[-5:])) / 5 < 0.15 * (sum(bf16[-5:]) / 5), (bf16[-5:], fp8[-5:])


def _ac_router(config, compile_=False):
    from megatron.core.process_groups_config import ProcessGroupCollection

    from acmoe_megatron.model.chunk_state import ChunkState
    from acmoe_megatron.model.routers import ACRouter

    state = ChunkState([1, 2], [1, 2])
    torch.manual_seed(0)
    router = ACRouter(config=config, pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
                      settings=ACSettings(compile=compile_)).cuda()
    router.bind_chunk_state(state)
    router.set_layer_number(2)
    return router, state


def _needs_triton(compile_):
    if compile_:
        pytest.importorskip("triton", reason="acmoe.compile on a GPU needs Triton (ships with torch's CUDA wheels)")


@pytest.mark.parametrize("compile_", [False, True], ids=["eager", "compiled"])
def test_ac_path_makes_no_host_sync(nccl_ws1, compile_):
    _needs_triton(compile_)
    router, state = _ac_router(_gpu_config(), compile_)
    x = torch.randn(256, 2, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    probs = torch.rand(512, 8, device="cuda")
    rmap = torch.zeros(512, 8, device="cuda", dtype=torch.bool).scatter(1, probs.topk(2, -1).indices, True)
    state.put_routing(1, probs * rmap, rmap)
    router.gating(x).float().sum().backward()  # warm-up: compilation may sync, a training step does not
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        state.put_routing(1, probs * rmap, rmap)
        logits = router.gating(x)
        logits.float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert logits.shape == (256, 2, 8) and torch.isfinite(logits).all()


def test_compiled_ac_router_matches_eager(nccl_ws1):
    _needs_triton(True)
    x0 = torch.randn(512, 2, 128, device="cuda", dtype=torch.bfloat16)
    probs = torch.rand(1024, 8, device="cuda")
    rmap = torch.zeros(1024, 8, device="cuda", dtype=torch.bool).scatter(1, probs.topk(2, -1).indices, True)
    out = []
    for compile_ in (False, True):
        router, state = _ac_router(_gpu_config(), compile_)
        x = x0.clone().requires_grad_(True)
        state.put_routing(1, probs * rmap, rmap)
        logits = router.gating(x)
        logits.float().square().sum().backward()
        out.append((logits.detach().float(), x.grad.float(), router.weight.grad.float()))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_nccl_alltoall_dispatcher_ep1(nccl_ws1):
    config = _gpu_config(moe_token_dispatcher_type="alltoall")
    model, losses = _train(config, steps=3)
    assert all(torch.isfinite(torch.tensor(losses)))
    import torch.distributed as dist

    assert dist.get_backend() == "nccl"


@pytest.mark.parametrize("distributed", [False, True], ids=["bf16-main-params", "bf16-distributed"])
def test_expert_norm_holds_on_cuda_optimizers_without_host_sync(nccl_ws1, distributed):
    """acmoe.expert_norm with megatron's real CUDA optimizers (bf16 + fp32 main params, and the
    distributed optimizer): the fp32 main parameters stay at row norm 1.5 after each step, and the
    rescale hook itself makes no host sync."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    from acmoe_megatron.model import expert_norm
    config = _gpu_config()
    torch.manual_seed(0)
    inner = build_gpt(config, ACSettings(first_ac_layer=2, expert_norm=1.5), vocab_size=VOCAB,
                      max_sequence_length=SEQ).cuda()
    model = DistributedDataParallel(config, DistributedDataParallelConfig(
        use_distributed_optimizer=distributed, grad_reduce_in_fp32=True), Float16Module(config, inner))
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, bf16=True, clip_grad=0.0,
                                                 use_distributed_optimizer=distributed), [model])
    assert expert_norm.install(opt, [model]) == 3  # AC layers 2-4
    routers = [m for m in inner.modules() if isinstance(m, expert_norm.ExpertEmbeddingOwner)]
    data = torch.randint(0, VOCAB, (MBS, SEQ + 1), device="cuda")
    pos = torch.arange(SEQ, device="cuda").unsqueeze(0).expand(MBS, -1)
    for step in range(3):
        model.zero_grad_buffer()
        opt.zero_grad()
        reset_states(inner)
        model(data[:, :-1], pos, None, labels=data[:, 1:]).float().mean().backward()
        model.finish_grad_sync()
        if step == 2:  # the hook alone, on the last step
            hooks = [leaf.optimizer for leaf in opt.chained_optimizers]
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                for inner_opt in hooks:
                    for hook in inner_opt._optimizer_step_post_hooks.values():
                        hook(inner_opt, (), {})
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert opt.step()[0]
    for r in routers:
        main = r.weight.main_param.view(r.weight.shape)
        assert main.dtype == torch.float32
        assert torch.allclose(main.norm(dim=1), torch.full((8,), 1.5, device="cuda"), atol=2e-6)
        assert torch.equal(r.weight.detach(), main.to(torch.bfloat16))
