"""Elliptical Attention (Nielsen, Abdullaev, Teo, Nguyen; NeurIPS 2024, arXiv 2406.13770) as a
megatron-core core-attention plugin.

Attention with a diagonal Mahalanobis metric per (sequence, head):
``h_i = Σ_j softmax_j(q_iᵀ M k_j · scale) v_j`` with ``M = diag(m)``, estimated without parameters
from how much each value coordinate changed since the previous attention layer (official code
github.com/stefvk/Elliptical-Attention, ``W_over_layers`` in ``ImageNet/models.py`` and
``Wikitext/lmtool-fwms/src/mem_transformer.py``)::

    m[b, h, d] = mean_n |v^ℓ[n, b, h, d] − v^{ℓ−1}[n, b, h, d]| / δ      (no gradient)
    m[b, h, :] ← m[b, h, :] / max_d m[b, h, d]                            (δ and 1/N cancel)

The first attention layer has no predecessor and stays standard; ``first_layer`` (1-based attention
layer, default 2 = the official ``--M-positions 1..L-1``) is where the metric starts. A head whose
values did not change at all (max 0, where the official code divides by zero) keeps m = 1.

**Where it sits.** megatron applies RoPE to q and k *after* ``get_query_key_value_tensors``, and
the rotation mixes pairs of coordinates, so the diagonal metric must act on the rotated query, i.e.
inside core attention. ``spec.patch_block_spec`` replaces ``self_attention.submodules.core_attention``
of the decoder layers from ``first_layer − 1`` on (``DotProductAttention`` locally,
``TEDotProductAttention`` with Transformer Engine) by a subclass of that very class
(``elliptical_core_attention``): same parameters and checkpoint keys, same kernel, every argument
megatron passes (mask, ``attn_mask_type``, ``attention_bias``, ...) passed through. Its forward
stores this layer's values (detached) for the next layer, and from ``first_layer`` on pre-scales
the query, ``q' = q ⊙ m`` — ``(q ⊙ m)·k = qᵀ M k`` — so fused and flash kernels run unchanged (the
official code materialises a [B, H, D, D] diagonal matrix instead). With grouped-query attention
m is per value head (query group) and shared by the query heads of the group.

**Softmax scale** (``scale``): ``standard`` keeps megatron's factor (1/√d_head, or
``softmax_scale``), as the official ImageNet code does; ``none`` reproduces the official WikiText
code, which drops the 1/√d factor when M is on (the query is additionally multiplied by the
inverse of megatron's factor) — a different softmax temperature, kept only for reproduction.

**Source of the mean** (``source``), like the AC router's ``batch`` vs ``ema``: ``sequence`` (the
paper) averages over the whole sequence, so position t's metric uses later tokens' values — a
non-causal leak in a causal LM; ``prefix`` (causal-safe) gives position t the mean over positions
≤ t, max-normalised per position, so logits at t do not depend on later tokens.

**State.** The previous layer's values travel in the chunk's ``chunk_state.ChunkState`` under
(micro-batch, layer) like the AC labels: activation-recompute replays (full, or selective
``core_attn``) read the values of the micro-batch they replay, and ``label_transport`` sends the
last layer's values of a pipeline stage to the next one (``ValueHandoff``). The statistic is local
to a head, so tensor parallelism (heads split across ranks, full sequence after the
sequence-parallel gather) needs no communication; context parallelism (a shard of the sequence)
is refused, as are packed (THD) sequences, multi-latent attention, CUDA graphs and fine-grained
offloading of core attention.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch

from acmoe_megatron.core.settings import ELLIPTICAL_SCALES, ELLIPTICAL_SOURCES, EllipticalSettings  # noqa: F401
from acmoe_megatron.model.chunk_state import VALUES, UsesChunkState

SOURCES, SCALES = ELLIPTICAL_SOURCES, ELLIPTICAL_SCALES


# ---------------------------------------------------------------------------------------------
# the estimator and the query scaling (pure functions)


def _max_normalise(x: torch.Tensor) -> torch.Tensor:
    """x / max over the last dim; rows whose max is 0 (no change at all) become 1 (M = I)."""
    top = x.amax(dim=-1, keepdim=True)
    return torch.where(top > 0, x / top.clamp_min(torch.finfo(x.dtype).tiny), torch.ones_like(x))


@torch.no_grad()
def sequence_weights(v_SBGD: torch.Tensor, v_prev_SBGD: torch.Tensor) -> torch.Tensor:
    """The paper's m per (sequence, head): mean over tokens of |v − v_prev|, max-normalised. [B, G, D]"""
    change_BGD = (v_SBGD.float() - v_prev_SBGD.float()).abs().mean(dim=0)
    return _max_normalise(change_BGD)


@torch.no_grad()
def prefix_weights(v_SBGD: torch.Tensor, v_prev_SBGD: torch.Tensor) -> torch.Tensor:
    """Causal m per (position, sequence, head): mean over positions ≤ t, max-normalised. [S, B, G, D]

    The 1/(t+1) of the running mean cancels in the max-normalisation, so the running sum is used.
    """
    running_SBGD = (v_SBGD.float() - v_prev_SBGD.float()).abs().cumsum(dim=0)
    return _max_normalise(running_SBGD)


def metric_weights(v_SBGD: torch.Tensor, v_prev_SBGD: torch.Tensor, source: str) -> torch.Tensor:
    if v_prev_SBGD.shape != v_SBGD.shape:
        raise ValueError(f"values {tuple(v_SBGD.shape)} and previous values {tuple(v_prev_SBGD.shape)} differ")
    if source == "sequence":
        return sequence_weights(v_SBGD, v_prev_SBGD)
    if source == "prefix":
        return prefix_weights(v_SBGD, v_prev_SBGD)
    raise ValueError(f"elliptical source {source!r}: choose one of {SOURCES}")


def scale_query(q_SBHD: torch.Tensor, m: torch.Tensor, factor: float = 1.0) -> torch.Tensor:
    """q ⊙ m (× factor): ``m`` is [B, G, D] (one per sequence) or [S_kv, B, G, D] (per position).

    G value heads (query groups) serve H = G·r query heads: query head h uses group h // r
    (megatron's [ng, np/ng] head order). Per-position m is aligned to the *last* S_q positions
    (equal lengths in training; the new tokens when decoding against a KV cache).
    """
    S, B, H, D = q_SBHD.shape
    G = m.shape[-2]
    if H % G or m.shape[-1] != D:
        raise ValueError(f"query [S, B, H={H}, D={D}] cannot take metric {tuple(m.shape)} (G={G} groups)")
    w = m * factor if factor != 1.0 else m
    w = w.to(q_SBHD.dtype)
    w = w.unsqueeze(0) if w.dim() == 3 else w[-S:]  # [1 or S, B, G, D]
    q5 = q_SBHD.reshape(S, B, G, H // G, D) * w.unsqueeze(-2)
    return q5.reshape(S, B, H, D)


# ---------------------------------------------------------------------------------------------
# megatron adapter: a core-attention subclass, the spec patch, the pipeline hand-off plan


class EllipticalAttentionMixin(UsesChunkState):
    """Put before a megatron core-attention class: stores values, pre-scales the query.

    Extra constructor keyword (bound by ``elliptical_layer_specs``): ``elliptical`` (settings).
    The chunk's cross-layer state is bound by ``plugin.attach``. The layer number is megatron's
    global one, as the routers' (``layer_number`` keyword).
    """

    def __init__(self, config, layer_number, *args, elliptical: EllipticalSettings, **kwargs):
        super().__init__(config, layer_number, *args, **kwargs)
        self.elliptical = elliptical
        self.elliptical_layer = int(layer_number)
        self.apply_metric = self.elliptical_layer >= elliptical.first_layer
        self.query_factor = 1.0
        if elliptical.scale == "none":  # undo megatron's softmax factor (the WikiText quirk)
            softmax_scale = config.softmax_scale or 1.0 / math.sqrt(config.kv_channels)
            self.query_factor = 1.0 / softmax_scale

    def forward(self, query, key, value, attention_mask, *args, **kwargs):
        if kwargs.get("packed_seq_params") is not None or query.dim() != 4:
            raise RuntimeError(
                f"elliptical attention at layer {self.elliptical_layer}: packed sequences (THD / "
                "packed_seq_params) are not supported, the metric is a per-sequence statistic over "
                "[s, b, heads, d] values; train without sequence packing or set elliptical.enabled=false"
            )
        state = self.chunk_state
        state.put_state(VALUES, self.elliptical_layer, value.detach())
        if self.apply_metric:
            prev = state.get_state(VALUES, self.elliptical_layer - 1)
            if prev is None:
                raise RuntimeError(
                    f"elliptical attention at layer {self.elliptical_layer}: the values of attention "
                    f"layer {self.elliptical_layer - 1} for micro-batch {state.current_mb} are missing. "
                    "If that layer is on another pipeline stage, the stage transport is not active: "
                    "attach every model chunk with acmoe_megatron.plugin.attach and call the model."
                )
            if prev.numel() != value.numel():
                raise RuntimeError(
                    f"elliptical attention at layer {self.elliptical_layer}: values {tuple(value.shape)} "
                    f"but layer {self.elliptical_layer - 1} stored {tuple(prev.shape)}; consecutive "
                    "attention layers must have the same sequence, batch and head layout"
                )
            m = metric_weights(value, prev.reshape(value.shape), self.elliptical.source)
            query = scale_query(query, m, self.query_factor)
        return super().forward(query, key, value, attention_mask, *args, **kwargs)


_CLASSES: dict[type, type] = {}


def elliptical_core_attention(core_cls: type) -> type:
    """``Elliptical<core_cls>``: the mixin on top of megatron's core attention class (cached)."""
    if core_cls not in _CLASSES:
        _CLASSES[core_cls] = type(f"Elliptical{core_cls.__name__}", (EllipticalAttentionMixin, core_cls), {})
    return _CLASSES[core_cls]


@dataclass(frozen=True)
class ValueHandoff:
    """What ``label_transport`` sends between pipeline stages for elliptical attention.

    The values of the stage's last layer go to the next stage when its first layer applies the
    metric. ``num_tokens`` is what the chunk state passes the transport (the tokens a router of
    this rank sees: b·s, divided by TP under sequence parallelism); values are not sequence-sharded.
    """

    first_layer: int
    elements_per_token: int  # value heads on this rank × head dim
    tokens_factor: int  # TP size under sequence parallelism, else 1

    def layer_to_send(self, local_layers: list[int]) -> int | None:
        last = local_layers[-1]
        return last if last + 1 >= self.first_layer else None

    def layer_to_receive(self, local_layers: list[int]) -> int | None:
        first = local_layers[0]
        return first - 1 if first >= self.first_layer else None

    def numel(self, num_tokens: int) -> int:
        return num_tokens * self.tokens_factor * self.elements_per_token


def check_supported(config, settings: EllipticalSettings) -> None:
    """Refuse what the estimator cannot do; each message names the setting and the fix."""
    if getattr(config, "context_parallel_size", 1) > 1:
        raise ValueError(
            f"elliptical attention with context_parallel_size={config.context_parallel_size}: the metric "
            "is a mean over the whole sequence but context parallelism gives each rank a shard of it; "
            "set megatron.context_parallel_size: 1 or elliptical.enabled: false"
        )
    if getattr(config, "multi_latent_attention", False):
        raise ValueError("elliptical attention needs standard (GQA/MHA) self-attention, not multi-latent "
                         "attention: set elliptical.enabled: false or disable multi_latent_attention")
    if getattr(config, "cuda_graph_impl", "none") not in (None, "none"):
        raise ValueError(
            f"elliptical attention with cuda_graph_impl={config.cuda_graph_impl!r}: a captured graph would "
            "not replay the cross-layer hand-off of values; set megatron.cuda_graph_impl: none"
        )
    if getattr(config, "fine_grained_activation_offloading", False) and "core_attn" in (
            getattr(config, "offload_modules", None) or []):
        raise ValueError("elliptical attention keeps each layer's values for the next layer, but offloading "
                         "core_attn releases them: remove core_attn from megatron.offload_modules")
    if settings.first_layer > config.num_layers:
        raise ValueError(f"elliptical.first_layer={settings.first_layer} but the model has only "
                         f"{config.num_layers} layers; choose 2..{config.num_layers}")


def _value_heads_per_rank(config) -> int:
    tp = config.tensor_model_parallel_size
    groups = config.num_query_groups or config.num_attention_heads
    return 1 if groups < tp else groups // tp  # megatron's Attention: one group per rank when G < TP


def _with_core_attention(layer_spec, builder_of):
    """Copy of a decoder layer spec whose self-attention core attention is ``builder_of(old)``."""
    from megatron.core.transformer.attention import SelfAttentionSubmodules

    attn = getattr(layer_spec.submodules, "self_attention", None)
    subs = getattr(attn, "submodules", None)
    if not isinstance(subs, SelfAttentionSubmodules):
        raise ValueError(f"elliptical attention needs megatron's SelfAttention in every layer; got {attn!r}")
    new_subs = dataclasses.replace(subs, core_attention=builder_of(subs.core_attention))
    new_layer = dataclasses.replace(layer_spec.submodules, self_attention=dataclasses.replace(attn, submodules=new_subs))
    return dataclasses.replace(layer_spec, submodules=new_layer)


def value_handoff(config, settings: EllipticalSettings) -> ValueHandoff:
    """The pipeline hand-off plan of a model with elliptical attention (``plugin.attach``)."""
    return ValueHandoff(
        first_layer=settings.first_layer,
        elements_per_token=_value_heads_per_rank(config) * config.kv_channels,
        tokens_factor=config.tensor_model_parallel_size if config.sequence_parallel else 1,
    )


def elliptical_layer_specs(config, settings: EllipticalSettings | None, layer_numbers: list[int],
                           layer_specs: list) -> list:
    """Patch the decoder layers from ``first_layer − 1`` on (the one before only stores its values).
    Disabled settings: specs unchanged."""
    if settings is None or not settings.enabled:
        return list(layer_specs)
    check_supported(config, settings)

    def builder_of(core):
        if not isinstance(core, type):
            raise ValueError(f"elliptical attention wraps a core-attention class; this spec has {core!r}")
        return functools.partial(elliptical_core_attention(core), elliptical=settings)

    return [_with_core_attention(spec, builder_of) if n >= settings.first_layer - 1 else spec
            for n, spec in zip(layer_numbers, layer_specs)]
