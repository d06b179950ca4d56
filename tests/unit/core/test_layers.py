"""Layer arithmetic (core/layers.py): megatron's reading of ``moe_layer_freq`` and the router of each
decoder layer, on plain integers, pinned against megatron-core's own decoder layer specs."""

import pytest
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_layer_specs
from megatron.core.transformer.moe.moe_logging import MoEMetricsTracker

from acmoe_megatron.core import layers
from acmoe_megatron.model.spec import is_moe_layer_spec
from acmoe_megatron.testing import tiny_config


@pytest.mark.parametrize(("num_layers", "freq"), [(6, 1), (6, 2), (7, 3), (5, 5), (4, [1, 0, 1, 1]),
                                                    (6, [0, 1, 0, 1, 1, 0]), (3, [0, 0, 0])])
def test_moe_layers_are_megatrons(num_layers, freq):
    """The MoE layers megatron builds (get_gpt_decoder_layer_specs) and counts (its MoE metrics tracker)."""
    specs = get_gpt_decoder_layer_specs(tiny_config(num_layers=num_layers, moe_layer_freq=freq),
                                        use_transformer_engine=False)
    built = [i + 1 for i, spec in enumerate(specs) if is_moe_layer_spec(spec)]
    assert layers.moe_layers(num_layers, freq) == built
    assert len(built) == MoEMetricsTracker._count_moe_layers(num_layers, freq, None)


def test_int_freq_is_every_nth_layer_from_the_first():
    assert layers.moe_layer_pattern(6, 2) == [1, 0, 1, 0, 1, 0]
    assert layers.moe_layers(6, 1) == [1, 2, 3, 4, 5, 6]
    assert layers.moe_layers(7, 3) == [1, 4, 7]
    assert layers.moe_layers(4, 9) == [1]  # layer 1 is always an MoE layer for an int


def test_list_freq_is_one_entry_per_layer():
    assert layers.moe_layers(4, [1, 0, 1, 1]) == [1, 3, 4]
    assert layers.moe_layers(4, (0, 1, 1, 0)) == [2, 3]
    for bad in ([1, 0, 1], [1, 0, 2, 1], 0, -2, "2", None):
        with pytest.raises(ValueError, match="moe_layer_freq="):
            layers.moe_layers(4, bad)


def test_ac_layers_start_at_the_first_ac_moe_ordinal():
    assert layers.ac_layers(12, [1, 0] * 6, 3) == [5, 7, 9, 11]  # GLaM-M: ordinal 3 is layer 5
    assert layers.ac_layers(6, 1, 1) == [1, 2, 3, 4, 5, 6]
    assert layers.ac_layers(4, 2, 3) == []  # first_ac_layer beyond the 2 MoE layers: none
    with pytest.raises(ValueError, match="first_ac_layer=0"):
        layers.ac_layers(4, 1, 0)


def test_layer_routers_place_ac_after_the_lead_router():
    assert layers.layer_routers(6, [1, 1, 0, 1, 1, 1], "ac", 3) == ["topk", "topk", None, "ac", "ac", "ac"]
    assert layers.layer_routers(4, 1, "cosine", 2) == ["topk", "cosine", "cosine", "cosine"]


def test_layer_routers_with_a_cosine_lead_router():
    assert layers.layer_routers(6, [1, 1, 0, 1, 1, 1], "ac", 3, "cosine") == [
        "cosine", "cosine", None, "ac", "ac", "ac"]


def test_first_ac_layer_beyond_the_moe_layers_leaves_only_the_lead_router():
    assert layers.layer_routers(4, 2, "ac", 3) == ["topk", None, "topk", None]
    assert layers.layer_routers(4, 2, "ac", 3, "cosine") == ["cosine", None, "cosine", None]


def test_baselines_route_every_moe_layer_whatever_first_ac_layer():
    assert layers.layer_routers(4, [1, 0, 1, 1], "xmoe", 3) == ["xmoe", None, "xmoe", "xmoe"]
    assert layers.layer_routers(4, 1, "topk", 3, "cosine") == ["topk"] * 4  # lead_router unused
    assert layers.layer_routers(4, 1, "stablemoe-lite", 2) == ["stablemoe-lite"] * 4


def test_an_unknown_router_is_refused():
    with pytest.raises(ValueError, match="unknown router 'nope'"):
        layers.layer_routers(4, 1, "nope", 1)


def test_hybrid_pattern_layers():
    from acmoe_megatron.core.layers import ac_layers, hybrid_layers

    assert hybrid_layers("*E*E|*E*E") == (8, [0, 1, 0, 1, 0, 1, 0, 1])
    assert hybrid_layers("M*-E/E") == (4, [0, 0, 0, 1])  # MTP depths after "/" are not decoder layers
    assert ac_layers(*hybrid_layers("*-*E*E*E"), first_ac_layer=2) == [6, 8]
    with pytest.raises(ValueError, match="no layers"):
        hybrid_layers("|/E")
