"""Small builders shared by the tests, the benchmarks and the parity scripts (not used in training).

``tiny_config`` is a CPU-safe megatron ``TransformerConfig`` for a small MoE GPT; ``build_gpt``
builds megatron's ``GPTModel`` with our routers (spec.acmoe_block_spec; ``elliptical=``
``EllipticalSettings`` for elliptical attention) and attaches the chunk's
label carrier, exactly as the training model provider does.
"""

from __future__ import annotations

import torch


def tiny_config(**overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    on_gpu = torch.cuda.is_available()
    kw = dict(
        num_layers=4, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
        num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=128,
        moe_token_dispatcher_type="alltoall", moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=1e-2, use_cpu_initialization=True, params_dtype=torch.float32,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        gradient_accumulation_fusion=False, bias_dropout_fusion=False,
        masked_softmax_fusion=False, persist_layer_norm=False, apply_rope_fusion=False,
        deallocate_pipeline_outputs=True,
    )
    if not on_gpu:
        kw["pipeline_dtype"] = torch.float32
    kw.update(overrides)
    return TransformerConfig(**kw)


def build_gpt(config, settings, vocab_size=128, max_sequence_length=64, use_te=False, elliptical=None, **gpt_kw):
    from megatron.core.models.gpt import GPTModel

    from acmoe_megatron.spec import acmoe_block_spec

    spec, carrier = acmoe_block_spec(config, settings, use_transformer_engine=use_te, vocab_size=vocab_size,
                                     elliptical=elliptical)
    model = GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=vocab_size,
        max_sequence_length=max_sequence_length, position_embedding_type="rope", **gpt_kw,
    )
    model.acmoe_labels = carrier
    return model


def capture_router_outputs(model) -> dict:
    """{layer number: (probs, routing_map)} of every router's latest forward (forward hooks)."""
    from megatron.core.transformer.moe.router import TopKRouter

    seen = {}

    def hook(module, _inp, out):
        seen[module.layer_number] = (out[0].detach(), out[1].detach())

    for m in model.modules():
        if isinstance(m, TopKRouter):
            m.register_forward_hook(hook)
    return seen
