"""Typed settings of our routers and of Elliptical Attention.

A leaf module: it imports neither torch nor megatron nor our model code, so validating a recipe
(runtime/recipe.py, the launchers, ``--acmoe-*`` flags) never builds or imports a model.

* ``ACSettings`` — YAML section ``acmoe`` and the ``--acmoe-*`` flags (plugin.py): which router,
  where AC starts, the AC constants (spec §3.4 presets), the statistics scope/source, the expert
  embedding norm, and each baseline router's own keys (prefixed by its name).
* ``EllipticalSettings`` — YAML section ``elliptical`` (elliptical.py).

The router names, and which router takes ``first_ac_layer``, ``lead_router`` and ``compile``, are
the registry's (``registry.py``, one entry per router; ``router_class`` is re-exported from it).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

from acmoe_megatron.core import registry
from acmoe_megatron.core.registry import router_class as router_class  # re-exported: name -> class

LEAD_ROUTERS = ("topk", "cosine")  # ACSettings.lead_router
SCOPES = ("local", "tp", "dp")
SOURCES = ("batch", "ema")
MODES = ("release", "clean")  # ac_stats.weights_from_stats
NORMS = ("feature", "global_pre", "global_post")  # ac_stats.normalise
# The constant sets of the three official code bases (spec §3.4): eps, clip, normalisation.
PRESETS = {
    "lm": dict(eps=1e-4, clip=10.0, norm="feature"),
    "swin": dict(eps=1e-4, clip=1.5, norm="global_pre"),
    "softmoe": dict(eps=0.35, clip=5.0, norm="global_post"),
}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_TYPE_CHECKS = {
    bool: (lambda v: isinstance(v, bool), "true or false"),
    int: (_is_int, "an integer"),
    float: (_is_number, "a number"),
    str: (lambda v: isinstance(v, str), "a string (quote it in YAML)"),
}


def check_types(settings, section: str) -> None:
    """Each field holds its annotated type (bool, int, float, str; ``| None`` allows null); the
    error names the key, the value and the expected type."""
    hints = typing.get_type_hints(type(settings))
    for field in dataclasses.fields(settings):
        value, hint = getattr(settings, field.name), hints[field.name]
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            continue
        base = next((a for a in args if a is not type(None)), hint)
        ok, expected = _TYPE_CHECKS[base]
        if not ok(value):
            raise ValueError(f"{section}.{field.name}={value!r}: expected {expected}")


@dataclass(frozen=True)
class ACSettings:
    """Router settings (YAML section ``acmoe``; AC defaults = the LM release).

    The ``xmoe_*``, ``usmoe_*``, ``etr_*`` and ``stablemoe_*`` keys belong to the baseline routers
    of ``baseline_routers.py`` (see each class for the paper's equation).
    """

    router: str = "ac"  # a name in registry.py: ac, cosine, topk (megatron's) or a baseline
    first_ac_layer: int = 3  # 1-based ordinal among MoE layers where AC starts (paper: 3)
    # ac / cosine: the router of the MoE layers before first_ac_layer, whose top-1 labels AC uses:
    # topk = megatron's linear top-k (the release), cosine = the cosine router (M = I, expert_norm)
    lead_router: str = "topk"
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
        routers = registry.names()
        entry = registry.ROUTERS.get(self.router)
        from_first_ac = " and ".join(n for n in routers if registry.ROUTERS[n].from_first_ac_layer)
        compiled = " and ".join(n for n in routers if registry.ROUTERS[n].compile)
        checks = [
            (entry is not None, f"acmoe.router={self.router!r}: choose one of {routers}"),
            (_is_int(self.first_ac_layer) and self.first_ac_layer >= 1,
             f"acmoe.first_ac_layer={self.first_ac_layer!r}: must be an integer >= 1 (1-based MoE layer "
             "index; the paper's medium models use 3)"),
            (self.lead_router in LEAD_ROUTERS,
             f"acmoe.lead_router={self.lead_router!r}: choose one of {LEAD_ROUTERS}"),
            (self.lead_router == "topk" or entry is None or entry.from_first_ac_layer,
             f"acmoe.lead_router={self.lead_router!r} applies to the {from_first_ac} routers (the MoE layers "
             f"before first_ac_layer); acmoe.router={self.router!r} routes every MoE layer itself: remove it"),
            (self.preset in PRESETS, f"acmoe.preset={self.preset!r}: choose one of {tuple(PRESETS)}"),
            (self.mode in MODES, f"acmoe.mode={self.mode!r}: choose one of {MODES}"),
            (self.norm is None or self.norm in NORMS, f"acmoe.norm={self.norm!r}: choose one of {NORMS}"),
            (self.scope in SCOPES, f"acmoe.scope={self.scope!r}: choose one of {SCOPES}"),
            (self.source in SOURCES, f"acmoe.source={self.source!r}: choose one of {SOURCES}"),
            (self.eps is None or (_is_number(self.eps) and self.eps > 0),
             f"acmoe.eps={self.eps!r}: must be a number > 0 (or null: the preset's)"),
            (self.clip is None or (_is_number(self.clip) and self.clip > 0),
             f"acmoe.clip={self.clip!r}: must be a number > 0 (or null: the preset's)"),
            (_is_number(self.ema_decay) and 0.0 < self.ema_decay < 1.0,
             f"acmoe.ema_decay={self.ema_decay!r}: must be a number in (0, 1)"),
            (isinstance(self.compile, bool), f"acmoe.compile={self.compile!r}: use true or false"),
            (not self.compile or entry is None or entry.compile,
             f"acmoe.compile applies to the {compiled} routers, not {self.router!r}: remove it"),
            (_is_int(self.min_cluster_size) and self.min_cluster_size >= 1,
             f"acmoe.min_cluster_size={self.min_cluster_size!r}: must be an integer >= 1"),
            (self.expert_norm is None or (_is_number(self.expert_norm) and self.expert_norm > 0),
             f"acmoe.expert_norm={self.expert_norm!r}: give a positive row norm (the release: 1.5) or null"),
            (self.xmoe_dim is None or (_is_int(self.xmoe_dim) and self.xmoe_dim >= 1),
             f"acmoe.xmoe_dim={self.xmoe_dim!r}: must be an integer >= 1 (or null)"),
            (_is_number(self.usmoe_rate) and 0.0 <= self.usmoe_rate <= 1.0,
             f"acmoe.usmoe_rate={self.usmoe_rate!r}: must be a number in [0, 1]"),
            (isinstance(self.etr_trainable_affinity, bool),
             f"acmoe.etr_trainable_affinity={self.etr_trainable_affinity!r}: use true or false"),
            (_is_number(self.stablemoe_stage1_fraction) and 0.0 <= self.stablemoe_stage1_fraction <= 1.0,
             f"acmoe.stablemoe_stage1_fraction={self.stablemoe_stage1_fraction!r}: must be a number in [0, 1]"),
            (_is_int(self.stablemoe_distill_dim) and self.stablemoe_distill_dim >= 1,
             f"acmoe.stablemoe_distill_dim={self.stablemoe_distill_dim!r}: must be an integer >= 1"),
            (_is_number(self.stablemoe_distill_coeff) and self.stablemoe_distill_coeff >= 0,
             f"acmoe.stablemoe_distill_coeff={self.stablemoe_distill_coeff!r}: must be a number >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def constants(self) -> dict:
        """eps, clip, norm: explicit settings override the preset's."""
        out = dict(PRESETS[self.preset])
        out.update({k: v for k, v in (("eps", self.eps), ("clip", self.clip), ("norm", self.norm)) if v is not None})
        return out


ELLIPTICAL_SOURCES = ("sequence", "prefix")
ELLIPTICAL_SCALES = ("standard", "none")


@dataclass(frozen=True)
class EllipticalSettings:
    """YAML section ``elliptical``: combines with every ``acmoe.router`` and with dense models."""

    enabled: bool = False
    first_layer: int = 2  # 1-based attention layer where the metric starts; layer 1 is standard
    source: str = "sequence"  # sequence (paper, non-causal) | prefix (causal-safe)
    scale: str = "standard"  # standard (megatron's 1/sqrt(d), ImageNet code) | none (WikiText code)

    def __post_init__(self):
        checks = [
            (isinstance(self.enabled, bool), f"elliptical.enabled={self.enabled!r}: use true or false"),
            (_is_int(self.first_layer) and self.first_layer >= 2,
             f"elliptical.first_layer={self.first_layer!r}: must be an integer >= 2 (attention layer 1 "
             "has no previous layer's values and is always standard)"),
            (self.source in ELLIPTICAL_SOURCES,
             f"elliptical.source={self.source!r}: choose one of {ELLIPTICAL_SOURCES}"),
            (self.scale in ELLIPTICAL_SCALES, f"elliptical.scale={self.scale!r}: choose one of {ELLIPTICAL_SCALES}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
