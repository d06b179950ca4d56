"""The router registry: one entry per ``acmoe.router`` name, describing that router once.

A leaf module (no torch, megatron or model import): the settings validate against it without building
a model. Each ``RouterEntry`` says

* ``path`` — where the class is, ``"module:Class"``, imported only when a model is built
  (``router_class``); the class is a ``model.routers.LabelSourceRouter`` subclass (megatron's
  ``TopKRouter`` + label/metric recording) and carries the behaviour: ``spec_kwargs``,
  ``reported_losses``;
* ``from_first_ac_layer`` — True: the router routes the MoE layers from ``acmoe.first_ac_layer`` on
  and the earlier MoE layers get ``acmoe.lead_router`` (their top-1 labels are what AC needs; ac,
  cosine); False: it routes every MoE layer (the baselines, as in their papers). Read by
  ``layers.layer_routers``, hence by ``model.spec.patch_block_spec`` and the HF export;
* ``hf_router`` — the ``router_types`` entry of the Hugging Face export (``inference/hf``) for the
  layers it routes, or None with ``hf_refusal``, why the HF model cannot compute it;
* ``compile`` — whether ``acmoe.compile`` (torch.compile of the AC statistics and scores) applies.

Adding a router is one class and one ``register(RouterEntry(...))`` call (here, for ours).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class RouterEntry:
    """One router: its ``acmoe.router`` name, class and properties (see the module docstring)."""

    name: str
    path: str  # "module:Class"
    from_first_ac_layer: bool = False
    hf_router: str | None = None  # the HF export's router_types entry; None: not exportable
    hf_refusal: str | None = None  # why it cannot be exported (hf_router None)
    compile: bool = False  # acmoe.compile applies

    def __post_init__(self):
        module, _, cls = self.path.partition(":")
        if not (module and cls):
            raise ValueError(f"router {self.name!r}: path={self.path!r}, give 'module:Class'")
        if (self.hf_router is None) == (self.hf_refusal is None):
            raise ValueError(f"router {self.name!r}: give either hf_router (its HF export name) or hf_refusal "
                             "(why it cannot be exported)")


ROUTERS: dict[str, RouterEntry] = {}


def register(entry: RouterEntry) -> RouterEntry:
    """Add ``entry``; a name or class registered twice is an error."""
    if entry.name in ROUTERS:
        raise ValueError(f"router {entry.name!r} is already registered ({ROUTERS[entry.name].path})")
    if any(e.path == entry.path for e in ROUTERS.values()):
        raise ValueError(f"{entry.path} is already registered (one name per router class)")
    ROUTERS[entry.name] = entry
    return entry


register(RouterEntry("ac", "acmoe_megatron.model.routers:ACRouter", from_first_ac_layer=True,
                     hf_router="ac", compile=True))
register(RouterEntry("cosine", "acmoe_megatron.model.routers:CosineRouter", from_first_ac_layer=True,
                     hf_router="cosine", compile=True))
register(RouterEntry("topk", "acmoe_megatron.model.routers:LabelSourceRouter", hf_router="topk"))
register(RouterEntry("xmoe", "acmoe_megatron.model.baseline_routers:XMoERouter", hf_router="xmoe"))
register(RouterEntry(
    "stablemoe", "acmoe_megatron.model.baseline_routers:StableMoERouter",
    hf_refusal="its stage-2 router routes by token id through a frozen distilled embedding, which the HF model "
               "does not implement",
))
# cosine scoring on every MoE layer: the HF cosine router
register(RouterEntry("stablemoe-lite", "acmoe_megatron.model.baseline_routers:StableMoELiteRouter",
                     hf_router="cosine"))
register(RouterEntry(
    "usmoe", "acmoe_megatron.model.baseline_routers:USMoERouter",
    hf_refusal="it selects the top-(S·k) (token, expert) pairs of each whole sequence, so a token's experts "
               "depend on the other tokens, future ones included",
))
register(RouterEntry("etr", "acmoe_megatron.model.baseline_routers:ETRRouter",
                     hf_refusal="its expert choice keeps a capacity of tokens per expert over the whole micro-batch"))


def names() -> tuple[str, ...]:
    """The registered router names, in registration order."""
    return tuple(ROUTERS)


def entry(name: str) -> RouterEntry:
    """The entry of ``name``; ValueError naming the choices for an unknown one."""
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}: choose one of {names()}")
    return ROUTERS[name]


def router_class(name: str) -> type:
    """The router class registered under ``name`` (imports its module on first use)."""
    module, cls = entry(name).path.split(":")
    return getattr(importlib.import_module(module), cls)


def name_of(cls: type) -> str | None:
    """The name ``cls`` is registered under (matched by its ``"module:Class"`` path), or None."""
    path = f"{cls.__module__}:{cls.__qualname__}"
    return next((e.name for e in ROUTERS.values() if e.path == path), None)


def hf_router_names() -> set[str]:
    """Every ``router_types`` entry the HF export writes (``configuration_acmoe.ROUTER_TYPES``)."""
    return {e.hf_router for e in ROUTERS.values() if e.hf_router is not None}
