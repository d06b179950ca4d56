"""The router registry (core/registry.py) is the one description of each router: the settings, the
spec patch (model/spec.py) and the HF export (inference/hf/convert.py) read it. Adding a router is
one class and one entry: two dummy routers registered here are accepted by the settings, placed on
their layers by the spec and mapped or refused by the HF export, as their entries say."""

import ast
import subprocess
import sys

import pytest
from megatron.core.transformer.moe.router import TopKRouter

from acmoe_megatron.core import registry
from acmoe_megatron.core.registry import RouterEntry
from acmoe_megatron.core.settings import ACSettings
from acmoe_megatron.inference.hf import convert
from acmoe_megatron.model.routers import LabelSourceRouter
from acmoe_megatron.testing import build_gpt, tiny_config

INFO = convert.GPTInfo(vocab_size=128, max_position_embeddings=64)


class DummyRouter(LabelSourceRouter):
    """A new router on every MoE layer: megatron's top-k with label recording, under its own name."""


class DummyLateRouter(LabelSourceRouter):
    """A new router placed like AC: from ``acmoe.first_ac_layer`` on, the lead router before."""


@pytest.fixture
def dummies(monkeypatch):
    """The registry with the two dummies added (the real one is restored after the test)."""
    monkeypatch.setattr(registry, "ROUTERS", dict(registry.ROUTERS))
    registry.register(RouterEntry("dummy", f"{__name__}:DummyRouter", hf_router="topk"))
    registry.register(RouterEntry("dummy-late", f"{__name__}:DummyLateRouter", from_first_ac_layer=True,
                                  hf_refusal="the dummy has no HF twin"))


def _routers(model) -> dict[int, type]:
    return {m.layer_number: type(m) for m in model.modules() if isinstance(m, TopKRouter)}


# -- a new router: one class + one entry ---------------------------------------------------------


def test_settings_accept_a_registered_name_only():
    with pytest.raises(ValueError, match="acmoe.router='dummy': choose one of"):
        ACSettings(router="dummy")


@pytest.mark.usefixtures("dummies")
def test_settings_read_the_entry():
    assert ACSettings(router="dummy").router == "dummy"
    assert ACSettings(router="dummy-late", lead_router="cosine").lead_router == "cosine"  # from_first_ac_layer
    with pytest.raises(ValueError, match="acmoe.lead_router='cosine' applies to"):
        ACSettings(router="dummy", lead_router="cosine")  # routes every MoE layer itself
    with pytest.raises(ValueError, match="acmoe.compile applies to the ac and cosine routers, not 'dummy'"):
        ACSettings(router="dummy", compile=True)


@pytest.mark.usefixtures("megatron_ws1", "dummies")
def test_the_spec_places_a_new_router_by_its_entry():
    model = build_gpt(tiny_config(moe_layer_freq=[1, 0, 1, 1]), ACSettings(router="dummy"))
    assert _routers(model) == {1: DummyRouter, 3: DummyRouter, 4: DummyRouter}  # every MoE layer
    model = build_gpt(tiny_config(moe_layer_freq=[1, 0, 1, 1]), ACSettings(router="dummy-late", first_ac_layer=2))
    assert _routers(model) == {1: LabelSourceRouter, 3: DummyLateRouter, 4: DummyLateRouter}  # from MoE ordinal 2
    assert convert._routers_in_model(model) == {1: "topk", 3: "dummy-late", 4: "dummy-late"}  # named by the entry


@pytest.mark.usefixtures("dummies")
def test_the_hf_export_maps_or_refuses_a_new_router_by_its_entry():
    config = tiny_config(moe_layer_freq=[1, 0, 1, 1])
    cfg = convert.hf_config(config, ACSettings(router="dummy"), INFO)
    assert cfg["mlp_layer_types"] == ["moe", "dense", "moe", "moe"]
    assert cfg["router_types"] == ["topk", None, "topk", "topk"]  # its hf_router
    with pytest.raises(ValueError, match="acmoe.router='dummy-late' cannot be exported: the dummy has no HF twin"):
        convert.hf_config(config, ACSettings(router="dummy-late"), INFO)


# -- the registry itself --------------------------------------------------------------------------


def test_every_entry_names_its_class():
    for name in registry.names():
        cls = registry.router_class(name)
        assert issubclass(cls, LabelSourceRouter) and registry.name_of(cls) == name
    assert registry.name_of(TopKRouter) is None
    with pytest.raises(ValueError, match="unknown router 'nope'"):
        registry.router_class("nope")


def test_entries_are_checked(monkeypatch):
    monkeypatch.setattr(registry, "ROUTERS", dict(registry.ROUTERS))
    with pytest.raises(ValueError, match="'ac' is already registered"):
        registry.register(RouterEntry("ac", f"{__name__}:DummyRouter", hf_router="ac"))
    with pytest.raises(ValueError, match="ACRouter is already registered"):
        registry.register(RouterEntry("ac2", "acmoe_megatron.model.routers:ACRouter", hf_router="ac"))
    with pytest.raises(ValueError, match="give either hf_router"):
        RouterEntry("x", "m:C")
    with pytest.raises(ValueError, match="give either hf_router"):
        RouterEntry("x", "m:C", hf_router="topk", hf_refusal="why")
    with pytest.raises(ValueError, match="give 'module:Class'"):
        RouterEntry("x", "m.C", hf_router="topk")


def test_the_hf_remote_code_lists_the_registrys_hf_routers():
    """configuration_acmoe.py is copied into exported models and must not import this package: it keeps
    its own ROUTER_TYPES, which must be the registry's HF names."""
    for name in convert.REMOTE_CODE:
        tree = ast.parse((convert.HF_DIR / name).read_text())
        imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not [m for m in imported if m.startswith("acmoe_megatron")], name
    tree = ast.parse((convert.HF_DIR / "configuration_acmoe.py").read_text())
    values = [ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
              and any(isinstance(t, ast.Name) and t.id == "ROUTER_TYPES" for t in n.targets)]
    assert len(values) == 1 and set(values[0]) == registry.hf_router_names() == {"topk", "cosine", "ac", "xmoe"}


def test_the_refusals_the_export_command_reads_are_the_registrys():
    assert convert.NOT_EXPORTABLE == {"stablemoe": registry.entry("stablemoe").hf_refusal,
                                      "usmoe": registry.entry("usmoe").hf_refusal,
                                      "etr": registry.entry("etr").hf_refusal}


def test_registry_and_layers_import_neither_torch_nor_megatron():
    code = ("import sys; import acmoe_megatron.core.registry, acmoe_megatron.core.layers, "
            "acmoe_megatron.core.settings; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron')); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
