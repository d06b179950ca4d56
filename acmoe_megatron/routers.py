"""megatron-core routers: the AC router (ACMoE, Definition 2), its M = I ablation, and label sources.

All three subclass megatron's ``TopKRouter`` and change only ``gating`` (how logits are made) and
``forward`` (recording this layer's top-1 labels for the next AC layer). Megatron's own top-k,
softmax over the selected logits, capacity dropping, aux / seq-aux / global-aux losses, z-loss,
expert bias and the token dispatch are untouched.

* ``LabelSourceRouter``: megatron's linear top-k router (the SMoE baseline, spec §5.1) that also
  records labels; used by the first MoE layer(s) of an ACMoE model, which have no predecessor.
* ``ACRouter``: s_ij = (x_i ⊙ m_{c_i}) · e_j / ||e_j|| with m from ``ac_stats`` on the current
  layer's input and the previous MoE layer's top-1 labels c_i. The experts receive the
  untransformed token (language-model release, spec §3.1). Statistics and scores are fp32 whatever
  the training precision; the transform carries no gradient.
* ``CosineRouter``: the same scoring with M = I, the ablation that isolates the effect of M
  (spec §4.6).

The builder signature megatron calls is ``router(config=, pg_collection=, is_mtp_layer=)``; our
own settings are bound beforehand with ``functools.partial`` (see ``spec.py``), so no field is
added to megatron's ``TransformerConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.transformer.moe.router import TopKRouter

from acmoe_megatron import ac_stats
from acmoe_megatron.labels import LabelCarrier

ROUTER_TYPES = ("ac", "cosine", "topk")


@dataclass(frozen=True)
class ACSettings:
    """The AC router's own settings (YAML section ``acmoe``; defaults = the LM release)."""

    router: str = "ac"  # ac | cosine | topk
    first_ac_layer: int = 3  # 1-based ordinal among MoE layers where AC starts (paper: 3)
    eps: float = 1e-4  # ε in 1 / (MAD + ε)
    clip: float = 10.0  # clip weights at clip × mean(weights)
    rows: str = "release"  # which clusters enter the clip/normalisation means (ac_stats)
    min_cluster_size: int = 2  # only for rows = "nonempty"

    def __post_init__(self):
        if self.router not in ROUTER_TYPES:
            raise ValueError(f"acmoe.router={self.router!r}: choose one of {ROUTER_TYPES}")
        if self.first_ac_layer < 1:
            raise ValueError(
                f"acmoe.first_ac_layer={self.first_ac_layer}: must be >= 1 (1-based MoE layer "
                "index; the paper's medium models use 3)"
            )
        if self.rows not in ac_stats.ROW_MODES:
            raise ValueError(f"acmoe.rows={self.rows!r}: choose one of {ac_stats.ROW_MODES}")
        if not self.eps > 0 or not self.clip > 0:
            raise ValueError("acmoe.eps and acmoe.clip must be > 0")


class LabelSourceRouter(TopKRouter):
    """Megatron's ``TopKRouter`` that also records each token's top-1 expert for the next layer."""

    def __init__(self, *, config, pg_collection=None, is_mtp_layer=False, label_carrier=None, **kw):
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer, **kw)
        # A plain attribute (not a submodule): the carrier belongs to the model chunk.
        self.label_carrier: LabelCarrier | None = label_carrier

    def forward(self, input: torch.Tensor, padding_mask: torch.Tensor | None = None):
        probs, routing_map = super().forward(input, padding_mask=padding_mask)
        if self.label_carrier is not None and not self.is_mtp_layer:
            self.label_carrier.put(self.layer_number, probs, routing_map)
        return probs, routing_map


class CosineRouter(LabelSourceRouter):
    """Unit-norm expert embeddings on the raw token: s_ij = x_i · e_j / ||e_j|| (M = I)."""

    def _transform(self, x_TD: torch.Tensor) -> torch.Tensor | None:
        return None

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        # Router.gating moves CPU-initialised weights to the current device; keep that contract.
        if self.weight.device != input.device:
            self.weight.data = self.weight.data.to(device=input.device)
        x_TD = input.reshape(-1, input.shape[-1]).float()  # one fp32 copy for statistics and scores
        logits_TE = ac_stats.ac_scores(x_TD, self._transform(x_TD), self.weight)
        return logits_TE.view(*input.shape[:-1], self.num_experts)


class ACRouter(CosineRouter):
    """The Adaptive Clustering router: cosine scores in the space transformed by M_{c_i}."""

    def __init__(self, *, config, pg_collection=None, is_mtp_layer=False, label_carrier=None,
                 ac: ACSettings = ACSettings(), **kw):
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer,
                         label_carrier=label_carrier, **kw)
        self.ac = ac

    def _transform(self, x_TD: torch.Tensor) -> torch.Tensor:
        if self.label_carrier is None:
            raise RuntimeError("ACRouter built without a label carrier; build it via acmoe_megatron.spec")
        labels = self.label_carrier.get(self.layer_number, x_TD.shape[0])
        w_KD = ac_stats.ac_weights(
            x_TD, labels.top1_T, self.num_experts, eps=self.ac.eps, clip=self.ac.clip,
            rows=self.ac.rows, max_label=labels.max_label,
            min_cluster_size=self.ac.min_cluster_size,
        )
        return ac_stats.token_weights(w_KD, labels.top1_T)
