"""``ACMoEConfig``: the Hugging Face configuration of an exported ACMoE model (remote code).

This file is copied into every export directory and loaded with ``trust_remote_code=True``: it
imports only ``transformers``. The fields mirror megatron-core's ``TransformerConfig`` (and the
``GPTModel`` arguments) that decide what megatron computes at inference, so that
``modeling_acmoe.ACMoEForCausalLM`` reproduces megatron's logits; ``acmoe_megatron.inference.hf.convert``
fills them from a trained model. Per-layer choices are lists over the decoder layers:

* ``mlp_layer_types[i]``: ``"moe"`` or ``"dense"`` (megatron's ``moe_layer_freq``);
* ``router_types[i]`` (MoE layers; null for dense ones): ``"topk"`` (megatron's linear
  ``TopKRouter``: logits = x W^T + b), ``"cosine"`` (s = x · e/||e||), ``"ac"`` (the Adaptive
  Clustering router: s = (x ⊙ w[c]) · e/||e|| with a fixed per-cluster table w and c = the token's
  top-1 expert at the previous MoE layer) or ``"xmoe"`` (s = (W_p x) · e/||e||).

After any router, megatron's top-k routing runs unchanged (``moe_router_*`` fields).
"""

from __future__ import annotations

from transformers import PretrainedConfig

NORMALIZATIONS = ("LayerNorm", "RMSNorm")
QK_NORMS = (None, "LayerNorm", "RMSNorm", "L2Norm")
POSITION_EMBEDDINGS = ("rope", "learned_absolute", "none")
ACTIVATIONS = ("gelu", "gelu_tanh", "fast_gelu", "silu", "relu", "squared_relu", "quick_gelu")
ROUTER_TYPES = ("topk", "cosine", "ac", "xmoe")
SCORE_FUNCTIONS = ("softmax", "sigmoid", "sqrtsoftplus")
LOAD_BALANCING = ("aux_loss", "seq_aux_loss", "global_aux_loss", "none", "sinkhorn")


class ACMoEConfig(PretrainedConfig):
    """A megatron-core GPT (pre-LN decoder, RoPE, fused-QKV attention, MoE MLPs) with ACMoE routers."""

    model_type = "acmoe"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 257,
        hidden_size: int = 128,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        num_key_value_heads: int | None = None,  # megatron's num_query_groups
        head_dim: int | None = None,  # megatron's kv_channels
        max_position_embeddings: int = 256,
        # normalisation (megatron: normalization, layernorm_epsilon, layernorm_zero_centered_gamma)
        normalization: str = "LayerNorm",
        layernorm_epsilon: float = 1e-5,
        layernorm_zero_centered_gamma: bool = False,
        qk_norm: str | None = None,  # qk_layernorm (the model's normalization) or qk_l2_norm (L2Norm)
        # positions
        position_embedding_type: str = "rope",
        rotary_base: float = 10000.0,
        rotary_percent: float = 1.0,
        rotary_interleaved: bool = False,
        rotary_seq_len_interpolation_factor: float | None = None,
        rope_llama3_scaling: bool = False,
        rope_llama3_scaling_factor: float = 8.0,
        # attention
        softmax_scale: float | None = None,  # None: 1 / sqrt(head_dim)
        add_bias_linear: bool = False,
        add_qkv_bias: bool = False,
        # MLPs
        ffn_hidden_size: int = 512,
        moe_ffn_hidden_size: int | None = None,
        gated_linear_unit: bool = False,
        hidden_act: str = "gelu",
        glu_linear_offset: float = 0.0,
        activation_clamp_value: float | None = None,
        mlp_layer_types: list | None = None,
        # MoE routing
        num_experts: int = 8,
        moe_router_topk: int = 2,
        router_types: list | None = None,
        moe_router_score_function: str = "softmax",
        moe_router_pre_softmax: bool = False,
        moe_router_topk_scaling_factor: float | None = None,
        moe_router_num_groups: int | None = None,
        moe_router_group_topk: int | None = None,
        moe_router_enable_expert_bias: bool = False,
        moe_router_load_balancing_type: str = "aux_loss",
        moe_router_dtype: str = "fp32",  # the routers run in fp32 (fp64 with "fp64")
        moe_apply_probs_on_input: bool = False,
        xmoe_dim: int | None = None,
        # provenance (informative: what the model was trained with)
        acmoe: dict | None = None,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = False,
        use_cache: bool = True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.normalization = normalization
        self.layernorm_epsilon = layernorm_epsilon
        self.layernorm_zero_centered_gamma = layernorm_zero_centered_gamma
        self.qk_norm = qk_norm
        self.position_embedding_type = position_embedding_type
        self.rotary_base = rotary_base
        self.rotary_percent = rotary_percent
        self.rotary_interleaved = rotary_interleaved
        self.rotary_seq_len_interpolation_factor = rotary_seq_len_interpolation_factor
        self.rope_llama3_scaling = rope_llama3_scaling
        self.rope_llama3_scaling_factor = rope_llama3_scaling_factor
        self.softmax_scale = softmax_scale
        self.add_bias_linear = add_bias_linear
        self.add_qkv_bias = add_qkv_bias
        self.ffn_hidden_size = ffn_hidden_size
        self.moe_ffn_hidden_size = moe_ffn_hidden_size or ffn_hidden_size
        self.gated_linear_unit = gated_linear_unit
        self.hidden_act = hidden_act
        self.glu_linear_offset = glu_linear_offset
        self.activation_clamp_value = activation_clamp_value
        self.mlp_layer_types = list(mlp_layer_types) if mlp_layer_types is not None else ["moe"] * num_hidden_layers
        self.num_experts = num_experts
        self.moe_router_topk = moe_router_topk
        self.router_types = (list(router_types) if router_types is not None
                             else ["topk" if t == "moe" else None for t in self.mlp_layer_types])
        self.moe_router_score_function = moe_router_score_function
        self.moe_router_pre_softmax = moe_router_pre_softmax
        self.moe_router_topk_scaling_factor = moe_router_topk_scaling_factor
        self.moe_router_num_groups = moe_router_num_groups
        self.moe_router_group_topk = moe_router_group_topk
        self.moe_router_enable_expert_bias = moe_router_enable_expert_bias
        self.moe_router_load_balancing_type = moe_router_load_balancing_type
        self.moe_router_dtype = moe_router_dtype
        self.moe_apply_probs_on_input = moe_apply_probs_on_input
        self.xmoe_dim = xmoe_dim
        self.acmoe = dict(acmoe or {})
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self._validate_acmoe()

    def _validate_acmoe(self) -> None:
        n = self.num_hidden_layers
        checks = [
            (self.normalization in NORMALIZATIONS, f"normalization={self.normalization!r}: one of {NORMALIZATIONS}"),
            (self.qk_norm in QK_NORMS, f"qk_norm={self.qk_norm!r}: one of {QK_NORMS}"),
            (self.position_embedding_type in POSITION_EMBEDDINGS,
             f"position_embedding_type={self.position_embedding_type!r}: one of {POSITION_EMBEDDINGS}"),
            (self.hidden_act in ACTIVATIONS, f"hidden_act={self.hidden_act!r}: one of {ACTIVATIONS}"),
            (self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads={self.num_attention_heads} is not a multiple of "
             f"num_key_value_heads={self.num_key_value_heads}"),
            (len(self.mlp_layer_types) == n and set(self.mlp_layer_types) <= {"moe", "dense"},
             f"mlp_layer_types={self.mlp_layer_types!r}: one of 'moe' / 'dense' per layer ({n} layers)"),
            (len(self.router_types) == n, f"router_types={self.router_types!r}: one entry per layer ({n} layers)"),
            (self.moe_router_score_function in SCORE_FUNCTIONS,
             f"moe_router_score_function={self.moe_router_score_function!r}: one of {SCORE_FUNCTIONS}"),
            (self.moe_router_load_balancing_type in LOAD_BALANCING,
             f"moe_router_load_balancing_type={self.moe_router_load_balancing_type!r}: one of {LOAD_BALANCING}"),
            (self.moe_router_dtype in ("fp32", "fp64"), f"moe_router_dtype={self.moe_router_dtype!r}: fp32 or fp64"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"ACMoEConfig: {message}")
        seen_moe = False
        for i, (mlp, router) in enumerate(zip(self.mlp_layer_types, self.router_types)):
            if mlp == "dense" and router is not None:
                raise ValueError(f"ACMoEConfig: layer {i + 1} is dense but has router_types {router!r}")
            if mlp == "moe" and router not in ROUTER_TYPES:
                raise ValueError(f"ACMoEConfig: layer {i + 1}: router {router!r}, choose one of {ROUTER_TYPES}")
            if router == "ac" and not seen_moe:
                raise ValueError(f"ACMoEConfig: layer {i + 1} is an AC layer without an earlier MoE layer "
                                 "(its clusters are the previous MoE layer's top-1 experts)")
            seen_moe = seen_moe or mlp == "moe"
