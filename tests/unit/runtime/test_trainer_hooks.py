"""The table of megatron trainer functions we wrap (runtime/hooks.py): every call site exists in the
installed megatron-core, a version or call site that is not there refuses before anything is
wrapped, and ``wrap`` replaces exactly the named call site by a wrapper of what was there."""

import pytest

from acmoe_megatron.runtime import cpu_runtime, hooks


def test_every_call_site_of_the_table_exists():
    hooks.check_patch_sites()
    assert {p.call_site.rsplit(".", 1)[-1] for p in hooks.PATCHES.values()} >= {
        "save_checkpoint", "setup_model_and_optimizer", "training_log", "train", "save"}


def test_another_megatron_release_is_refused_naming_the_call_sites(monkeypatch):
    monkeypatch.setattr(cpu_runtime, "megatron_version", lambda: "0.20.0")
    with pytest.raises(RuntimeError, match=r"(?s)megatron-core 0\.20\.0 is not supported.*save_checkpoint"):
        hooks.check_patch_sites()


def test_a_missing_call_site_is_named():
    gone = hooks.TrainerPatch("gone", "megatron.training.training.no_such_function", "test")
    with pytest.raises(RuntimeError, match="gone: megatron.training.training.no_such_function does not exist"):
        hooks.check_patch_sites((*hooks.PATCHES.values(), gone))


def test_wrap_replaces_the_call_site_by_a_wrapper_of_it(monkeypatch):
    import megatron.training.training as training

    monkeypatch.setattr(training, "train", lambda: "megatron's")
    monkeypatch.setattr(hooks, "APPLIED", [])
    hooks.wrap("metrics_train", lambda original: lambda: f"wrapped {original()}")
    assert training.train() == "wrapped megatron's" and hooks.APPLIED == ["metrics_train"]
