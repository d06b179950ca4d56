"""Baseline routers the AC paper and our related papers compare with, as megatron ``TopKRouter``s.

Same plugin contract as ``routers.ACRouter``: each subclasses ``LabelSourceRouter`` (megatron's
``TopKRouter`` + label/metric recording), is registered in ``core/registry.py``, selected by
``acmoe.router`` and built through ``plugin.patch_block_spec``; all route *every* MoE layer (as in
the ACMoE repository's scripts).
The maths lives in pure functions (``xmoe_logits``, ``usmoe_scores``, ``usmoe_select``,
``etr_affinity``, ``expert_choice``, ``stablemoe_distill_loss``); the classes are thin adapters.
Specs: ``acmoe_spec.md`` §5 (XMoE, StableMoE) and ``related_routers.md`` §1–2 (ETR, USMoE).

* ``XMoERouter`` (Chi et al., NeurIPS 2022, §5.2): s_j = (W_p h) · e_j / ||e_j|| on a low-dimensional
  space (``xmoe_dim``, default E/2 as the ACMoE runs), expert embeddings ``orthogonal_(gain=0.32)``,
  token not normalised and no temperature (as released); megatron's top-k + softmax on top.
* ``StableMoELiteRouter`` (§5.3, the simplified stand-in the ACMoE code ran): s_j = h · e_j/||e_j||,
  e_j ∈ R^d ``orthogonal_(gain=0.32)`` — ``CosineRouter``'s scoring with that initialisation.
* ``StableMoERouter`` (Dai et al., ACL 2022, §5.3, the two-stage method): stage 1 routes by
  h · c_j (centroids ``orthogonal_(gain=0.1)``) and trains a lightweight router decoupled from the
  backbone — a token-id embedding (dim 50) with its own centroids — by distillation,
  CE(distilled affinities, argmax_j h·c_j) × 0.3. After ``stablemoe_stage1_fraction`` of
  ``train_iters`` the distilled router is frozen (copied into buffers, saved in checkpoints) and
  chooses the experts, for training and evaluation; the gate values still come from the trained
  main centroids, and stage 2 has no balance or distillation loss. Deviations (stated): stage 1
  balances with megatron's configured aux loss instead of StableMoE's own balance loss, the gate is
  megatron's score function over the selected experts instead of σ(h·c)·FFN(h) + (1−σ)·h (megatron's
  MoE layer has no token-residual term), and assignment is greedy top-k (no balanced assignment).
* ``USMoERouter`` (Do, Le, Tran, arXiv 2503.22996, §2.3–2.4): unified score
  (1 − r)·softmax(l) + r·(2/E)·sigmoid(l), then per *sequence* the top-(S·k) (token, expert) pairs
  over the flattened S×E scores; gates = unified scores, not renormalised. A token gets 0..E
  experts; the total is exactly S·k, so megatron's dropless dispatch holds. Under sequence
  parallelism "per sequence" is per local shard of the sequence.
* ``ETRRouter`` (Expert-Token Resonance, arXiv 2406.00023, §1.2–1.3): affinity δ_ti = cos(x_t, w_i)
  with the block-diagonal GrAP vectors w_i (n/d on group i, Eq. 2–4; trainable entries with
  ``etr_trainable_affinity``); token choice top-k by δ (Eq. 5, ℓ = k), then expert choice: each
  expert keeps at most C of the tokens that chose it, those of highest δ (Eq. 6), C = megatron's
  capacity for ``moe_expert_capacity_factor`` (required). Gates: megatron's score function over the
  selected δ (the paper does not say). Not implemented: the capacity schedule ("dynamic lower
  bound", rule not retrieved) and the locality loss (needs the node topology; μ not retrieved).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.moe_utils import (
    apply_router_token_dropping,
    compute_routing_scores_for_aux_loss,
    get_capacity,
    topk_routing_with_score_function,
)

from acmoe_megatron.core.settings import ACSettings
from acmoe_megatron.model import expert_norm as fixed_norm
from acmoe_megatron.model.routers import CosineRouter, LabelSourceRouter, router_dtype

# -- the maths ---------------------------------------------------------------------------------


def xmoe_logits(x_TD: torch.Tensor, proj_PD: torch.Tensor, emb_EP: torch.Tensor) -> torch.Tensor:
    """XMoE scores (W_p x) · e_j / ||e_j||: projection to P dims, unit-norm expert embeddings."""
    return (x_TD @ proj_PD.t()) @ F.normalize(emb_EP, dim=-1).t()


def usmoe_scores(logits_TE: torch.Tensor, rate: float) -> torch.Tensor:
    """USMoE unified score: (1 − r)·softmax (token side) + r·(2/E)·sigmoid (expert side)."""
    E = logits_TE.shape[-1]
    return (1.0 - rate) * torch.softmax(logits_TE, dim=-1) + rate * torch.sigmoid(logits_TE) * (2.0 / E)


def usmoe_select(scores_SBE: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence b, the top-(S·k) pairs of the flattened [S·E] scores; returns [S·B, E] maps.

    Gates are the unified scores of the selected pairs (no renormalisation, as released).
    """
    S, B, E = scores_SBE.shape
    flat_BX = scores_SBE.permute(1, 0, 2).reshape(B, S * E)
    idx = flat_BX.topk(S * topk, dim=-1, sorted=False).indices
    map_BX = torch.zeros_like(flat_BX, dtype=torch.bool).scatter_(1, idx, True)
    map_TE = map_BX.view(B, S, E).permute(1, 0, 2).reshape(S * B, E)
    probs_TE = scores_SBE.reshape(S * B, E) * map_TE
    return probs_TE, map_TE


def etr_affinity(x_TD: torch.Tensor, w_EG: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """δ_ti = cos(x_t, w_i), w_i = the block-diagonal GrAP vector (entries w_EG[i] on group i)."""
    T, D = x_TD.shape
    E, G = w_EG.shape
    dots_TE = (x_TD.view(T, E, G) * w_EG).sum(-1)
    return dots_TE / (x_TD.norm(dim=-1, keepdim=True) * w_EG.norm(dim=-1) + eps)


def expert_choice(affinity_TE: torch.Tensor, candidates_TE: torch.Tensor, capacity: int) -> torch.Tensor:
    """ETR Eq. 6: each expert keeps its ``capacity`` highest-affinity candidates (a bool map)."""
    T = affinity_TE.shape[0]
    if capacity >= T:
        return candidates_TE
    masked = affinity_TE.detach().masked_fill(~candidates_TE, float("-inf"))
    keep_idx = masked.topk(capacity, dim=0, sorted=False).indices
    keep_TE = torch.zeros_like(candidates_TE).scatter_(0, keep_idx, True)
    return candidates_TE & keep_TE


STABLEMOE_DISTILL_LOSS = "stablemoe_distill_loss"  # its name in megatron's MoE metrics (TensorBoard)


def stablemoe_distill_loss(distilled_logits_TE: torch.Tensor, main_logits_TE: torch.Tensor) -> torch.Tensor:
    """StableMoE stage 1: CE(distilled affinities, argmax_j of the main router's affinities)."""
    target_T = main_logits_TE.detach().argmax(dim=-1)
    return F.cross_entropy(distilled_logits_TE.float(), target_T)


# -- megatron adapters -------------------------------------------------------------------------


def _new_param(tensor: torch.Tensor, config, requires_grad: bool = True) -> torch.nn.Parameter:
    p = torch.nn.Parameter(tensor.to(config.params_dtype), requires_grad=requires_grad)
    # Replicated across TP ranks, which see different sequence shards under SP: megatron
    # all-reduces the gradients of parameters marked like this (as it does for its router weight).
    setattr(p, "sequence_parallel", config.sequence_parallel)
    return p


def _orthogonal(rows: int, cols: int, gain: float, config) -> torch.Tensor:
    w = torch.empty(rows, cols, dtype=torch.float32)
    if config.perform_initialization:
        torch.nn.init.orthogonal_(w, gain=gain)
    return w


def _to_device(param: torch.Tensor, device) -> None:
    if param.device != device:
        param.data = param.data.to(device=device)


def _capacity(router, probs: torch.Tensor, routing_map: torch.Tensor):
    """megatron's token dropping when ``moe_expert_capacity_factor`` is set (as ``TopKRouter``)."""
    config = router.config
    if config.moe_expert_capacity_factor is None:
        return probs, routing_map
    return apply_router_token_dropping(
        probs, routing_map, router_topk=router.topk, capacity_factor=config.moe_expert_capacity_factor,
        drop_policy=config.moe_token_drop_policy, pad_to_capacity=config.moe_pad_expert_input_to_capacity,
    )


class XMoERouter(LabelSourceRouter, fixed_norm.ExpertEmbeddingOwner):
    """XMoE: cosine-type routing on a low-dimensional hypersphere (see module docstring)."""

    def __init__(self, *, config, pg_collection=None, is_mtp_layer=False,
                 settings: ACSettings = ACSettings(router="xmoe"), **kw):
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer, settings=settings,
                         **kw)
        dim = settings.xmoe_dim or max(1, self.num_experts // 2)
        emb = _orthogonal(self.num_experts, dim, fixed_norm.ORTHOGONAL_GAIN, config)
        self.expert_norm = settings.expert_norm  # the release rescales XMoE's rows to 1.5 too
        if settings.expert_norm is not None and config.perform_initialization:
            fixed_norm.rescale_rows_(emb, settings.expert_norm)
        self.weight = _new_param(emb, config)  # e_j
        proj = torch.empty(dim, config.hidden_size, dtype=torch.float32)
        if config.perform_initialization:
            config.init_method(proj)
        self.proj = _new_param(proj, config)  # W_p
        self.bias = None  # XMoE scores have no bias

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        _to_device(self.weight, input.device)
        _to_device(self.proj, input.device)
        dtype = router_dtype(self.config)
        x_TD = input.reshape(-1, input.shape[-1]).to(dtype)
        logits_TE = xmoe_logits(x_TD, self.proj.to(dtype), self.weight.to(dtype))
        return logits_TE.view(*input.shape[:-1], self.num_experts)


class StableMoELiteRouter(CosineRouter):
    """The ACMoE code's StableMoE stand-in: cosine routing, e_j ``orthogonal_(gain=0.32)``."""

    def __init__(self, *, config, pg_collection=None, is_mtp_layer=False,
                 settings: ACSettings = ACSettings(router="stablemoe-lite"), **kw):
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer,
                         settings=settings, **kw)
        if config.perform_initialization and settings.expert_norm is None:  # else CosineRouter's fixed-norm init
            with torch.no_grad():
                self.weight.copy_(_orthogonal(self.num_experts, config.hidden_size, fixed_norm.ORTHOGONAL_GAIN, config))


class USMoERouter(LabelSourceRouter):
    """USMoE: unified token/expert score, per-sequence global top-(S·k) selection."""

    def __init__(self, *, config, pg_collection=None, is_mtp_layer=False,
                 settings: ACSettings = ACSettings(router="usmoe"), **kw):
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer, settings=settings,
                         **kw)
        self.rate = settings.usmoe_rate
        if self.routing_type in ("sinkhorn", "quantile_balancing") or self.config.moe_router_num_groups:
            raise ValueError(
                f"acmoe.router=usmoe chooses its own (token, expert) pairs; it cannot be combined "
                f"with moe_router_load_balancing_type={self.routing_type!r} or group-limited routing"
            )

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        if padding_mask is not None:
            raise ValueError("acmoe.router=usmoe: padding masks are not supported (its budget is per sequence)")
        S, B = logits.shape[:2]
        logits_TE = self.apply_z_loss(logits.view(-1, self.num_experts))
        scores_TE = usmoe_scores(logits_TE.float(), self.rate)
        probs, routing_map = usmoe_select(scores_TE.view(S, B, self.num_experts), self.topk)
        probs = probs.type_as(logits_TE)
        probs, routing_map = _capacity(self, probs, routing_map)
        if self.training and torch.is_grad_enabled() and self.is_aux_loss_enabled():
            # megatron's balance losses on the token-side probabilities and the actual selection
            tc_TE = torch.softmax(logits_TE.float(), dim=-1)
            probs = self._apply_aux_loss(probs, tc_TE, routing_map)
            probs = self._apply_seq_aux_loss(probs, tc_TE, routing_map, S, B)
            probs = self._apply_global_aux_loss(probs, tc_TE, routing_map)
        self._apply_expert_bias(routing_map)
        # a token's preferred expert = its best unified score (selected whenever the token is)
        self._record(logits_TE, probs, routing_map, preferred_T=scores_TE.detach().argmax(-1))
        return probs, routing_map


class ETRRouter(LabelSourceRouter):
    """Expert-Token Resonance: GrAP cosine affinity, token choice then capacity-bounded expert choice."""

    def __init__(self, *, config, pg_collection=None, is_mtp_layer=False,
                 settings: ACSettings = ACSettings(router="etr"), **kw):
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer, settings=settings,
                         **kw)
        E, D = self.num_experts, config.hidden_size
        problems = []
        if D % E:
            problems.append(f"hidden_size={D} must be divisible by num_experts={E} (GrAP splits the "
                            "hidden dimensions into one group per expert)")
        if config.moe_expert_capacity_factor is None:
            problems.append("set megatron.moe_expert_capacity_factor (e.g. 1.25): ETR's expert choice "
                            "keeps at most that capacity per expert, and megatron's dispatcher must "
                            "expect a variable number of routed tokens")
        if config.moe_pad_expert_input_to_capacity:
            problems.append("megatron.moe_pad_expert_input_to_capacity is not supported (ETR drops, never pads)")
        if self.routing_type in ("sinkhorn", "quantile_balancing") or config.moe_router_num_groups:
            problems.append(f"moe_router_load_balancing_type={self.routing_type!r} / group-limited "
                            "routing cannot be combined with ETR's own selection")
        if problems:
            raise ValueError("acmoe.router=etr: " + "; ".join(problems))
        w = torch.full((E, D // E), E / D, dtype=torch.float32)  # Eq. 3: n/d on the expert's group
        self.weight = _new_param(w, config, requires_grad=settings.etr_trainable_affinity)
        self.bias = None

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        _to_device(self.weight, input.device)
        dtype = router_dtype(self.config)
        x_TD = input.reshape(-1, input.shape[-1]).to(dtype)
        return etr_affinity(x_TD, self.weight.to(dtype)).view(*input.shape[:-1], self.num_experts)

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        S, B = logits.shape[:2]
        aff_TE = logits.view(-1, self.num_experts)
        if padding_mask is not None:
            padding_mask = padding_mask.reshape(-1)
        probs, candidates = topk_routing_with_score_function(  # token choice, Eq. 5
            aff_TE, self.topk, use_pre_softmax=self.config.moe_router_pre_softmax,
            scaling_factor=self.config.moe_router_topk_scaling_factor,
            score_function=self.score_function, expert_bias=self.expert_bias,
        )
        if padding_mask is not None:
            candidates = candidates & ~padding_mask.unsqueeze(-1)
        capacity = get_capacity(aff_TE.shape[0] * self.topk, self.num_experts,
                                self.config.moe_expert_capacity_factor)
        routing_map = expert_choice(aff_TE, candidates, capacity)  # Eq. 6
        probs = probs * routing_map
        if self.training and torch.is_grad_enabled() and self.is_aux_loss_enabled():
            aux_map, aux_scores = compute_routing_scores_for_aux_loss(
                aff_TE, self.topk, self.score_function, padding_mask=padding_mask)
            with_pad = padding_mask is not None
            probs = self._apply_aux_loss(probs, aux_scores, aux_map, with_padding_mask=with_pad)
            probs = self._apply_seq_aux_loss(probs, aux_scores, aux_map, S, B, with_padding_mask=with_pad)
            probs = self._apply_global_aux_loss(probs, aux_scores, aux_map, with_padding_mask=with_pad)
        self._apply_expert_bias(routing_map, padding_mask=padding_mask)
        self._record(aff_TE, probs, routing_map)  # labels: top-1 affinity before expert choice
        return probs, routing_map


class StableMoERouter(LabelSourceRouter):
    """StableMoE's two stages: distil a token-id router while training, then route with it frozen."""

    reported_losses: ClassVar[tuple[str, ...]] = (STABLEMOE_DISTILL_LOSS,)

    @classmethod
    def spec_kwargs(cls, settings: ACSettings, *, vocab_size: int | None = None) -> dict:
        return {"settings": settings, "vocab_size": vocab_size}

    def __init__(self, *, config, pg_collection=None, is_mtp_layer=False,
                 settings: ACSettings = ACSettings(router="stablemoe"),
                 vocab_size: int | None = None, **kw):
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer, settings=settings,
                         **kw)
        if vocab_size is None:
            raise ValueError("acmoe.router=stablemoe needs the vocabulary size (its distilled router "
                             "embeds token ids): pass vocab_size to acmoe_megatron.plugin.patch_block_spec")
        if config.context_parallel_size > 1:
            raise ValueError("acmoe.router=stablemoe does not support context parallelism (token ids "
                             "of a CP shard are not available to the router)")
        E, dim = self.num_experts, settings.stablemoe_distill_dim
        with torch.no_grad():
            self.weight.copy_(_orthogonal(E, config.hidden_size, 0.1, config).to(self.weight.dtype))
        emb = torch.empty(vocab_size, dim, dtype=torch.float32)
        if config.perform_initialization:
            config.init_method(emb)
        self.distill_embedding = _new_param(emb, config)
        self.distill_centroids = _new_param(_orthogonal(E, dim, 0.1, config), config)
        # the frozen stage-2 router: copies taken at the switch, part of the checkpoint
        self.register_buffer("frozen_embedding", torch.zeros(vocab_size, dim))
        self.register_buffer("frozen_centroids", torch.zeros(E, dim))
        self.register_buffer("frozen", torch.zeros(1, dtype=torch.long))
        self._frozen = False
        self.stage1_fraction = settings.stablemoe_stage1_fraction
        self.distill_coeff = settings.stablemoe_distill_coeff

    # -- inputs from the step -----------------------------------------------------------------

    def _local_token_ids(self, num_tokens: int) -> torch.Tensor:
        """Token ids in the router's [S(/TP under SP), B] order, flattened."""
        tokens_BS = self.chunk_state.tokens()
        ids_SB = tokens_BS.t()
        if self.config.sequence_parallel and self.tp_group.size() > 1:
            ids_SB = ids_SB.chunk(self.tp_group.size(), dim=0)[self.tp_group.rank()]
        ids_T = ids_SB.reshape(-1)
        if ids_T.numel() != num_tokens:
            raise RuntimeError(f"StableMoERouter: {num_tokens} router tokens but {ids_T.numel()} token ids")
        return ids_T

    def in_stage2(self) -> bool:
        if self._frozen:
            return True
        iteration, train_iters = self.chunk_state.progress()
        if train_iters is None:
            return False
        return iteration >= math.ceil(self.stage1_fraction * train_iters)

    # -- routing ------------------------------------------------------------------------------

    @torch.no_grad()
    def _freeze(self) -> None:
        self.frozen_embedding.copy_(self.distill_embedding.detach().float())
        self.frozen_centroids.copy_(self.distill_centroids.detach().float())
        self.frozen.fill_(1)
        self._frozen = True

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        ids_T = self._local_token_ids(logits.shape[0] * logits.shape[1])
        if not self.in_stage2():
            probs, routing_map = super().routing(logits, padding_mask=padding_mask)  # + label record
            if self.training and torch.is_grad_enabled() and self.distill_coeff > 0:
                _to_device(self.distill_embedding, logits.device)
                _to_device(self.distill_centroids, logits.device)
                distilled_TE = self.distill_embedding[ids_T].float() @ self.distill_centroids.float().t()
                loss = stablemoe_distill_loss(distilled_TE, logits.view(-1, self.num_experts))
                probs = self.attach_and_log_load_balancing_loss(
                    probs, self.distill_coeff, self.distill_coeff * loss, STABLEMOE_DISTILL_LOSS,
                    self.tp_cp_group, valid_token_count=ids_T.numel(),
                )
            return probs, routing_map
        if not self._frozen:
            self._freeze()
        logits_TE = logits.view(-1, self.num_experts)
        with torch.no_grad():
            distilled_TE = self.frozen_embedding[ids_T] @ self.frozen_centroids.t()
            indices = distilled_TE.topk(self.topk, dim=-1).indices
        probs, routing_map = topk_routing_with_score_function(
            logits_TE, self.topk, use_pre_softmax=self.config.moe_router_pre_softmax,
            scaling_factor=self.config.moe_router_topk_scaling_factor,
            score_function=self.score_function, precomputed_indices=indices,
        )
        probs, routing_map = _capacity(self, probs, routing_map)
        self._record(logits_TE, probs, routing_map, preferred_T=indices[:, 0])
        return probs, routing_map

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._frozen = bool(self.frozen.item())  # resumed in stage 2: keep the frozen router
