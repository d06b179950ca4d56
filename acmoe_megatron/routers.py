"""megatron-core routers: the AC router (ACMoE, Definition 2), its M = I ablation, and label sources.

All three subclass megatron's ``TopKRouter`` and change only ``gating`` (how logits are made) and
``routing`` (recording this layer's top-1 labels for the next AC layer). Megatron's own top-k,
softmax/sigmoid scores, group-limited routing, capacity dropping, aux / seq-aux / global-aux losses,
z-loss, expert bias and the token dispatch all run unchanged on top of the AC logits.

* ``LabelSourceRouter``: megatron's linear top-k router (the SMoE baseline, spec §5.1) that also
  records labels; used by the first MoE layer(s) of an ACMoE model, which have no predecessor.
* ``ACRouter``: s_ij = (x_i ⊙ m_{c_i}) · e_j / ||e_j|| with m from ``ac_stats`` and the previous
  MoE layer's top-1 labels c_i. The experts receive the untransformed token (LM release, spec
  §3.1). Statistics and scores are fp32 (fp64 with ``moe_router_dtype: fp64``) whatever the
  training precision; the transform carries no gradient.
* ``CosineRouter``: the same scoring with M = I, the ablation that isolates the effect of M.

``acmoe.expert_norm`` (ac, cosine and the baselines with expert embeddings): the release's
``orthogonal_(gain=0.32)`` init and rows held at that norm after every optimizer step
(expert_norm.py); ``null`` keeps megatron's N(0, init_method_std) init and a free norm.

Statistics **scope** (whose tokens the per-cluster mean/MAD are computed over):
``local`` = this rank's tokens (under sequence parallelism: its shard of the sequence);
``tp`` (default) = all tokens of the micro-batch on this data-parallel replica (all-reduce over
megatron's ``tp_cp`` group), so the statistics and every routing decision are independent of the
TP/SP/CP layout — identical to the paper's per-micro-batch statistics; ``dp`` = all replicas'
micro-batches (all-reduce over ``tp_dp_cp``).
Statistics **source**: ``batch`` (the paper; a token's weights depend on the other tokens of its
micro-batch, including later tokens of its own sequence — a non-causal leak in a causal LM, and
batch-dependent evaluation) or ``ema`` (running per-expert mean/MAD, updated after use from the
global batch statistics, saved in checkpoints: causal-safe and batch-independent).

The builder signature megatron calls is ``router(config=, pg_collection=, is_mtp_layer=)``; our
settings are bound beforehand with ``functools.partial`` (spec.py): no field is added to megatron's
``TransformerConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.router import TopKRouter

from acmoe_megatron import ac_stats, expert_norm
from acmoe_megatron.labels import LabelCarrier, LayerLabels, labels_from_routing

# ac / cosine route MoE layers from ``first_ac_layer`` on (earlier ones: megatron's top-k); the
# baselines (baseline_routers.py) route every MoE layer, as in their papers' and ACMoE's scripts.
BASELINE_ROUTERS = ("xmoe", "stablemoe", "stablemoe-lite", "usmoe", "etr")
ROUTER_TYPES = ("ac", "cosine", "topk") + BASELINE_ROUTERS
SCOPES = ("local", "tp", "dp")
SOURCES = ("batch", "ema")
# The constant sets of the three official code bases (spec §3.4): eps, clip, normalisation.
PRESETS = {
    "lm": dict(eps=1e-4, clip=10.0, norm="feature"),
    "swin": dict(eps=1e-4, clip=1.5, norm="global_pre"),
    "softmoe": dict(eps=0.35, clip=5.0, norm="global_post"),
}


@dataclass(frozen=True)
class ACSettings:
    """Router settings (YAML section ``acmoe``; AC defaults = the LM release).

    The ``xmoe_*``, ``usmoe_*``, ``etr_*`` and ``stablemoe_*`` keys belong to the baseline routers
    of ``baseline_routers.py`` (see each class for the paper's equation).
    """

    router: str = "ac"  # ac | cosine | topk | xmoe | stablemoe | stablemoe-lite | usmoe | etr
    first_ac_layer: int = 3  # 1-based ordinal among MoE layers where AC starts (paper: 3)
    preset: str = "lm"  # lm | swin | softmoe: eps/clip/norm of that code base (spec §3.4)
    eps: float | None = None  # ε in 1 / (MAD + ε); None = the preset's
    clip: float | None = None  # clip weights at clip × mean(weights); None = the preset's
    norm: str | None = None  # feature | global_pre | global_post; None = the preset's
    mode: str = "release"  # release (official code) | clean (small clusters get M = I)
    min_cluster_size: int = 2  # clean mode: clusters with fewer tokens get M = I
    scope: str = "tp"  # local | tp | dp: tokens the statistics are computed over
    source: str = "batch"  # batch (paper) | ema (causal-safe running statistics)
    ema_decay: float = 0.99
    compile: bool = False  # torch.compile the statistics, weights and scores (fewer kernel launches)
    # Row norm of the expert embeddings (ac, cosine, xmoe, stablemoe-lite): orthogonal init, rows
    # rescaled to this norm after every optimizer step (the release: 1.5); null = megatron's init,
    # free norm. No effect on routers without expert embeddings (topk, usmoe, etr, stablemoe).
    expert_norm: float | None = None
    xmoe_dim: int | None = None  # XMoE routing-space dimension; None = num_experts // 2 (ACMoE's runs: 8 for 16)
    usmoe_rate: float = 0.5  # USMoE r in (1 - r)·softmax + r·(2/E)·sigmoid (official code: 0.5)
    etr_trainable_affinity: bool = False  # ETR: learn the block-diagonal affinity entries (Eq. 3 fixes them)
    stablemoe_stage1_fraction: float = 0.1  # StableMoE: fraction of train_iters before the router is frozen
    stablemoe_distill_dim: int = 50  # StableMoE distilled router: token-embedding dimension (paper: 50)
    stablemoe_distill_coeff: float = 0.3  # StableMoE: weight of the stage-1 distillation loss (paper: 0.3)

    def __post_init__(self):
        checks = [
            (self.router in ROUTER_TYPES, f"acmoe.router={self.router!r}: choose one of {ROUTER_TYPES}"),
            (self.first_ac_layer >= 1, f"acmoe.first_ac_layer={self.first_ac_layer}: must be >= 1 "
                                       "(1-based MoE layer index; the paper's medium models use 3)"),
            (self.preset in PRESETS, f"acmoe.preset={self.preset!r}: choose one of {tuple(PRESETS)}"),
            (self.mode in ac_stats.MODES, f"acmoe.mode={self.mode!r}: choose one of {ac_stats.MODES}"),
            (self.norm is None or self.norm in ac_stats.NORMS,
             f"acmoe.norm={self.norm!r}: choose one of {ac_stats.NORMS}"),
            (self.scope in SCOPES, f"acmoe.scope={self.scope!r}: choose one of {SCOPES}"),
            (self.source in SOURCES, f"acmoe.source={self.source!r}: choose one of {SOURCES}"),
            (self.eps is None or self.eps > 0, "acmoe.eps must be > 0"),
            (self.clip is None or self.clip > 0, "acmoe.clip must be > 0"),
            (0.0 < self.ema_decay < 1.0, "acmoe.ema_decay must be in (0, 1)"),
            (not self.compile or self.router in ("ac", "cosine"),
             f"acmoe.compile applies to the ac and cosine routers, not {self.router!r}: remove it"),
            (self.min_cluster_size >= 1, "acmoe.min_cluster_size must be >= 1"),
            (self.expert_norm is None or (isinstance(self.expert_norm, (int, float))
                                          and not isinstance(self.expert_norm, bool) and self.expert_norm > 0),
             f"acmoe.expert_norm={self.expert_norm!r}: give a positive row norm (the release: 1.5) or null"),
            (self.xmoe_dim is None or self.xmoe_dim >= 1, "acmoe.xmoe_dim must be >= 1 (or null)"),
            (0.0 <= self.usmoe_rate <= 1.0, "acmoe.usmoe_rate must be in [0, 1]"),
            (0.0 <= self.stablemoe_stage1_fraction <= 1.0, "acmoe.stablemoe_stage1_fraction must be in [0, 1]"),
            (self.stablemoe_distill_dim >= 1, "acmoe.stablemoe_distill_dim must be >= 1"),
            (self.stablemoe_distill_coeff >= 0, "acmoe.stablemoe_distill_coeff must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def constants(self) -> dict:
        """eps, clip, norm: explicit settings override the preset's."""
        out = dict(PRESETS[self.preset])
        out.update({k: v for k, v in (("eps", self.eps), ("clip", self.clip), ("norm", self.norm)) if v is not None})
        return out


def _router_dtype(config) -> torch.dtype:
    return torch.float64 if config.moe_router_dtype == "fp64" else torch.float32


def _fixed_norm_init(rows: int, cols: int, norm: float) -> torch.Tensor:
    """The release's expert embeddings before the first forward: orthogonal, every row at ``norm``."""
    return expert_norm.orthogonal_rows(rows, cols, norm)


class LabelSourceRouter(TopKRouter):
    """Megatron's ``TopKRouter`` that also records each token's top-1 expert for the next layer."""

    def __init__(self, *, config, pg_collection=None, is_mtp_layer=False, label_carrier=None,
                 metrics=None, ema_buffers: bool = False, **kw):
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer, **kw)
        # Plain attributes (not submodules): carrier and metrics belong to the model chunk.
        self.label_carrier: LabelCarrier | None = label_carrier
        self.metrics = metrics
        if ema_buffers:
            # AC running statistics (used by ACRouter with source=ema). Every MoE router of such a
            # model carries them, because megatron's torch_dist checkpoint stacks a layer's state
            # across all MoE layers and refuses keys that only some layers have.
            device = self.weight.device
            self.register_buffer("ac_ema_count", torch.zeros(self.num_experts, device=device))
            self.register_buffer("ac_ema_mad", torch.zeros(self.num_experts, config.hidden_size, device=device))

    def _recording(self) -> bool:
        """Metrics once per step: training, and the grad-enabled pass under recompute."""
        return self.metrics is not None and self.training and torch.is_grad_enabled() and not self.is_mtp_layer

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        probs, routing_map = super().routing(logits, padding_mask=padding_mask)
        self._record(logits, probs, routing_map)
        return probs, routing_map

    def _record(self, logits: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor,
                preferred_T: torch.Tensor | None = None) -> None:
        """Labels for the next AC layer (and metrics). ``preferred_T``: a router's own top-1."""
        if self.label_carrier is not None and not self.is_mtp_layer:
            if preferred_T is not None:
                labels = LayerLabels(preferred_T, labels_from_routing(probs, routing_map).max_label)
            elif self.config.moe_expert_capacity_factor is None:
                labels = labels_from_routing(probs, routing_map)
            else:  # a dropped token keeps the expert it chose: top-1 by routing score, pre-drop
                scores = logits.detach().reshape(-1, self.num_experts).float()
                if self.expert_bias is not None:
                    scores = scores + self.expert_bias.float()
                labels = LayerLabels(scores.argmax(-1), labels_from_routing(probs, routing_map).max_label)
            self.label_carrier.put_labels(self.layer_number, labels)
            if self._recording():
                prev = self.label_carrier.previous_labels(self.layer_number)
                self.metrics.record_routing(self.layer_number, logits, routing_map, labels.top1_T,
                                            None if prev is None else prev.top1_T, self.topk)


class CosineRouter(LabelSourceRouter, expert_norm.ExpertEmbeddingOwner):
    """Unit-norm expert embeddings on the raw token: s_ij = x_i · e_j / ||e_j|| (M = I)."""

    def __init__(self, *, compile_scores: bool = False, expert_norm: float | None = None, **kw):
        super().__init__(**kw)
        self.compile_scores = compile_scores  # acmoe.compile
        self.expert_norm = expert_norm  # rows kept at this norm by the optimizer hook (expert_norm.py)
        if expert_norm is not None and self.config.perform_initialization:
            with torch.no_grad():
                self.weight.copy_(_fixed_norm_init(self.num_experts, self.config.hidden_size, expert_norm))

    def _transform(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(w_KD, labels_T): M_{c_i} = diag(w[c_i]); None is M = I."""
        return None

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        # Router.gating moves CPU-initialised weights to the current device; keep that contract.
        if self.weight.device != input.device:
            self.weight.data = self.weight.data.to(device=input.device)
        x_TD = input.reshape(-1, input.shape[-1])  # cast inside: only the statistics keep an fp32 copy
        with ac_stats.no_autocast(x_TD.device):  # statistics in fp32 whatever the training precision
            w_KD, labels_T = self._transform(x_TD) or (None, None)
        logits_TE = ac_stats.ac_scores(x_TD, self.weight, w_KD, labels_T, dtype=_router_dtype(self.config),
                                       compile=self.compile_scores)
        return logits_TE.view(*input.shape[:-1], self.num_experts)


class ACRouter(CosineRouter):
    """The Adaptive Clustering router: cosine scores in the space transformed by M_{c_i}."""

    def __init__(self, *, config, pg_collection=None, is_mtp_layer=False, label_carrier=None,
                 metrics=None, ac: ACSettings = ACSettings(), **kw):
        kw["ema_buffers"] = ac.source == "ema"  # running statistics, part of the checkpoint
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer,
                         label_carrier=label_carrier, metrics=metrics, compile_scores=ac.compile,
                         expert_norm=ac.expert_norm, **kw)
        self.ac = ac
        self.ac_constants = ac.constants()

    def _group(self, scope: str):
        group = {"local": None, "tp": self.tp_cp_group, "dp": self.tp_dp_cp_group}[scope]
        if group is None or dist.get_world_size(group) == 1:
            return None
        return group

    def _transform(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.label_carrier is None:
            raise RuntimeError("ACRouter built without a label carrier; build it via acmoe_megatron.spec")
        labels = self.label_carrier.get(self.layer_number, x_TD.shape[0])
        c = self.ac_constants
        if self.ac.source == "ema":
            w_KD = self._ema_weights()
            if self.training and torch.is_grad_enabled():  # once per step, also under recompute
                self._ema_update(x_TD, labels.top1_T)
            return w_KD, labels.top1_T
        group = self._group(self.ac.scope)
        all_reduce = None if group is None else (lambda t: dist.all_reduce(t, group=group))
        max_label = labels.max_label
        if group is not None and self.ac.mode == "release":
            max_label = max_label.clone()
            dist.all_reduce(max_label, op=dist.ReduceOp.MAX, group=group)
        kw = dict(eps=c["eps"], clip=c["clip"], norm=c["norm"], mode=self.ac.mode, max_label=max_label,
                  min_cluster_size=self.ac.min_cluster_size)
        if group is None:  # statistics and weights in one function: one compile unit
            local_weights = ac_stats.compiled(ac_stats.local_weights, self.ac.compile)
            w_KD, stats = local_weights(x_TD, labels.top1_T, self.num_experts, **kw)
        else:
            stats = ac_stats.cluster_stats(x_TD, labels.top1_T, self.num_experts, all_reduce)
            w_KD = ac_stats.compiled(ac_stats.weights_from_stats, self.ac.compile)(stats.mad_KD, stats.counts_K, **kw)
        if self._recording():
            rows_K = ac_stats.cluster_rows(stats.counts_K, self.ac.mode, max_label, self.ac.min_cluster_size)
            self.metrics.record_ac(self.layer_number, stats.counts_K, stats.mean_KD, stats.mad_KD, w_KD,
                                   rows_K, c["eps"], c["clip"])
        return w_KD, labels.top1_T

    @torch.no_grad()
    def _ema_weights(self) -> torch.Tensor:
        c = self.ac_constants
        seen_K = self.ac_ema_count > 0
        w_KD = ac_stats.weights_from_stats(
            self.ac_ema_mad, seen_K.float() * float(self.ac.min_cluster_size), eps=c["eps"],
            clip=c["clip"], norm=c["norm"], mode="clean", min_cluster_size=self.ac.min_cluster_size,
        )
        return w_KD  # clusters never seen keep M = I

    @torch.no_grad()
    def _ema_update(self, x_TD: torch.Tensor, labels_T: torch.Tensor) -> None:
        """Blend in this micro-batch's global statistics (all replicas: EMA equal on every rank)."""
        group = self._group("dp")
        all_reduce = None if group is None else (lambda t: dist.all_reduce(t, group=group))
        stats = ac_stats.cluster_stats(x_TD, labels_T, self.num_experts, all_reduce)
        present_K1 = (stats.counts_K > 0).unsqueeze(1)
        first_K1 = (self.ac_ema_count == 0).unsqueeze(1)
        d = self.ac.ema_decay
        blended_KD = torch.where(first_K1, stats.mad_KD, d * self.ac_ema_mad + (1 - d) * stats.mad_KD)
        self.ac_ema_mad.copy_(torch.where(present_K1, blended_KD, self.ac_ema_mad))
        self.ac_ema_count.add_(stats.counts_K)
