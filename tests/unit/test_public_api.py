"""What users name stays as it was before the package layout changed (#36): the console commands
and their entry points, the public ``acmoe_megatron`` names, the plugin API, the recipe keys and the
``--acmoe-*`` flags. A change to any of these is a change for users: update this list on purpose."""

import argparse
import dataclasses
import importlib
import tomllib
from pathlib import Path

import acmoe_megatron
from acmoe_megatron import plugin
from acmoe_megatron.core.settings import ACSettings, EllipticalSettings
from acmoe_megatron.runtime.recipe import DataSettings, RunSettings

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = {"acmoe-pretrain", "acmoe-train", "acmoe-data", "acmoe-plot", "acmoe-launch", "acmoe-eval",
            "acmoe-generate", "acmoe-export-hf", "acmoe-preflight"}
PLUGIN = {"patch_block_spec", "attach", "add_arguments", "settings_from_args", "validate_args",
          "install_expert_norm", "bridge_layer_spec", "pre_wrap_hook", "settings_argv", "patch_hybrid_stack_spec",
          "local_hybrid_stack_spec", "register_autobridge_routers"}
KEYS = {
    ACSettings: ["router", "first_ac_layer", "lead_router", "preset", "eps", "clip", "norm", "mode",
                 "min_cluster_size", "scope", "source", "ema_decay", "compile", "expert_norm", "xmoe_dim",
                 "usmoe_rate", "etr_trainable_affinity", "stablemoe_stage1_fraction", "stablemoe_distill_dim",
                 "stablemoe_distill_coeff"],
    EllipticalSettings: ["enabled", "first_layer", "source", "scale"],
    DataSettings: ["path", "prepare_stdlib", "seed", "verify_checksums", "shuffle_window", "blend", "cache_dir"],
    RunSettings: ["dir", "name", "log_router_grad_norms", "keep_last_checkpoints", "peak_tflops",
                  "per_expert_scalars_max", "image_interval", "trace_samples", "checkpoint_checksums",
                  "checkpoint_verify", "hang_timeout_s", "hang_timeout_checkpoint_s"],
}


def test_every_command_is_there_and_its_entry_point_resolves():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == COMMANDS
    for name, target in scripts.items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), name


def test_public_names():
    assert acmoe_megatron.__version__ == "0.1.0"
    assert set(plugin.__all__) == PLUGIN and all(callable(getattr(plugin, n)) for n in PLUGIN)


def test_recipe_keys_and_flags():
    for cls, keys in KEYS.items():
        assert [f.name for f in dataclasses.fields(cls)] == keys, cls.__name__
    flags = {opt for action in plugin.add_arguments(argparse.ArgumentParser())._actions
             for opt in action.option_strings if opt.startswith("--acmoe")}
    expected = {"--acmoe-" + k.replace("_", "-") for k in KEYS[ACSettings]}
    expected |= {"--acmoe-elliptical-" + k.replace("_", "-") for k in KEYS[EllipticalSettings]}
    assert {f for f in flags if not f.startswith("--acmoe-no-") and "--no-" not in f} >= expected
