"""Distributed-optimizer worker (torchrun --nproc_per_node 2, gloo, DP=2): megatron's
``DistributedOptimizer`` shards every bucket across the two ranks, and with one parameter per
bucket (``bucket_size=1``) and an expert embedding of 5 × 56 the shard boundary falls inside a row.
Three Adam steps with ``expert_norm.install``; rank 0 writes, as JSON to ``--out``, each rank's
router shard ranges and the gathered model weights' row norms."""

import argparse
import json
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402

from acmoe_megatron.runtime import cpu_runtime  # noqa: E402

cpu_runtime.install()

import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state  # noqa: E402
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed  # noqa: E402

from acmoe_megatron.model import expert_norm  # noqa: E402
from acmoe_megatron.core.settings import ACSettings  # noqa: E402
from acmoe_megatron.testing import build_gpt, cuda_type_names, tiny_config  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--bf16", action="store_true")
    args = p.parse_args()
    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(1234)
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    config = tiny_config(num_moe_experts=5, moe_router_topk=2, hidden_size=56, num_attention_heads=4,
                         params_dtype=dtype, bf16=args.bf16, pipeline_dtype=dtype)
    model = build_gpt(config, ACSettings(router="ac", first_ac_layer=3, expert_norm=1.5)).to(dtype)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(
        use_distributed_optimizer=True, grad_reduce_in_fp32=True, overlap_grad_reduce=True, bucket_size=1), model)
    with cuda_type_names():
        opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.0, bf16=args.bf16,
                                                     use_distributed_optimizer=True, clip_grad=0.0), [ddp])
    assert expert_norm.install(opt, [ddp]) == 2
    owners = [m for m in model.modules() if isinstance(m, expert_norm.ExpertEmbeddingOwner) and m.expert_norm]
    leaf = opt.chained_optimizers[0]
    ranges = [[r.start, r.end] if p in leaf.model_param_gbuf_map else None
              for p in (m.weight for m in owners)
              for r in [leaf._get_model_param_range_map(p)["param"] if p in leaf.model_param_gbuf_map else None]]
    gen = torch.Generator().manual_seed(dist.get_rank())
    tokens = torch.randint(0, 128, (2, 32), generator=gen)
    position_ids = torch.arange(32).expand(2, 32)
    for _ in range(3):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        ddp(tokens, position_ids, None, labels=tokens).float().mean().backward()
        ddp.finish_grad_sync()
        with cuda_type_names():
            assert opt.step()[0]
    norms = [m.weight.detach().float().norm(dim=1).tolist() for m in owners]
    gathered = [None, None]
    dist.all_gather_object(gathered, {"ranges": ranges, "norms": norms, "numel": [m.weight.numel() for m in owners]})
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(gathered, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    with cpu_runtime.device_redirect():  # CPU only: megatron's device="cuda" requests -> CPU
        main()
