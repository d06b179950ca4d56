"""Layer arithmetic on plain integers: which decoder layers are MoE layers and which router each gets.

No megatron import: the launchers, the run plans and the reports count layers from a recipe's
numbers; ``model.spec.patch_block_spec`` and the HF export (``inference/hf/convert.py``) read the
same functions off a megatron ``TransformerConfig``. Layer numbers are megatron's: global and
1-based over the decoder layers; "the k-th MoE layer" counts MoE layers only (1-based).

* ``moe_layer_pattern(num_layers, moe_layer_freq)`` — megatron's reading of ``moe_layer_freq``
  (``get_gpt_decoder_layer_specs``): an int N puts an MoE layer at every layer i (0-based) with
  i % N == 0, so layer 1 always; a list gives 0 (dense) / 1 (MoE) per layer, one entry per layer.
  A model without ``num_moe_experts`` has no MoE layer whatever ``moe_layer_freq`` says: that is
  the caller's to check (the functions here count the layers of an MoE model).
* ``moe_layers`` — their numbers; ``ac_layers`` — those from the ``first_ac_layer``-th MoE layer
  on (what a ``from_first_ac_layer`` router routes; none when the model has fewer MoE layers).
* ``layer_routers`` — the router name of each decoder layer (None for dense ones), as the
  registry's ``from_first_ac_layer`` places ``acmoe.router`` and ``acmoe.lead_router``.
* ``hybrid_layers(pattern)`` — megatron-core's HybridModel describes its decoder by a layer pattern
  (``*`` attention, ``-`` MLP, ``E`` MoE, ``M`` Mamba, ``G`` gated delta net, ``D``/``L`` other
  attentions; ``|`` pipeline stage boundaries, ``/`` multi-token-prediction depths after the main
  pattern). Every symbol of the main pattern is one layer, numbered 1.. as megatron's HybridStack
  numbers them, so its (number of layers, 0/1 MoE pattern) feed the functions above unchanged.
"""

from __future__ import annotations

from acmoe_megatron.core import registry


def moe_layer_pattern(num_layers: int, moe_layer_freq: int | list[int] | tuple[int, ...]) -> list[int]:
    """1 = MoE layer, 0 = dense, per decoder layer (megatron's reading of ``moe_layer_freq``)."""
    freq = moe_layer_freq
    if isinstance(freq, int) and freq >= 1:
        return [1 if i % freq == 0 else 0 for i in range(num_layers)]
    if isinstance(freq, (list, tuple)) and len(freq) == num_layers and all(f in (0, 1) for f in freq):
        return [int(f) for f in freq]
    raise ValueError(
        f"moe_layer_freq={freq!r}: give an int N >= 1 (an MoE layer every N layers) or a 0/1 list of "
        f"length num_layers={num_layers}"
    )


def moe_layers(num_layers: int, moe_layer_freq: int | list[int] | tuple[int, ...]) -> list[int]:
    """Global 1-based numbers of the MoE layers."""
    return [i + 1 for i, p in enumerate(moe_layer_pattern(num_layers, moe_layer_freq)) if p == 1]


def ac_layers(num_layers: int, moe_layer_freq: int | list[int] | tuple[int, ...], first_ac_layer: int) -> list[int]:
    """Global numbers of the MoE layers from the ``first_ac_layer``-th (1-based among MoE layers) on."""
    if first_ac_layer < 1:
        raise ValueError(f"first_ac_layer={first_ac_layer!r}: a 1-based MoE layer ordinal (>= 1)")
    return moe_layers(num_layers, moe_layer_freq)[first_ac_layer - 1 :]


def layer_routers(num_layers: int, moe_layer_freq: int | list[int] | tuple[int, ...], router: str,
                  first_ac_layer: int, lead_router: str = "topk") -> list[str | None]:
    """The router name of each decoder layer (None: dense): ``router`` on every MoE layer, or, for a
    ``from_first_ac_layer`` router, on the MoE layers from the ``first_ac_layer``-th on and
    ``lead_router`` on the earlier ones."""
    moe = moe_layers(num_layers, moe_layer_freq)
    ac = set(ac_layers(num_layers, moe_layer_freq, first_ac_layer) if registry.entry(router).from_first_ac_layer
             else moe)
    return [None if n not in moe else router if n in ac else lead_router for n in range(1, num_layers + 1)]


HYBRID_MOE, HYBRID_PIPE, HYBRID_MTP = "E", "|", "/"


def hybrid_layers(pattern: str) -> tuple[int, list[int]]:
    """(number of decoder layers, 0/1 MoE pattern) of a HybridModel layer pattern: one layer per
    symbol of the main pattern (before the first ``/``), ``|`` stage boundaries not counted."""
    main = pattern.split(HYBRID_MTP)[0].replace(HYBRID_PIPE, "")
    if not main:
        raise ValueError(f"hybrid layer pattern {pattern!r} has no layers")
    return len(main), [1 if symbol == HYBRID_MOE else 0 for symbol in main]
