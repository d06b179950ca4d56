"""A Hugging Face MoE checkpoint into a Megatron model whose routers are ours, through Bridge's AutoBridge.

What a user does to try AC on an existing model: ``AutoBridge.from_hf_pretrained(path)``, its
``to_megatron_provider(load_weights=True)``, our ``bridge_layer_spec`` (AC from ``first_ac_layer``)
instead of the provider's spec, ``plugin.register_autobridge_routers()`` so Bridge knows how to load
our routers' weights, the pre-wrap hook, and the provider builds the model with the HF weights.

Usage: python autobridge_import.py HF_DIR OUT_JSON (one process; gloo group of 1; CPU shims as the
example scripts apply them). For each router setting (all top-k, then AC on layers >= 3) it writes
the router class per layer, whether each router weight equals the HF gate, and the largest logit
difference from the HF model on one batch.
"""

import json
import os
import sys

import torch

from acmoe_megatron import plugin
from acmoe_megatron.core.settings import ACSettings
from acmoe_megatron.runtime import cpu_runtime

CPU = dict(transformer_impl="local", use_cpu_initialization=True, bf16=False, params_dtype=torch.float32,
           gradient_accumulation_fusion=False, persist_layer_norm=False, masked_softmax_fusion=False,
           bias_activation_fusion=False, apply_rope_fusion=False, cross_entropy_loss_fusion=False,
           moe_permute_fusion=False, moe_grouped_gemm=False, moe_token_dispatcher_type="alltoall")


def build(bridge, settings):
    provider = bridge.to_megatron_provider(load_weights=True)
    if cpu_runtime.cpu_only():
        for key, value in CPU.items():
            setattr(provider, key, value)
    provider.transformer_layer_spec = plugin.bridge_layer_spec(settings)
    provider.register_pre_wrap_hook(plugin.pre_wrap_hook())
    provider.finalize()
    return provider.provide_distributed_model(wrap_with_ddp=False)[0]


def main(hf_dir, out_path):
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)
    cpu_runtime.install_for_training()
    cpu_runtime.install_bridge()
    from megatron.bridge import AutoBridge
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    torch.distributed.init_process_group("gloo")
    parallel_state.initialize_model_parallel()
    registered = plugin.register_autobridge_routers()
    hf_weights = load_file(os.path.join(hf_dir, "model.safetensors"))
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    torch.manual_seed(0)
    ids = torch.randint(0, hf_model.config.vocab_size, (2, 32))
    with torch.no_grad():
        ref = hf_model(ids).logits
    result = {"registered": registered}
    with cpu_runtime.device_redirect():
        model_parallel_cuda_manual_seed(1234)
        bridge = AutoBridge.from_hf_pretrained(hf_dir)
        for name, settings in (("topk", ACSettings(router="topk")), ("ac", ACSettings(router="ac", first_ac_layer=3))):
            model = build(bridge, settings).eval()
            layers = model.decoder.layers
            pos = torch.arange(ids.shape[1]).unsqueeze(0).expand(ids.shape[0], -1)
            with torch.no_grad():
                logits = model(ids, pos, None)[..., :ref.shape[-1]]
            result[name] = {
                "routers": [type(layer.mlp.router).__name__ for layer in layers],
                "gate_equal": [torch.equal(layer.mlp.router.weight.detach().float(),
                                           hf_weights[f"model.layers.{i}.mlp.gate.weight"].float())
                               for i, layer in enumerate(layers)],
                "max_abs_logit_diff": (logits - ref).abs().max().item(),
                "logit_scale": ref.abs().max().item(),
            }
    with open(out_path, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
