"""PP=2 hand-off worker (torchrun --nproc_per_node 2): stage 0 runs layers 1-2, stage 1 layers 3-4;
AC from MoE layer 2 and elliptical attention from layer 3, so stage 1's first AC layer needs stage 0's
labels and its first elliptical layer stage 0's values. Each stage writes what it observed to
``--dir``: stage 0 the top-1 labels its last MoE layer (2) produced and the values its layer 2
stored, stage 1 the labels its AC layer 3 used and the previous-layer values its layer 3 read."""

import argparse
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch  # noqa: E402

from acmoe_megatron.runtime import cpu_runtime  # noqa: E402

cpu_runtime.install()

import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state  # noqa: E402
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed  # noqa: E402

from acmoe_megatron.model.elliptical import EllipticalAttentionMixin, EllipticalSettings  # noqa: E402
from acmoe_megatron.model.chunk_state import VALUES, state_of  # noqa: E402
from acmoe_megatron.model.routers import ACRouter  # noqa: E402
from acmoe_megatron.core.settings import ACSettings  # noqa: E402
from acmoe_megatron.testing import build_gpt, tiny_config  # noqa: E402

SEQ, MBS, HIDDEN = 16, 2, 64


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    out = Path(p.parse_args().dir)
    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=2)
    model_parallel_cuda_manual_seed(1234)
    stage = parallel_state.get_pipeline_model_parallel_rank()
    config = tiny_config(num_layers=4, pipeline_model_parallel_size=2, hidden_size=HIDDEN)
    model = build_gpt(config, ACSettings(first_ac_layer=2), vocab_size=128, max_sequence_length=SEQ,
                      elliptical=EllipticalSettings(enabled=True, first_layer=3),
                      pre_process=stage == 0, post_process=stage == 1)
    state = state_of(model)  # attach (in build_gpt) made the stage transport: the hooks send/receive
    assert state.transport is not None
    tokens = torch.randint(0, 128, (MBS, SEQ), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(SEQ).unsqueeze(0).expand(MBS, -1)
    n_tok = SEQ * MBS
    for mb in range(2):  # two micro-batches, forward only
        if stage == 0:
            hidden = model(tokens + mb, pos, None)  # the forward hook sends labels and values
            dist.send(hidden.detach().contiguous(), dst=1)
            layer, labels = state.latest_labels()
            torch.save({"layer": layer, "top1": labels.top1_T, "values": state.get_state(VALUES, 2).clone()},
                       out / f"stage0_mb{mb}.pt")
        else:
            hidden = torch.empty(SEQ, MBS, HIDDEN)
            dist.recv(hidden, src=0)  # the forward pre-hook receives labels and values
            used = {}
            ac3 = [m for m in model.modules() if isinstance(m, ACRouter) and m.layer_number == 3][0]

            def record(module, _args):  # a pre-hook must return None (or it replaces the input)
                used.setdefault("top1", module.chunk_state.labels_for(3, n_tok).top1_T.clone())

            core3 = [m for m in model.modules()
                     if isinstance(m, EllipticalAttentionMixin) and m.elliptical_layer == 3][0]

            def record_values(module, args):
                used["values"] = module.chunk_state.get_state(VALUES, 2).reshape(args[2].shape).clone()
                used["applies"] = module.apply_metric

            handles = [ac3.register_forward_pre_hook(record), core3.register_forward_pre_hook(record_values)]
            model.set_input_tensor(hidden)
            model(tokens + mb, pos, None)
            for handle in handles:
                handle.remove()
            torch.save(used, out / f"stage1_mb{mb}.pt")
    state.transport.wait_all()
    dist.barrier()


if __name__ == "__main__":
    with cpu_runtime.device_redirect():  # CPU only: megatron's device="cuda" requests -> CPU
        main()
