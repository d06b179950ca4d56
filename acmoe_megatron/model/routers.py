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
Outside training (``eval()``) an AC router routes with a fixed transform when it has one
(``inference_weights``): the EMA's, or a ``batch``-trained model's calibrated table
(inference/calibration.py); without one it falls back to the batch statistics, as the paper evaluates.

The builder signature megatron calls is ``router(config=, pg_collection=, is_mtp_layer=)``; our
settings are bound beforehand by ``plugin.patch_block_spec`` (``spec_kwargs``): no field is added to megatron's
``TransformerConfig``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.router import TopKRouter

from acmoe_megatron.core import ac_stats
from acmoe_megatron.core.labels import LayerLabels, labels_from_routing
from acmoe_megatron.core.settings import ACSettings
from acmoe_megatron.model import expert_norm
from acmoe_megatron.model.chunk_state import UsesChunkState


def router_dtype(config) -> torch.dtype:
    """The dtype of the router maths: fp64 with ``moe_router_dtype: fp64``, else fp32."""
    return torch.float64 if config.moe_router_dtype == "fp64" else torch.float32


def _fixed_norm_init(rows: int, cols: int, norm: float) -> torch.Tensor:
    """The release's expert embeddings before the first forward: orthogonal, every row at ``norm``."""
    return expert_norm.orthogonal_rows(rows, cols, norm)


class LabelSourceRouter(TopKRouter, UsesChunkState):
    """Megatron's ``TopKRouter`` that also records each token's top-1 expert for the next layer.

    The base of every router of ours. Its name, the layers it routes (``from_first_ac_layer``) and
    its HF export are its entry in ``core/registry.py``; a class gives the behaviour:
    ``reported_losses`` (losses it records through megatron's MoE metrics tracker beyond megatron's
    own) and ``spec_kwargs`` (what ``spec.patch_block_spec`` binds to the builder megatron calls as
    ``router(config=, pg_collection=, is_mtp_layer=)``).
    """

    reported_losses: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def spec_kwargs(cls, settings: ACSettings, *, vocab_size: int | None = None) -> dict:
        return {"settings": settings}

    def __init__(self, *, config, pg_collection=None, is_mtp_layer=False, settings: ACSettings = ACSettings(),
                 **kw):
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer, **kw)
        self.settings = settings
        if settings.router == "ac" and settings.source == "ema":
            # AC running statistics (used by ACRouter with source=ema). Every MoE router of such a
            # model carries them, because megatron's torch_dist checkpoint stacks a layer's state
            # across all MoE layers and refuses keys that only some layers have.
            device = self.weight.device
            self.register_buffer("ac_ema_count", torch.zeros(self.num_experts, device=device))
            self.register_buffer("ac_ema_mad", torch.zeros(self.num_experts, config.hidden_size, device=device))

    def _recording(self) -> bool:
        """Metrics once per step: training, and the grad-enabled pass under recompute."""
        return (self.chunk_state.metrics is not None and self.training and torch.is_grad_enabled()
                and not self.is_mtp_layer)

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        probs, routing_map = super().routing(logits, padding_mask=padding_mask)
        self._record(logits, probs, routing_map)
        return probs, routing_map

    def _record(self, logits: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor,
                preferred_T: torch.Tensor | None = None) -> None:
        """Labels for the next AC layer (and metrics). ``preferred_T``: a router's own top-1."""
        if not self.is_mtp_layer:
            state = self.chunk_state
            if preferred_T is not None:
                labels = LayerLabels(preferred_T, labels_from_routing(probs, routing_map).max_label)
            elif self.config.moe_expert_capacity_factor is None:
                labels = labels_from_routing(probs, routing_map)
            else:  # a dropped token keeps the expert it chose: top-1 by routing score, pre-drop
                scores = logits.detach().reshape(-1, self.num_experts).float()
                if self.expert_bias is not None:
                    scores = scores + self.expert_bias.float()
                labels = LayerLabels(scores.argmax(-1), labels_from_routing(probs, routing_map).max_label)
            state.put_labels(self.layer_number, labels)
            if self._recording():
                prev = state.previous_labels(self.layer_number)
                state.metrics.record_routing(self.layer_number, logits, routing_map, labels.top1_T,
                                            None if prev is None else prev.top1_T, self.topk)


class CosineRouter(LabelSourceRouter, expert_norm.ExpertEmbeddingOwner):
    """Unit-norm expert embeddings on the raw token: s_ij = x_i · e_j / ||e_j|| (M = I)."""

    def __init__(self, *, settings: ACSettings = ACSettings(router="cosine"), **kw):
        super().__init__(settings=settings, **kw)
        self.compile_scores = settings.compile  # acmoe.compile
        self.expert_norm = settings.expert_norm  # rows kept at this norm by the optimizer hook (expert_norm.py)
        if self.expert_norm is not None and self.config.perform_initialization:
            with torch.no_grad():
                self.weight.copy_(_fixed_norm_init(self.num_experts, self.config.hidden_size, self.expert_norm))

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
        logits_TE = ac_stats.ac_scores(x_TD, self.weight, w_KD, labels_T, dtype=router_dtype(self.config),
                                       compile=self.compile_scores)
        return logits_TE.view(*input.shape[:-1], self.num_experts)


class ACRouter(CosineRouter):
    """The Adaptive Clustering router: cosine scores in the space transformed by M_{c_i}."""

    def __init__(self, *, settings: ACSettings = ACSettings(), **kw):
        super().__init__(settings=settings, **kw)
        self.ac_constants = settings.constants()
        # a batch-trained model's calibrated inference transform (inference_stats.install); not part
        # of megatron's checkpoint (stored beside it)
        self.register_buffer("ac_inference_w", None, persistent=False)
        self.calibration: ac_stats.WeightAverage | None = None  # set while inference_stats.calibrate runs

    def inference_weights(self) -> torch.Tensor | None:
        """The batch-independent ``[K, D]`` transform used outside training, or None (batch statistics)."""
        if self.settings.source == "ema":
            return self._ema_weights()
        return self.ac_inference_w

    def set_inference_weights(self, w_KD: torch.Tensor | None) -> None:
        """Route with ``w_KD`` outside training (None: back to the batch statistics)."""
        if self.settings.source == "ema":
            raise ValueError("an acmoe.source=ema router routes with its own running statistics at inference")
        if w_KD is not None:
            shape = (self.num_experts, self.config.hidden_size)
            if tuple(w_KD.shape) != shape:
                raise ValueError(f"AC layer {self.layer_number}: inference weights of shape {tuple(w_KD.shape)}, "
                                 f"the router needs {shape}")
            w_KD = w_KD.detach().to(device=self.weight.device, dtype=torch.float32)
        self.ac_inference_w = w_KD

    def scope_replicas(self) -> int:
        """How many ranks of ``tp_dp_cp`` hold the same statistics (the size of the scope's group)."""
        group = self._group(self.settings.scope)
        return 1 if group is None else dist.get_world_size(group)

    def _group(self, scope: str):
        group = {"local": None, "tp": self.tp_cp_group, "dp": self.tp_dp_cp_group}[scope]
        if group is None or dist.get_world_size(group) == 1:
            return None
        return group

    def _transform(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        state = self.chunk_state
        labels = state.labels_for(self.layer_number, x_TD.shape[0])
        c = self.ac_constants
        if not self.training and (w_KD := self.inference_weights()) is not None:
            return w_KD, labels.top1_T
        if self.settings.source == "ema":
            w_KD = self._ema_weights()
            if self.training and torch.is_grad_enabled():  # once per step, also under recompute
                stats = self._ema_batch_stats(x_TD, labels.top1_T)
                if self._recording():  # this micro-batch's clusters under the running transform
                    state.metrics.record_ac(self.layer_number, stats.counts_K, stats.mean_KD, stats.mad_KD, w_KD,
                                           self._ema_rows(), c["eps"], c["clip"], weight_mad_KD=self.ac_ema_mad)
                self._ema_update(stats)
            return w_KD, labels.top1_T
        group = self._group(self.settings.scope)
        all_reduce = None if group is None else (lambda t: dist.all_reduce(t, group=group))
        max_label = labels.max_label
        if group is not None and self.settings.mode == "release":
            max_label = max_label.clone()
            dist.all_reduce(max_label, op=dist.ReduceOp.MAX, group=group)
        kw = dict(eps=c["eps"], clip=c["clip"], norm=c["norm"], mode=self.settings.mode, max_label=max_label,
                  min_cluster_size=self.settings.min_cluster_size)
        if group is None:  # statistics and weights in one function: one compile unit
            local_weights = ac_stats.compiled(ac_stats.local_weights, self.settings.compile)
            w_KD, stats = local_weights(x_TD, labels.top1_T, self.num_experts, **kw)
        else:
            stats = ac_stats.cluster_stats(x_TD, labels.top1_T, self.num_experts, all_reduce)
            w_KD = ac_stats.compiled(ac_stats.weights_from_stats, self.settings.compile)(stats.mad_KD, stats.counts_K, **kw)
        if self.calibration is not None:
            self.calibration.add(w_KD, stats.counts_K)
        if self._recording():
            rows_K = ac_stats.cluster_rows(stats.counts_K, self.settings.mode, max_label, self.settings.min_cluster_size)
            state.metrics.record_ac(self.layer_number, stats.counts_K, stats.mean_KD, stats.mad_KD, w_KD,
                                   rows_K, c["eps"], c["clip"])
        return w_KD, labels.top1_T

    def _ema_rows(self) -> torch.Tensor:
        """The clusters the running statistics have seen: the rows of the EMA weights' means."""
        return self.ac_ema_count > 0

    @torch.no_grad()
    def _ema_weights(self) -> torch.Tensor:
        c = self.ac_constants
        w_KD = ac_stats.weights_from_stats(
            self.ac_ema_mad, self._ema_rows().float() * float(self.settings.min_cluster_size), eps=c["eps"],
            clip=c["clip"], norm=c["norm"], mode="clean", min_cluster_size=self.settings.min_cluster_size,
        )
        return w_KD  # clusters never seen keep M = I

    @torch.no_grad()
    def _ema_batch_stats(self, x_TD: torch.Tensor, labels_T: torch.Tensor) -> ac_stats.ClusterStats:
        """This micro-batch's statistics over all replicas (the EMA stays equal on every rank)."""
        group = self._group("dp")
        all_reduce = None if group is None else (lambda t: dist.all_reduce(t, group=group))
        return ac_stats.cluster_stats(x_TD, labels_T, self.num_experts, all_reduce)

    @torch.no_grad()
    def _ema_update(self, stats: ac_stats.ClusterStats) -> None:
        """Blend a micro-batch's statistics into the running ones."""
        present_K1 = (stats.counts_K > 0).unsqueeze(1)
        first_K1 = (self.ac_ema_count == 0).unsqueeze(1)
        d = self.settings.ema_decay
        blended_KD = torch.where(first_K1, stats.mad_KD, d * self.ac_ema_mad + (1 - d) * stats.mad_KD)
        self.ac_ema_mad.copy_(torch.where(present_K1, blended_KD, self.ac_ema_mad))
        self.ac_ema_count.add_(stats.counts_K)
