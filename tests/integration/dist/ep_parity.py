"""Expert-parallel parity worker: run under torchrun with 1 process (reference) or 2 (EP=2).

The reference (world size 1) builds a small ACMoE GPT, saves its weights, and runs two
micro-batches (forward + backward). The EP=2 run loads the same weights (each rank keeps its own
experts: global expert ``ep_rank * E_local + i`` is local expert ``i``), runs micro-batch ``r`` on
rank ``r`` (the layout Megatron's data-parallel sampler gives), sums the dense gradients over the
data-parallel group and compares losses and gradients with the reference.

    torchrun --nproc_per_node 1 tests/integration/dist/ep_parity.py --ep 1 --dir D --routers ac,usmoe
    torchrun --nproc_per_node 2 tests/integration/dist/ep_parity.py --ep 2 --dir D --routers ac,usmoe

Each router of ``--routers`` is built and checked in turn in the same processes (one launch for
all of them), with its files in ``D/<router>/``.
"""

import argparse
import json
import re
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch  # noqa: E402

from acmoe_megatron.runtime import cpu_runtime  # noqa: E402

cpu_runtime.install()

import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state  # noqa: E402
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed  # noqa: E402

from acmoe_megatron.model.chunk_state import reset_states  # noqa: E402
from acmoe_megatron.core.settings import ACSettings  # noqa: E402
from acmoe_megatron.testing import build_gpt, tiny_config  # noqa: E402

NUM_EXPERTS, SEQ, MBS, VOCAB = 4, 32, 2, 128
EXPERT_KEY = re.compile(r"(.*\.local_experts\.)(\d+)(\..*)")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ep", type=int, required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--routers", default="ac", help="comma-separated routers, each checked in turn")
    a = p.parse_args()
    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(expert_model_parallel_size=a.ep)
    failed = []
    for router in a.routers.split(","):
        out = Path(a.dir) / router
        out.mkdir(parents=True, exist_ok=True)
        if not check(router, a.ep, out):
            failed.append(router)
    if failed:
        sys.exit(f"EP={a.ep} differs from one process for {failed}")


def check(router: str, ep: int, out: Path) -> bool:
    """One router: the reference (world size 1) or the EP comparison; False when it differs."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(1234)
    extra = {"moe_expert_capacity_factor": 1.0} if router == "etr" else {}  # ETR's expert choice
    config = tiny_config(num_layers=4, num_moe_experts=NUM_EXPERTS, expert_model_parallel_size=ep, **extra)
    model = build_gpt(config, ACSettings(router=router, first_ac_layer=2), vocab_size=VOCAB,
                      max_sequence_length=SEQ)
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (2, MBS, SEQ + 1), generator=g)  # 2 micro-batches
    position_ids = torch.arange(SEQ).unsqueeze(0).expand(MBS, -1)

    if world == 1:
        torch.save(model.state_dict(), out / "weights.pt")
        micro_batches = [0, 1]
    else:
        n_local = NUM_EXPERTS // ep
        ep_rank = parallel_state.get_expert_model_parallel_rank()
        full = torch.load(out / "weights.pt")
        local = {}
        for key in model.state_dict():
            m = EXPERT_KEY.match(key)
            src = f"{m[1]}{ep_rank * n_local + int(m[2])}{m[3]}" if m else key
            local[key] = full[src]
        model.load_state_dict(local, strict=True)
        micro_batches = [parallel_state.get_data_parallel_rank()]

    losses = []
    for mb in micro_batches:
        reset_states(model)
        t = tokens[mb]
        loss = model(t[:, :-1], position_ids, None, labels=t[:, 1:]).float().mean()
        (loss / 2).backward()
        losses.append(loss.item())

    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad if param.grad is not None else torch.zeros_like(param)
        m = EXPERT_KEY.match(name)
        if m is None and world > 1:  # dense parameter: sum over the data-parallel replicas
            dist.all_reduce(grad, group=parallel_state.get_data_parallel_group())
        if m is not None and world > 1:
            n_local = NUM_EXPERTS // ep
            name = f"{m[1]}{parallel_state.get_expert_model_parallel_rank() * n_local + int(m[2])}{m[3]}"
        grads[name] = grad.detach().clone()

    if world == 1:
        torch.save({"losses": losses, "grads": grads}, out / "reference.pt")
        return True
    ref = torch.load(out / "reference.pt")
    report = {"router": router, "rank": rank, "loss": losses[0], "ref_loss": ref["losses"][micro_batches[0]]}
    rel = abs(losses[0] - report["ref_loss"]) / abs(report["ref_loss"])
    report["loss_rel_err"] = rel
    worst = 0.0
    for name, grad in grads.items():
        r = ref["grads"][name]
        worst = max(worst, (grad - r).abs().max().item() / (r.abs().max().item() + 1e-12))
    report["grad_max_rel_err"] = worst
    (out / f"report_rank{rank}.json").write_text(json.dumps(report))
    print(json.dumps(report), flush=True)
    return rel <= 1e-5 and worst <= 1e-4


if __name__ == "__main__":
    with cpu_runtime.device_redirect():  # CPU only: megatron's device="cuda" requests -> CPU
        main()
