"""YAML recipes → megatron flags (config.py), the worker's argv/arg checks (train.py) and the
launcher's fail-fast path; fast unit tests, no training processes.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from acmoe_megatron.cli import pretrain as launcher
from acmoe_megatron.core.settings import ACSettings
from acmoe_megatron.data import Manifest, prepare
from acmoe_megatron.runtime.megatron_args import build_argv, validate_args
from acmoe_megatron.runtime.recipe import (
    SECTIONS,
    ConfigError,
    DataSettings,
    Recipe,
    RunSettings,
    load_recipe,
    megatron_actions,
    megatron_argv,
    parse_override,
    write_resolved,
)

ROOT = Path(__file__).resolve().parents[3]
TINY = ROOT / "configs" / "tiny_cpu.yaml"


def _fresh_megatron_parser() -> argparse.ArgumentParser:
    """Megatron's own trainer parser (not config.py's cached copy), to check emitted flags."""
    from megatron.training.arguments import add_megatron_arguments

    return add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))


def _write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------
# loading the shipped recipe


def test_tiny_cpu_recipe_loads_with_the_documented_values():
    recipe = load_recipe(TINY)
    raw = yaml.safe_load(TINY.read_text())
    assert recipe.megatron == raw["megatron"]
    assert recipe.megatron["num_experts"] == 8 and recipe.megatron["expert_model_parallel_size"] == 2
    assert recipe.acmoe == ACSettings(router="ac", first_ac_layer=3, eps=1e-4, clip=10.0, mode="release")
    assert isinstance(recipe.acmoe.eps, float)
    assert recipe.data == DataSettings(path="data/stdlib_s256", prepare_stdlib=True, seed=1234)
    assert recipe.run == RunSettings(dir="runs/tiny_cpu", name="tiny_cpu")
    assert set(recipe.to_dict()) == set(SECTIONS)
    assert len(recipe.hash()) == 16


def test_overrides_are_applied_on_top_of_the_file():
    recipe = load_recipe(TINY, ["megatron.lr=0.0003", "acmoe.router=cosine", "acmoe.first_ac_layer=2",
                                "data.seed=7", "run.dir=runs/x", "megatron.train_iters=5"])
    assert recipe.megatron["lr"] == pytest.approx(3e-4) and isinstance(recipe.megatron["lr"], float)
    assert recipe.megatron["train_iters"] == 5
    assert recipe.acmoe.router == "cosine" and recipe.acmoe.first_ac_layer == 2
    assert recipe.data.seed == 7 and recipe.data.path == "data/stdlib_s256"  # untouched keys stay
    assert recipe.run.dir == "runs/x"
    assert recipe.hash() != load_recipe(TINY).hash()


def test_recipe_without_file_uses_defaults():
    recipe = load_recipe(None, ["megatron.num_layers=2"])
    assert recipe.megatron == {"num_layers": 2}
    assert recipe.acmoe == ACSettings() and recipe.data == DataSettings() and recipe.run == RunSettings()


# ---------------------------------------------------------------------------------------------
# strict keys


def test_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_recipe_that_is_not_a_mapping_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        load_recipe(_write(tmp_path, "- megatron\n- acmoe\n"))


def test_unknown_section_in_file_names_it_and_suggests(tmp_path):
    path = _write(tmp_path, "megatorn:\n  num_layers: 2\n")
    with pytest.raises(ConfigError, match=r"unknown section 'megatorn'.*did you mean 'megatron'"):
        load_recipe(path)


@pytest.mark.parametrize(
    "section, key, suggestion",
    [
        ("megatron", "num_layer", "num_layers"),
        ("acmoe", "first_ac_lyer", "first_ac_layer"),
        ("data", "pth", "path"),
        ("run", "dirr", "dir"),
    ],
)
def test_unknown_key_in_each_section_names_it_and_suggests(tmp_path, section, key, suggestion):
    path = _write(tmp_path, f"{section}:\n  {key}: 1\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert f"{section}.{key}" in msg
    assert f"did you mean {suggestion!r}" in msg
    # the same key given as an override fails the same way
    with pytest.raises(ConfigError, match=rf"{section}\.{key}.*did you mean {suggestion!r}"):
        load_recipe(None, [f"{section}.{key}=1"])


def test_unknown_megatron_option_explains_the_naming_rule():
    with pytest.raises(ConfigError) as err:
        load_recipe(TINY, ["megatron.moe_router_top_k=2"])
    msg = str(err.value)
    assert "unknown megatron option megatron.moe_router_top_k" in msg
    assert "did you mean 'moe_router_topk'" in msg
    assert "num_layers for --num-layers" in msg


def test_megatron_option_with_dashes_is_rejected():
    with pytest.raises(ConfigError, match="megatron.num-layers"):
        load_recipe(None, ["megatron.num-layers=2"])


def test_unknown_dataclass_key_lists_the_known_keys():
    with pytest.raises(ConfigError, match=r"known keys: \['clip', 'compile', 'ema_decay', 'eps', 'etr_trainable_affinity', 'expert_norm', 'first_ac_layer'"):
        load_recipe(None, ["acmoe.zzz=1"])


# ---------------------------------------------------------------------------------------------
# overrides


@pytest.mark.parametrize(
    "text, expected",
    [
        ("megatron.lr=0.0003", ("megatron", "lr", 0.0003)),
        ("megatron.lr=3.0e-4", ("megatron", "lr", 0.0003)),
        ("acmoe.router=cosine", ("acmoe", "router", "cosine")),
        ("acmoe.first_ac_layer=2", ("acmoe", "first_ac_layer", 2)),
        ("megatron.moe_layer_freq=[1,0,1,0]", ("megatron", "moe_layer_freq", [1, 0, 1, 0])),
        ("megatron.data_path=[a, b]", ("megatron", "data_path", ["a", "b"])),
        ("data.prepare_stdlib=false", ("data", "prepare_stdlib", False)),
        ("run.name='123'", ("run", "name", "123")),
        ("run.dir=runs/a=b", ("run", "dir", "runs/a=b")),  # only the first '=' splits
        ("megatron.lr=", ("megatron", "lr", None)),
    ],
)
def test_override_values_are_parsed_as_yaml(text, expected):
    got = parse_override(text)
    assert got == expected
    assert type(got[2]) is type(expected[2])


def test_override_exponent_without_dot_is_a_float():
    section, key, value = parse_override("megatron.lr=3e-4")
    assert (section, key) == ("megatron", "lr")
    assert isinstance(value, float) and value == pytest.approx(3e-4)


def test_acmoe_eps_override_in_exponent_notation():
    assert load_recipe(TINY, ["acmoe.eps=1e-5"]).acmoe.eps == pytest.approx(1e-5)


@pytest.mark.parametrize("text", ["megatron.lr", "lr=3e-4", "=3", "megatron.lr:3"])
def test_override_without_section_dot_key_equals_value_is_an_error(text):
    with pytest.raises(ConfigError, match="SECTION.KEY=VALUE"):
        parse_override(text)


def test_override_with_unknown_section_suggests():
    with pytest.raises(ConfigError, match=r"unknown section 'acmo'.*did you mean 'acmoe'"):
        parse_override("acmo.router=ac")


def test_override_with_malformed_yaml_value_is_a_config_error():
    with pytest.raises(ConfigError, match="megatron.lr"):
        parse_override("megatron.lr=[1,")


def test_section_that_is_not_a_mapping_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="acmoe"):
        load_recipe(_write(tmp_path, "acmoe: 5\n"))


# ---------------------------------------------------------------------------------------------
# ACSettings (section acmoe)


@pytest.mark.parametrize(
    "override, match",
    [
        ("acmoe.router=linear", r"acmoe.router='linear'.*\('ac', 'cosine', 'topk', 'xmoe', 'stablemoe', 'stablemoe-lite', 'usmoe', 'etr'\)"),
        ("acmoe.first_ac_layer=0", r"acmoe.first_ac_layer=0: must be an integer >= 1"),
        ("acmoe.first_ac_layer=3.7", r"acmoe.first_ac_layer=3.7: must be an integer >= 1"),
        ("acmoe.first_ac_layer=three", r"acmoe.first_ac_layer='three': must be an integer >= 1"),
        ("acmoe.lead_router=linear", r"acmoe.lead_router='linear': choose one of \('topk', 'cosine'\)"),
        ("acmoe.router=xmoe acmoe.lead_router=cosine", r"acmoe.lead_router='cosine' applies to the ac and cosine "
                                                        r"routers.*acmoe.router='xmoe' routes every MoE layer"),
        ("acmoe.compile=yes-please", r"acmoe.compile='yes-please': use true or false"),
        ("acmoe.min_cluster_size=2.5", r"acmoe.min_cluster_size=2.5: must be an integer >= 1"),
        ("acmoe.mode=all", r"acmoe.mode='all'"),
        ("acmoe.eps=0", r"acmoe.eps=0: must be a number > 0"),
        ("acmoe.eps=small", r"acmoe.eps='small': must be a number > 0"),
        ("acmoe.clip=-1.0", r"acmoe.clip=-1.0: must be a number > 0"),
        ("elliptical.first_layer=2.5", r"elliptical.first_layer=2.5: must be an integer >= 2"),
        ("data.seed=abc", r"data.seed='abc': expected an integer"),
        ("data.verify_checksums=1", r"data.verify_checksums=1: expected true or false"),
        ("run.keep_last_checkpoints=two", r"run.keep_last_checkpoints='two': expected an integer"),
        ("run.keep_last_checkpoints=-1", r"run.keep_last_checkpoints=-1: must be >= 0"),
        ("run.dir=7", r"run.dir=7: expected a string \(quote it in YAML\)"),
    ],
)
def test_acsettings_validation_errors_are_config_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_recipe(TINY, override.split())


def test_acsettings_direct_validation():
    from acmoe_megatron.core import ac_stats
    with pytest.raises(ValueError, match="router"):
        ACSettings(router="nope")
    with pytest.raises(ValueError, match="first_ac_layer"):
        ACSettings(first_ac_layer=-2)
    for mode in ac_stats.MODES:  # every documented weight mode is accepted
        assert ACSettings(mode=mode).mode == mode
    assert ACSettings(router="topk", first_ac_layer=1).router == "topk"


# ---------------------------------------------------------------------------------------------
# megatron_argv


def test_store_true_switch_true_adds_flag_false_adds_nothing():
    assert megatron_argv({"log_throughput": True}) == ["--log-throughput"]
    assert megatron_argv({"log_throughput": False}) == []
    assert megatron_argv({"untie_embeddings_and_output_weights": True}) == [
        "--untie-embeddings-and-output-weights"
    ]


def test_store_false_no_switches():
    assert megatron_argv({"masked_softmax_fusion": False}) == ["--no-masked-softmax-fusion"]
    assert megatron_argv({"masked_softmax_fusion": True}) == []  # megatron's default
    assert megatron_argv({"add_bias_linear": False}) == ["--disable-bias-linear"]
    assert megatron_argv({"apply_rope_fusion": False}) == ["--no-rope-fusion"]
    # a store_true switch whose own name starts with no_
    assert megatron_argv({"no_persist_layer_norm": True}) == ["--no-persist-layer-norm"]
    assert megatron_argv({"no_persist_layer_norm": False}) == []


def test_store_true_switch_with_none_default_false_adds_nothing():
    assert megatron_argv({"use_cpu_initialization": False}) == []


@pytest.mark.parametrize("value", [1, 0, "true", "no", [True]])
def test_non_bool_to_a_switch_is_an_error(value):
    with pytest.raises(ConfigError, match=r"megatron.masked_softmax_fusion is a switch"):
        megatron_argv({"masked_softmax_fusion": value})


def test_values_lists_and_none():
    assert megatron_argv({"num_layers": 4, "lr": 0.002, "normalization": "RMSNorm"}) == [
        "--num-layers", "4", "--lr", "0.002", "--normalization", "RMSNorm",
    ]
    assert megatron_argv({"lr": None}) == []  # None = leave megatron's default
    # nargs='*' options take the list items as separate words, and a scalar as one item
    assert megatron_argv({"data_path": ["a", "b"]}) == ["--data-path", "a", "b"]
    assert megatron_argv({"data_path": "a"}) == ["--data-path", "a"]


def test_list_value_for_a_single_value_option_is_one_word():
    argv = megatron_argv({"moe_layer_freq": [1, 0, 1, 0]})
    assert argv[0] == "--moe-layer-freq" and len(argv) == 2
    assert yaml.safe_load(argv[1]) == [1, 0, 1, 0]


def test_moe_layer_freq_list_is_accepted_by_megatron():
    argv = megatron_argv({"moe_layer_freq": [1, 0, 1, 0]})
    action = megatron_actions()["moe_layer_freq"][0]
    try:
        parsed = action.type(argv[1])
    except ValueError as err:  # what argparse turns into "invalid moe_freq_type value"
        raise argparse.ArgumentTypeError(str(err)) from err
    assert parsed == [1, 0, 1, 0]
    assert argv == ["--moe-layer-freq", "[1,0,1,0]"]


def test_tiny_recipe_argv_is_accepted_by_megatrons_parser():
    recipe = load_recipe(TINY)
    argv = megatron_argv(recipe.megatron)
    args = _fresh_megatron_parser().parse_args(argv)
    assert args.num_layers == 4 and args.num_experts == 8 and args.moe_router_topk == 2
    assert args.lr == pytest.approx(0.002) and args.seq_length == 256
    assert args.masked_softmax_fusion is False and args.bias_gelu_fusion is False
    assert args.gradient_accumulation_fusion is False and args.apply_rope_fusion is False
    assert args.add_bias_linear is False and args.no_persist_layer_norm is True
    assert args.use_cpu_initialization is True and args.untie_embeddings_and_output_weights is True
    assert args.distributed_backend == "gloo" and args.transformer_impl == "local"
    assert args.ckpt_format == "torch_dist"


# ---------------------------------------------------------------------------------------------
# write_resolved


def test_write_resolved_round_trips(tmp_path):
    recipe = load_recipe(TINY, ["megatron.lr=0.0005", "megatron.data_path=[x, y]",
                                "acmoe.router=cosine", "acmoe.eps=2.0e-4", "run.name=rt",
                                f"run.dir={tmp_path / 'run'}"])
    out = write_resolved(recipe, tmp_path / "run")
    assert out == tmp_path / "run" / "config.yaml" and out.is_file()
    assert not list((tmp_path / "run").glob("*.tmp"))
    again = load_recipe(out)
    assert again.to_dict() == recipe.to_dict()
    assert again.hash() == recipe.hash()
    # the file lists every section, and the dataclass defaults are written out explicitly
    on_disk = yaml.safe_load(out.read_text())
    assert set(on_disk) == set(SECTIONS)
    assert on_disk["acmoe"]["min_cluster_size"] == ACSettings().min_cluster_size
    # overwriting is fine (a re-run of the same run directory)
    write_resolved(dataclasses.replace(recipe, run=RunSettings(dir=recipe.run.dir, name="rt2")), tmp_path / "run")
    assert load_recipe(out).run.name == "rt2"


# ---------------------------------------------------------------------------------------------
# train.build_argv with a shard manifest


@pytest.fixture(scope="module")
def manifest64(tmp_path_factory) -> Manifest:
    out = tmp_path_factory.mktemp("shards64")
    return prepare(source="stdlib", out_dir=out, seq_length=64, max_bytes=100_000)


def _recipe(run_dir: Path, **megatron) -> Recipe:
    base = load_recipe(TINY).megatron
    for key in ("seq_length", "max_position_embeddings"):
        base.pop(key)
    base.update(megatron)
    return Recipe(megatron=base, run=RunSettings(dir=str(run_dir)))


def _flag(argv: list[str], option: str) -> str:
    assert argv.count(option) == 1, f"{option} appears {argv.count(option)} times in {argv}"
    return argv[argv.index(option) + 1]


def test_build_argv_derives_data_flags_from_the_manifest(tmp_path, manifest64):
    vocab = manifest64.tokenizer["vocab_size"]
    assert manifest64.seq_length == 64 and vocab == 257  # 256 byte values + EOD
    argv = build_argv(_recipe(tmp_path / "run"), manifest64)
    assert _flag(argv, "--seq-length") == "64"
    assert _flag(argv, "--max-position-embeddings") == "64"
    assert _flag(argv, "--tokenizer-type") == "NullTokenizer"
    assert _flag(argv, "--vocab-size") == str(vocab)
    assert _flag(argv, "--dataloader-type") == "external"
    assert _flag(argv, "--tensorboard-dir") == str(tmp_path / "run" / "tensorboard")
    assert _flag(argv, "--save") == str(tmp_path / "run" / "checkpoints")
    assert _flag(argv, "--load") == str(tmp_path / "run" / "checkpoints")
    args = _fresh_megatron_parser().parse_args(argv)
    assert (args.seq_length, args.vocab_size, args.tokenizer_type) == (64, vocab, "NullTokenizer")
    assert args.save == args.load == str(tmp_path / "run" / "checkpoints")
    assert args.moe_per_layer_logging  # megatron's aux/z-loss per MoE layer (an MoE recipe)


def test_build_argv_keeps_explicit_paths_and_matching_values(tmp_path, manifest64):
    recipe = _recipe(tmp_path / "run", seq_length=64, max_position_embeddings=128,
                     vocab_size=manifest64.tokenizer["vocab_size"],
                     save=str(tmp_path / "s"), load=str(tmp_path / "l"), tensorboard_dir=str(tmp_path / "tb"))
    argv = build_argv(recipe, manifest64)
    assert _flag(argv, "--max-position-embeddings") == "128"
    assert _flag(argv, "--save") == str(tmp_path / "s")
    assert _flag(argv, "--load") == str(tmp_path / "l")
    assert _flag(argv, "--tensorboard-dir") == str(tmp_path / "tb")


def test_build_argv_seq_length_mismatch_is_a_clear_error(tmp_path, manifest64):
    recipe = load_recipe(TINY, [f"run.dir={tmp_path}", f"data.path={tmp_path / 'shards'}"])
    assert recipe.megatron["seq_length"] == 256
    with pytest.raises(ConfigError) as err:
        build_argv(recipe, manifest64)
    msg = str(err.value)
    assert "megatron.seq_length=256" in msg and "64-token samples" in msg
    assert str(tmp_path / "shards") in msg and "--seq-length 256" in msg


def test_build_argv_vocab_mismatch_and_dataloader_type(tmp_path, manifest64):
    with pytest.raises(ConfigError, match=r"megatron.vocab_size=512 but the shard manifest says 257 \(tokenizer bytes\)"):
        build_argv(_recipe(tmp_path, vocab_size=512), manifest64)
    with pytest.raises(ConfigError, match="dataloader_type must be 'external'"):
        build_argv(_recipe(tmp_path, dataloader_type="single"), manifest64)
    # a real tokenizer brings its own vocabulary: no --vocab-size is added then
    argv = build_argv(_recipe(tmp_path, tokenizer_type="GPT2BPETokenizer"), manifest64)
    assert "--vocab-size" not in argv and _flag(argv, "--tokenizer-type") == "GPT2BPETokenizer"


def test_build_argv_with_a_constructed_manifest(tmp_path):
    manifest = Manifest(tokenizer={"name": "custom", "hash": "0", "vocab_size": 1000, "eod": 0},
                        seq_length=32, dtype="uint16", source={}, splits={})
    argv = build_argv(_recipe(tmp_path), manifest)
    assert _flag(argv, "--seq-length") == "32" and _flag(argv, "--vocab-size") == "1000"


# ---------------------------------------------------------------------------------------------
# train.validate_args (megatron's parsed args + the recipe), CPU machine


@pytest.fixture(scope="module")
def tiny_args():
    """The tiny recipe's flags parsed by megatron's own parser (every attribute megatron has)."""
    return _fresh_megatron_parser().parse_args(megatron_argv(load_recipe(TINY).megatron))


def _args(base, **kw):
    args = argparse.Namespace(**vars(base))
    args.persist_layer_norm = not args.no_persist_layer_norm  # derived by megatron's validate_args
    for key, value in kw.items():
        assert hasattr(args, key), key
        setattr(args, key, value)
    return args


def test_validate_args_accepts_the_tiny_recipe(tiny_args):
    validate_args(_args(tiny_args), load_recipe(TINY))


def test_validate_args_first_ac_layer_beyond_the_moe_layers(tiny_args):
    with pytest.raises(ConfigError, match=r"acmoe.first_ac_layer=5 but the model has only 4 MoE layers"):
        validate_args(_args(tiny_args), load_recipe(TINY, ["acmoe.first_ac_layer=5"]))
    # only layers 1 and 3 are MoE: the default first_ac_layer=3 is too large
    with pytest.raises(ConfigError, match=r"only 2 MoE layers; choose 1..2"):
        validate_args(_args(tiny_args, moe_layer_freq=[1, 0, 1, 0]), load_recipe(TINY))
    with pytest.raises(ConfigError, match=r"only 2 MoE layers"):
        validate_args(_args(tiny_args, moe_layer_freq=2), load_recipe(TINY))
    validate_args(_args(tiny_args, moe_layer_freq=2), load_recipe(TINY, ["acmoe.first_ac_layer=2"]))
    # the topk router has no AC layer, so first_ac_layer does not matter
    validate_args(_args(tiny_args), load_recipe(TINY, ["acmoe.router=topk", "acmoe.first_ac_layer=9"]))


def test_validate_args_moe_shape_and_schedule(tiny_args):
    recipe = load_recipe(TINY)
    with pytest.raises(ConfigError, match="num_experts is not set"):
        validate_args(_args(tiny_args, num_experts=None), recipe)
    with pytest.raises(ConfigError, match="moe_router_topk=3 > num_experts=2"):
        validate_args(_args(tiny_args, num_experts=2, moe_router_topk=3, expert_model_parallel_size=1), recipe)
    with pytest.raises(ConfigError, match="num_experts=6 is not divisible by expert_model_parallel_size=4"):
        validate_args(_args(tiny_args, num_experts=6, expert_model_parallel_size=4), recipe)
    with pytest.raises(ConfigError, match="lr_warmup_iters=400 must be smaller than the decay length 400"):
        validate_args(_args(tiny_args, lr_warmup_iters=400), recipe)  # train_iters=400, no lr_decay_iters
    validate_args(_args(tiny_args, lr_warmup_iters=399), recipe)
    with pytest.raises(ConfigError, match="lr_warmup_iters=20 must be smaller than the decay length 16"):
        validate_args(_args(tiny_args, lr_warmup_iters=20, lr_decay_iters=16), recipe)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only requirements apply without CUDA")
def test_validate_args_cpu_requirements_name_every_wrong_key(tiny_args):
    with pytest.raises(ConfigError) as err:
        validate_args(_args(tiny_args, distributed_backend="nccl", bf16=True, use_cpu_initialization=None),
                      load_recipe(TINY))
    msg = str(err.value)
    assert "no CUDA GPU" in msg
    assert "megatron.distributed_backend: gloo (is nccl)" in msg
    assert "megatron.bf16: False (is True)" in msg
    assert "megatron.use_cpu_initialization: True (is None)" in msg
    assert "transformer_impl" not in msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="FP8 is refused only without a GPU")
def test_validate_args_refuses_fp8_without_a_gpu(tiny_args):
    with pytest.raises(ConfigError, match="fp8"):
        validate_args(_args(tiny_args, fp8="hybrid"), load_recipe(TINY))


# ---------------------------------------------------------------------------------------------
# launcher: everything that fails before torchrun starts, in this process


def test_launcher_bad_key_returns_2_before_writing_anything(tmp_path, capsys):
    rc = launcher.main(["--config", str(TINY), "--nproc", "2", "acmoe.first_ac_lyer=2",
                        f"run.dir={tmp_path / 'run'}"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "config error" in err and "acmoe.first_ac_lyer" in err and "did you mean 'first_ac_layer'" in err
    assert not (tmp_path / "run").exists()


def test_launcher_missing_data_without_prepare_stdlib_returns_2(tmp_path, capsys):
    rc = launcher.main(["--config", str(TINY), f"data.path={tmp_path / 'none'}", "data.prepare_stdlib=false",
                        f"run.dir={tmp_path / 'run'}"])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"data.path='{tmp_path / 'none'}' has no manifest.json; build shards with `acmoe-data prepare" in err
    assert not (tmp_path / "run").exists()


def test_launcher_malformed_override_returns_2(tmp_path, capsys):
    rc = launcher.main(["--config", str(TINY), "megatron.lr=[1,", f"run.dir={tmp_path / 'run'}"])
    assert rc == 2
    assert "config error" in capsys.readouterr().err


def test_expert_norm_must_be_a_positive_number_or_null():
    assert load_recipe(TINY, ["acmoe.expert_norm=1.5"]).acmoe.expert_norm == 1.5
    assert load_recipe(TINY, ["acmoe.expert_norm=null"]).acmoe.expert_norm is None
    for bad in ("0", "-1.5", "abc", "true"):
        with pytest.raises(ConfigError, match="acmoe.expert_norm=.*give a positive row norm"):
            load_recipe(TINY, [f"acmoe.expert_norm={bad}"])


def test_validate_args_expert_norm_needs_reachable_main_params(tiny_args):
    recipe = load_recipe(TINY, ["acmoe.expert_norm=1.5"])
    with pytest.raises(ConfigError, match="use_precision_aware_optimizer: false, or acmoe.expert_norm: null"):
        validate_args(_args(tiny_args, use_precision_aware_optimizer=True), recipe)
    validate_args(_args(tiny_args, use_precision_aware_optimizer=True), load_recipe(TINY))  # free norm: fine


def test_hash_leaves_out_keys_newer_than_recorded_runs_while_at_default():
    import hashlib
    import json

    recipe = load_recipe(TINY)
    d = recipe.to_dict()
    for key in ("compile", "expert_norm", "lead_router"):
        d["acmoe"].pop(key)  # what the recipe looked like to runs recorded before these keys existed
    for key in ("peak_tflops", "per_expert_scalars_max", "image_interval", "trace_samples", "checkpoint_checksums",
                "checkpoint_verify", "hang_timeout_s", "hang_timeout_checkpoint_s"):
        d["run"].pop(key)
    for key in ("shuffle_window", "blend", "cache_dir"):
        d["data"].pop(key)
    legacy = hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert recipe.hash() == legacy
    assert load_recipe(TINY, ["acmoe.expert_norm=1.5"]).hash() != legacy
    assert load_recipe(TINY, ["acmoe.compile=true"]).hash() != legacy
    assert load_recipe(TINY, ["acmoe.lead_router=cosine"]).hash() != legacy
    assert load_recipe(TINY, ["run.per_expert_scalars_max=64"]).hash() != legacy
    assert load_recipe(TINY, ["run.trace_samples=true"]).hash() != legacy
    assert load_recipe(TINY, ["run.checkpoint_verify=full"]).hash() != legacy
    assert load_recipe(TINY, ["run.hang_timeout_s=60"]).hash() != legacy
    assert load_recipe(TINY, ["data.shuffle_window=4096"]).hash() != legacy
