"""``ACMoEForCausalLM``: megatron-core's GPT with ACMoE routers as a Hugging Face model (remote code).

Copied into every export directory and loaded with ``trust_remote_code=True``, so it imports only
``torch`` and ``transformers``. It computes what megatron-core 0.19 computes for the GPTModel our
trainer builds (``acmoe_megatron.runtime.model_provider.make_model_provider``), module by module:

* pre-LN decoder layers: h += attn(norm(h)); h += mlp(norm(h)) (megatron's ``TransformerLayer``;
  core megatron ignores ``apply_residual_connection_post_layernorm``), then the final norm and
  the output layer. LayerNorm / RMSNorm with megatron's ``layernorm_epsilon``.
* attention: the fused ``linear_qkv`` is split into q/k/v projections at conversion; GQA repeats each
  key/value group for its ``num_attention_heads / num_key_value_heads`` consecutive query heads
  (megatron's ``repeat_interleave``); optional q/k norm before RoPE; scores scaled by
  ``softmax_scale`` (default 1/sqrt(head_dim)), softmax in fp32, causal.
* RoPE as megatron's ``RotaryEmbedding``: inv_freq = 1 / base^(2i/dim) over ``rotary_percent`` of
  the head, the half-rotation convention ([x1, x2] -> [-x2, x1]) or the interleaved one
  (``rotary_interleaved``), optional linear interpolation and llama-3 scaling.
* MoE layers: the router's logits (``router_types``), then megatron's top-k routing
  (``topk_routing_with_score_function``: softmax / sigmoid / sqrtsoftplus, pre-softmax, scaling
  factor, expert bias, group-limited top-k; sinkhorn's inference path); each selected expert gets
  act(fc1 x) · p -> fc2 (+ bias · p), and the outputs are summed (megatron's per_token_scale).
  No capacity: tokens are routed one at a time, as megatron's dropless MoE does.
* the AC router (ACMoE, Definition 2) at inference: s_j = (x ⊙ w[c]) · e_j / ||e_j|| with the
  fixed table ``ac_weight`` [K, D] of that layer and c = the token's top-1 expert at the previous
  MoE layer in the same forward. Every routing decision depends on the token alone, so decoding
  with a KV cache gives the same logits as a full forward.

Shape suffixes: B batch, S sequence, D hidden, T tokens (B·S), E experts, K clusters (= E).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_acmoe import ACMoEConfig


def _output(cls, cache, **fields):
    """A model output; transformers 5.x calls the KV cache ``cache``, 4.x ``past_key_values``."""
    name = "cache" if "cache" in cls.__dataclass_fields__ else "past_key_values"
    return cls(**fields, **{name: cache})


def _cache_of(output):
    return getattr(output, "cache" if "cache" in type(output).__dataclass_fields__ else "past_key_values")


try:  # transformers >= 5: initialisers that skip weights already loaded from the checkpoint
    from transformers import initialization as _init
except ImportError:  # transformers 4.x
    _init = nn.init

_NORM_EPS = 1e-12  # F.normalize's (and acmoe_megatron.core.ac_stats') clamp of ||e||


# -- normalisation ------------------------------------------------------------------------------


class ACMoELayerNorm(nn.Module):
    """torch.nn.LayerNorm as megatron builds it (weight + 1 with ``layernorm_zero_centered_gamma``)."""

    def __init__(self, dim: int, eps: float, zero_centered_gamma: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps, self.zero_centered_gamma = eps, zero_centered_gamma

    def forward(self, x):
        weight = self.weight + 1 if self.zero_centered_gamma else self.weight
        return F.layer_norm(x, (x.shape[-1],), weight, self.bias, self.eps)


class ACMoERMSNorm(nn.Module):
    """torch.nn.RMSNorm as megatron builds it."""

    def __init__(self, dim: int, eps: float, zero_centered_gamma: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.zero_centered_gamma = eps, zero_centered_gamma

    def forward(self, x):
        weight = self.weight + 1 if self.zero_centered_gamma else self.weight
        return F.rms_norm(x, (x.shape[-1],), weight, self.eps)


class ACMoEL2Norm(nn.Module):
    """megatron's ``L2Norm`` (``qk_l2_norm``): x / rms(x), no weight."""

    def __init__(self, dim: int, eps: float, zero_centered_gamma: bool = False):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        x_float = x.float()
        return (x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


_NORMS = {"LayerNorm": ACMoELayerNorm, "RMSNorm": ACMoERMSNorm, "L2Norm": ACMoEL2Norm}


def _norm(config: ACMoEConfig, dim: int, kind: str | None = None) -> nn.Module:
    return _NORMS[kind or config.normalization](dim, config.layernorm_epsilon, config.layernorm_zero_centered_gamma)


# -- rotary position embedding -----------------------------------------------------------------


def rope_inv_freq(config: ACMoEConfig, device=None) -> torch.Tensor:
    """megatron's ``RotaryEmbedding.inv_freq`` (fp32), llama-3 scaling included."""
    dim = config.head_dim
    if config.rotary_percent < 1.0:
        dim = int(dim * config.rotary_percent)
    inv_freq = 1.0 / (config.rotary_base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    if config.rope_llama3_scaling:
        inv_freq = _llama3_scaling(inv_freq, config.rope_llama3_scaling_factor)
    return inv_freq


def _llama3_scaling(freqs, factor, low_freq_factor=1, high_freq_factor=4, old_context_len=8192):
    """megatron's ``RotaryEmbedding._apply_scaling`` (llama 3.x)."""
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / freqs
    inv_freq = torch.where(wavelen > low_freq_wavelen, freqs / factor, freqs)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, inv_freq)


def rope_angles(config: ACMoEConfig, position_ids_BS: torch.Tensor) -> torch.Tensor:
    """The rotation angles ``[B, S, rot_dim]`` of the positions, laid out as megatron's ``get_emb``."""
    inv_freq = rope_inv_freq(config, position_ids_BS.device)
    pos_BS = position_ids_BS.to(torch.float32)
    if config.rotary_seq_len_interpolation_factor is not None:
        pos_BS = pos_BS * (1 / config.rotary_seq_len_interpolation_factor)
    freqs_BSF = pos_BS.unsqueeze(-1) * inv_freq
    if config.rotary_interleaved:  # f0 f0 f1 f1 ...
        return torch.stack((freqs_BSF, freqs_BSF), dim=-1).flatten(-2)
    return torch.cat((freqs_BSF, freqs_BSF), dim=-1)  # f0 f1 ... f0 f1 ...


def _rotate_half(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    if not interleaved:
        x1, x2 = torch.chunk(x, 2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def apply_rope(t_BSHd: torch.Tensor, angles_BSR: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """megatron's ``_apply_rotary_pos_emb_bshd``: rotate the first rot_dim channels of each head."""
    rot_dim = angles_BSR.shape[-1]
    t, t_pass = t_BSHd[..., :rot_dim], t_BSHd[..., rot_dim:]
    angles = angles_BSR.unsqueeze(2)  # broadcast over heads
    cos, sin = torch.cos(angles).to(t.dtype), torch.sin(angles).to(t.dtype)
    t = (t * cos) + (_rotate_half(t, interleaved) * sin)
    return torch.cat((t, t_pass), dim=-1)


# -- attention ----------------------------------------------------------------------------------


class ACMoEAttention(nn.Module):
    """Causal self-attention: megatron's ``SelfAttention`` + ``DotProductAttention``."""

    def __init__(self, config: ACMoEConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.num_heads, self.num_groups, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                          config.head_dim)
        D, hn = config.hidden_size, config.head_dim
        qkv_bias = config.add_bias_linear or config.add_qkv_bias
        self.q_proj = nn.Linear(D, self.num_heads * hn, bias=qkv_bias)
        self.k_proj = nn.Linear(D, self.num_groups * hn, bias=qkv_bias)
        self.v_proj = nn.Linear(D, self.num_groups * hn, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * hn, D, bias=config.add_bias_linear)
        if config.qk_norm is not None:
            self.q_norm = _norm(config, hn, config.qk_norm)
            self.k_norm = _norm(config, hn, config.qk_norm)
        else:
            self.q_norm = self.k_norm = None
        self.scale = config.softmax_scale if config.softmax_scale is not None else 1.0 / math.sqrt(hn)

    def forward(self, x_BSD, angles_BSR, mask_B1SK, past_key_values: Cache | None):
        B, S, _ = x_BSD.shape
        q = self.q_proj(x_BSD).view(B, S, self.num_heads, self.head_dim)
        k = self.k_proj(x_BSD).view(B, S, self.num_groups, self.head_dim)
        v = self.v_proj(x_BSD).view(B, S, self.num_groups, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if angles_BSR is not None:
            q = apply_rope(q, angles_BSR, self.config.rotary_interleaved)
            k = apply_rope(k, angles_BSR, self.config.rotary_interleaved)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, S, hn]
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        per_group = self.num_heads // self.num_groups
        if per_group > 1:  # query heads g*per_group .. (g+1)*per_group-1 share group g
            k, v = k.repeat_interleave(per_group, dim=1), v.repeat_interleave(per_group, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        probs = torch.softmax(scores.float() + mask_B1SK, dim=-1).to(v.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(B, S, self.num_heads * self.head_dim)
        return self.o_proj(out)


# -- MLPs and experts ---------------------------------------------------------------------------


def _activation(name: str):
    return {
        "gelu": F.gelu,
        # megatron's fused bias-GeLU / GeGLU (tanh approximation with its constant)
        "gelu_tanh": lambda x: x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x))),
        "fast_gelu": lambda x: 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
        "silu": F.silu,
        "relu": F.relu,
        "squared_relu": lambda x: torch.pow(F.relu(x), 2),
        "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    }[name]


class ACMoEMLP(nn.Module):
    """megatron's ``MLP``: fc2(act(fc1 x)); GLU: fc1's first half is gated by act, its second half is linear.

    As an expert it takes the token's gate value ``scale_T`` (megatron's ``per_token_scale``):
    fc2(act(fc1 x) · p) + fc2.bias · p."""

    def __init__(self, config: ACMoEConfig, ffn_hidden_size: int):
        super().__init__()
        self.config = config
        width = ffn_hidden_size * (2 if config.gated_linear_unit else 1)
        self.fc1 = nn.Linear(config.hidden_size, width, bias=config.add_bias_linear)
        self.fc2 = nn.Linear(ffn_hidden_size, config.hidden_size, bias=config.add_bias_linear)
        self.act = _activation(config.hidden_act)

    def forward(self, x, scale_T=None):
        h = self.fc1(x)
        if self.config.gated_linear_unit:
            h_glu, h_linear = torch.chunk(h, 2, dim=-1)
            if (clamp := self.config.activation_clamp_value) is not None:
                h_glu, h_linear = h_glu.clamp(max=clamp), h_linear.clamp(min=-clamp, max=clamp)
            h = self.act(h_glu) * (h_linear + self.config.glu_linear_offset)
        else:
            h = self.act(h)
        if scale_T is not None:
            h = (h * scale_T.unsqueeze(-1)).to(x.dtype)
        y = F.linear(h, self.fc2.weight)
        if self.fc2.bias is not None:
            y = y + (self.fc2.bias if scale_T is None else self.fc2.bias * scale_T.unsqueeze(-1))
        return y


class ACMoERouter(nn.Module):
    """Router logits ``[T, E]`` (in fp32, or fp64 with ``moe_router_dtype: fp64``), as the
    megatron router class named by ``router_type`` makes them."""

    def __init__(self, config: ACMoEConfig, router_type: str):
        super().__init__()
        self.config, self.router_type = config, router_type
        E, D = config.num_experts, config.hidden_size
        if router_type == "xmoe":
            dim = config.xmoe_dim or max(1, E // 2)
            self.weight = nn.Parameter(torch.empty(E, dim))  # expert embeddings e_j
            self.proj = nn.Parameter(torch.empty(dim, D))  # W_p
        else:
            self.weight = nn.Parameter(torch.empty(E, D))
        self.bias = nn.Parameter(torch.zeros(E)) if router_type == "topk" and config.add_bias_linear else None
        if config.moe_router_enable_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(E))
        else:
            self.expert_bias = None
        if router_type == "ac":  # row k = the diagonal of M_k, fixed at inference
            self.register_buffer("ac_weight", torch.ones(E, D))

    def forward(self, x_TD: torch.Tensor, prev_top1_T: torch.Tensor | None) -> torch.Tensor:
        dtype = torch.float64 if self.config.moe_router_dtype == "fp64" else torch.float32
        if self.router_type == "topk":
            bias = None if self.bias is None else self.bias.to(dtype)
            return F.linear(x_TD.to(dtype), self.weight.to(dtype), bias)
        if self.router_type == "xmoe":
            return (x_TD.to(dtype) @ self.proj.to(dtype).t()) @ F.normalize(self.weight.to(dtype), dim=-1).t()
        e_ED = self.weight.to(dtype)
        ehat_ED = e_ED / torch.linalg.vector_norm(e_ED, dim=1, keepdim=True).clamp_min(_NORM_EPS)
        if self.router_type == "ac":
            xm_TD = torch.index_select(self.ac_weight.to(dtype), 0, prev_top1_T) * x_TD
        else:
            xm_TD = x_TD.to(dtype)
        scores_TE = xm_TD @ ehat_ED.t()
        # as acmoe_megatron.core.ac_stats.scores_forward: non-finite scores -> the smallest finite one
        finite_TE = torch.nan_to_num(scores_TE, nan=math.inf, posinf=math.inf, neginf=math.inf)
        return torch.where(finite_TE == math.inf, finite_TE.amin(), finite_TE)


class ACMoESparseBlock(nn.Module):
    """An MoE layer: router -> megatron's top-k routing -> the selected experts, summed."""

    def __init__(self, config: ACMoEConfig, router_type: str):
        super().__init__()
        self.config = config
        self.router = ACMoERouter(config, router_type)
        self.experts = nn.ModuleList(ACMoEMLP(config, config.moe_ffn_hidden_size) for _ in range(config.num_experts))

    def route(self, logits_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(probs ``[T, E]``, routing map ``[T, E]``): megatron's ``TopKRouter.routing`` at inference."""
        c, k = self.config, self.config.moe_router_topk
        if c.moe_router_load_balancing_type == "sinkhorn":  # megatron's eval path of sinkhorn routing
            act_TE = torch.sigmoid(logits_TE) if k == 1 else torch.softmax(logits_TE, -1, dtype=torch.float32).type_as(
                logits_TE)
            idx_TK = torch.topk(act_TE, k=k, dim=1).indices
            map_TE = torch.zeros_like(act_TE).int().scatter(1, idx_TK, 1).bool()
            return act_TE * map_TE, map_TE
        if c.moe_router_score_function == "softmax":
            if c.moe_router_pre_softmax:
                probs_TK, idx_TK = self._topk(torch.softmax(logits_TE, dim=-1, dtype=torch.float32))
            else:
                scores_TK, idx_TK = self._topk(logits_TE)
                probs_TK = torch.softmax(scores_TK, dim=-1, dtype=torch.float32)
        else:
            if c.moe_router_score_function == "sigmoid":
                scores_TE = torch.sigmoid(logits_TE.float())
            else:  # sqrtsoftplus
                scores_TE = F.softplus(logits_TE.float()).sqrt()
            if self.router.expert_bias is not None:
                _, idx_TK = self._topk(scores_TE + self.router.expert_bias.float())
                scores_TK = torch.gather(scores_TE, dim=1, index=idx_TK)
            else:
                scores_TK, idx_TK = self._topk(scores_TE)
            probs_TK = scores_TK / (scores_TK.sum(dim=-1, keepdim=True) + 1e-20) if k > 1 else scores_TK
        if c.moe_router_topk_scaling_factor:
            probs_TK = probs_TK * c.moe_router_topk_scaling_factor
        probs_TK = probs_TK.type_as(logits_TE)
        probs_TE = torch.zeros_like(logits_TE).scatter(1, idx_TK, probs_TK)
        map_TE = torch.zeros_like(logits_TE).int().scatter(1, idx_TK, 1).bool()
        return probs_TE, map_TE

    def _topk(self, scores_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c, k = self.config, self.config.moe_router_topk
        if not c.moe_router_group_topk:
            return torch.topk(scores_TE, k=k, dim=1)
        # megatron's group_limited_topk: the best groups by the sum of their top-(k/groups) scores
        T, E, groups = scores_TE.shape[0], scores_TE.shape[1], c.moe_router_num_groups
        group_scores = scores_TE.view(T, groups, -1).topk(k // c.moe_router_group_topk, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=c.moe_router_group_topk, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(T, groups, E // groups).reshape(T, -1)
        return torch.topk(scores_TE.masked_fill(~score_mask.bool(), float("-inf")), k=k, dim=-1)

    def forward(self, x_BSD: torch.Tensor, prev_top1_T: torch.Tensor | None):
        """(output ``[B, S, D]``, this layer's top-1 expert per token ``[T]``: the next AC layer's clusters)."""
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        probs_TE, map_TE = self.route(self.router(x_TD, prev_top1_T))
        # the selected expert with the largest gate (acmoe_megatron.core.labels.labels_from_routing)
        top1_T = probs_TE.detach().masked_fill(~map_TE, -1.0).argmax(dim=-1)
        out_TD = torch.zeros_like(x_TD)
        for e, expert in enumerate(self.experts):
            idx = map_TE[:, e].nonzero().squeeze(-1)
            if idx.numel() == 0:
                continue
            x_e, p_e = x_TD[idx], probs_TE[idx, e]
            if self.config.moe_apply_probs_on_input:  # megatron: top-1 only; the gate scales the input
                x_e, p_e = (p_e.unsqueeze(-1) * x_e).to(x_TD.dtype), torch.ones_like(p_e)
            out_TD.index_add_(0, idx, expert(x_e, p_e).to(out_TD.dtype))
        return out_TD.view_as(x_BSD), top1_T


# -- decoder ------------------------------------------------------------------------------------


class ACMoEDecoderLayer(nn.Module):
    """megatron's pre-LN ``TransformerLayer``; passes the latest MoE layer's top-1 labels on."""

    def __init__(self, config: ACMoEConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = _norm(config, config.hidden_size)
        self.self_attn = ACMoEAttention(config, layer_idx)
        self.post_attention_layernorm = _norm(config, config.hidden_size)
        self.is_moe = config.mlp_layer_types[layer_idx] == "moe"
        if self.is_moe:
            self.mlp = ACMoESparseBlock(config, config.router_types[layer_idx])
        else:
            self.mlp = ACMoEMLP(config, config.ffn_hidden_size)

    def forward(self, h_BSD, angles, mask, past_key_values, prev_top1_T):
        h_BSD = h_BSD + self.self_attn(self.input_layernorm(h_BSD), angles, mask, past_key_values)
        x_BSD = self.post_attention_layernorm(h_BSD)
        if self.is_moe:
            y_BSD, prev_top1_T = self.mlp(x_BSD, prev_top1_T)
        else:
            y_BSD = self.mlp(x_BSD)
        return h_BSD + y_BSD, prev_top1_T


class ACMoEPreTrainedModel(PreTrainedModel):
    """Weight initialisation and the class attributes transformers reads."""

    config_class = ACMoEConfig
    base_model_prefix = "model"
    _no_split_modules = ["ACMoEDecoderLayer"]
    # the routers score in fp32 (as megatron's AC / cosine routers always do, and its top-k router with
    # moe_router_dtype fp32): a bf16 / fp16 model keeps their weights and AC tables in fp32
    _keep_in_fp32_modules = ["router"]
    _keep_in_fp32_modules_strict = ["router"]
    _supports_cache_class = True
    supports_gradient_checkpointing = False

    def _init_weights(self, module):
        """A fresh model (``from_config``); loading a checkpoint overwrites all of it."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            _init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                _init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            _init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (ACMoELayerNorm, ACMoERMSNorm)):
            (_init.zeros_ if module.zero_centered_gamma else _init.ones_)(module.weight)
            if getattr(module, "bias", None) is not None:
                _init.zeros_(module.bias)
        elif isinstance(module, ACMoERouter):
            _init.normal_(module.weight, mean=0.0, std=std)
            if module.router_type == "xmoe":
                _init.normal_(module.proj, mean=0.0, std=std)
            if module.bias is not None:
                _init.zeros_(module.bias)
            if module.expert_bias is not None:
                _init.zeros_(module.expert_bias)
            if module.router_type == "ac":
                _init.ones_(module.ac_weight)  # M = I until a table is loaded


class ACMoEModel(ACMoEPreTrainedModel):
    """Embedding, the decoder layers and the final norm (megatron's ``GPTModel`` without its output layer)."""

    def __init__(self, config: ACMoEConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.position_embedding_type == "learned_absolute":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        else:
            self.embed_positions = None
        self.layers = nn.ModuleList(ACMoEDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = _norm(config, config.hidden_size)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, cache=None, **kwargs):
        """The final hidden states ``[B, S, D]`` (after the final norm) and the KV cache (None
        without ``use_cache``). ``cache`` (transformers 5) / ``past_key_values`` (4.x)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        past_key_values = cache if cache is not None else past_key_values
        h_BSD = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, S = h_BSD.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = _new_cache(self.config)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None and attention_mask is not None and attention_mask.dim() == 2:
            # left padding: each sequence counts its positions from its first real token
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -S:]
        elif position_ids is None:
            position_ids = torch.arange(past, past + S, device=h_BSD.device).unsqueeze(0).expand(B, -1)
        if self.embed_positions is not None:
            h_BSD = h_BSD + self.embed_positions(position_ids)
        angles = rope_angles(self.config, position_ids) if self.config.position_embedding_type == "rope" else None
        mask = _attention_mask(attention_mask, B, S, past, h_BSD.device)
        top1_T = None
        for layer in self.layers:
            h_BSD, top1_T = layer(h_BSD, angles, mask, past_key_values, top1_T)
        return _output(BaseModelOutputWithPast, past_key_values, last_hidden_state=self.norm(h_BSD))


def _new_cache(config: ACMoEConfig) -> Cache:
    try:
        return DynamicCache(config=config)
    except TypeError:  # transformers versions whose DynamicCache takes no config
        return DynamicCache()


def _attention_mask(mask_BK: torch.Tensor | None, B: int, S: int, past: int, device) -> torch.Tensor:
    """Additive fp32 mask ``[B, 1, S, past + S]``: causal, plus the padding of a 2-D ``attention_mask``."""
    K = past + S
    q_pos = torch.arange(past, K, device=device).unsqueeze(1)
    blocked_SK = torch.arange(K, device=device).unsqueeze(0) > q_pos
    blocked = blocked_SK.view(1, 1, S, K).expand(B, 1, S, K)
    if mask_BK is not None:
        if mask_BK.dim() != 2 or mask_BK.shape[-1] != K:
            raise ValueError(f"attention_mask of shape {tuple(mask_BK.shape)}: expected [batch, {K}] "
                             "(1 = attend, 0 = padding), covering the cached and the new tokens")
        blocked = blocked | (mask_BK == 0).view(B, 1, 1, K)
    # a large negative number rather than -inf: a padding query that sees nothing stays finite
    return torch.zeros(B, 1, S, K, device=device).masked_fill(blocked, torch.finfo(torch.float32).min)


class ACMoEForCausalLM(ACMoEPreTrainedModel, GenerationMixin):
    """``ACMoEModel`` + the output layer (untied; a tied megatron model is exported with a copy)."""

    def __init__(self, config: ACMoEConfig):
        super().__init__(config)
        self.model = ACMoEModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, cache=None, **kwargs):
        """Logits ``[B, S, V]`` (and the next-token loss with ``labels``). ``cache`` (transformers 5) /
        ``past_key_values`` (4.x): a ``Cache`` of the earlier tokens' keys and values."""
        cache = cache if cache is not None else past_key_values
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         inputs_embeds=inputs_embeds, use_cache=use_cache, cache=cache)
        h_BSD, cache = out.last_hidden_state, _cache_of(out)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h_BSD = h_BSD[:, -logits_to_keep:]
        elif not isinstance(logits_to_keep, int):
            h_BSD = h_BSD[:, logits_to_keep]
        logits = self.lm_head(h_BSD)
        loss = None
        if labels is not None:  # next-token cross-entropy; -100 is ignored
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        return _output(CausalLMOutputWithPast, cache, loss=loss, logits=logits)


__all__ = ["ACMoEForCausalLM", "ACMoEModel", "ACMoEPreTrainedModel"]
