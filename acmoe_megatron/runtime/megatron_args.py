"""Recipe → Megatron's command-line arguments, and the checks made before any model is built.

``build_argv`` turns a recipe's ``megatron`` section into Megatron's flags and adds the run paths
and the data-derived flags (sequence length, tokenizer, vocabulary from the shard manifest; a
mismatch is an error). Three data sources (``data/megatron/``, docs/data.md): the shards
of ``data.path`` read by our iterators (``dataloader_type: external``); megatron's own indexed
data named by megatron's keys (``data_path``, ``train/valid/test_data_path``, ...; its samplers,
``dataloader_type: single`` or ``cyclic``), whose vocabulary comes from the acmoe sidecars next to
the prefixes or from the recipe's tokenizer keys; or ``data.blend`` of shard directories through
megatron's blending (megatron's samplers too). ``validate_args`` runs on Megatron's parsed
arguments: in the launching process (run_plan.build_plan) and again in each worker before
``pretrain`` builds anything. Each error names the setting and the fix.
"""

from __future__ import annotations

from pathlib import Path

from acmoe_megatron.core.errors import ConfigError
from acmoe_megatron.data.megatron.keys import (
    MEGATRON_DATA_KEYS,
    check_shard_blend,
    megatron_data_prefixes,
    uses_megatron_data,
)
from acmoe_megatron.data.megatron.sidecar import read_sidecar, sidecar_tokenizer
from acmoe_megatron.model.checks import check_expert_bias, check_settings
from acmoe_megatron.runtime.recipe import megatron_argv


def build_argv(recipe, manifest) -> list[str]:
    """Megatron flags for a recipe: its ``megatron`` section + run paths + data-derived flags."""

    mg = dict(recipe.megatron)
    run_dir = Path(recipe.run.dir)
    mg.setdefault("tensorboard_dir", str(run_dir / "tensorboard"))
    mg.setdefault("save", str(run_dir / "checkpoints"))
    mg.setdefault("load", mg["save"])
    source = _data_source(recipe, mg)
    mg.setdefault("dataloader_type", "external" if source == "shards" else "single")
    if mg.get("num_experts"):
        mg.setdefault("moe_per_layer_logging", True)  # megatron's aux/z-loss per MoE layer, not only the mean
    if source == "shards":
        if mg["dataloader_type"] != "external":
            raise ConfigError(
                f"megatron.dataloader_type must be 'external' (is {mg['dataloader_type']!r}): the data.path shards "
                "are read by our iterators; megatron's samplers (single, cyclic) read megatron.data_path (indexed "
                "data) or data.blend"
            )
    elif mg["dataloader_type"] not in ("single", "cyclic"):
        what = "megatron's indexed data" if source == "megatron" else "data.blend"
        raise ConfigError(
            f"megatron.dataloader_type={mg['dataloader_type']!r}: {what} is read through megatron's datasets "
            "and samplers: set megatron.dataloader_type: single (or cyclic), or leave it out"
        )
    if source == "megatron":
        _megatron_data_flags(mg)
        return megatron_argv(mg)
    where = recipe.data.path
    if source == "blend":  # the blended directories' manifests (data.path's is one of them, or another)

        try:
            manifest = check_shard_blend(recipe.data.blend[1::2])
        except (ValueError, OSError) as err:
            raise ConfigError(str(err)) from None
        where = "data.blend"
    seq = manifest.seq_length
    if mg.setdefault("seq_length", seq) != seq:
        raise ConfigError(
            f"megatron.seq_length={mg['seq_length']} but the shards in {where} hold "
            f"{seq}-token samples; re-run `acmoe-data prepare --seq-length {mg['seq_length']}` "
            "or change megatron.seq_length"
        )
    mg.setdefault("max_position_embeddings", seq)
    mg.setdefault("tokenizer_type", "NullTokenizer")
    vocab = manifest.tokenizer["vocab_size"]
    if mg["tokenizer_type"] == "NullTokenizer":
        if mg.setdefault("vocab_size", vocab) != vocab:
            raise ConfigError(
                f"megatron.vocab_size={mg['vocab_size']} but the shard manifest says {vocab} "
                f"(tokenizer {manifest.tokenizer['name']}); remove the key or fix it"
            )
    return megatron_argv(mg)


def _data_source(recipe, mg: dict) -> str:
    """"megatron" (megatron's own datasets), "blend" (data.blend) or "shards" (data.path)."""

    blend = recipe.data.blend
    if uses_megatron_data(mg):
        if blend:
            keys = [k for k in MEGATRON_DATA_KEYS if mg.get(k)]
            raise ConfigError(f"both megatron.{keys[0]} and data.blend name the training data: keep one (megatron's "
                              "indexed prefixes, or data.blend of shard directories)")
        return "megatron"
    return "blend" if blend else "shards"


def _megatron_data_flags(mg: dict) -> None:
    """seq_length, vocabulary and EOD for megatron's own data, from the acmoe sidecars next to its
    prefixes (``acmoe-data to-megatron`` writes them) or, without sidecars, from the recipe."""

    try:
        prefixes = [prefix for _, prefix in megatron_data_prefixes(mg)]
        tok = sidecar_tokenizer(prefixes)
        seqs = sorted({side["seq_length"] for side in map(read_sidecar, prefixes) if side is not None})
    except (ValueError, OSError) as err:
        raise ConfigError(str(err)) from None
    if "seq_length" not in mg:
        if len(seqs) != 1:
            raise ConfigError("megatron.seq_length is needed: megatron's GPTDataset packs the indexed documents "
                              "into samples of that length (the data does not fix it)")
        mg["seq_length"] = seqs[0]  # what the shards it was converted from had
    mg.setdefault("max_position_embeddings", mg["seq_length"])
    mg.setdefault("tokenizer_type", "NullTokenizer")
    if mg["tokenizer_type"] != "NullTokenizer":
        return  # megatron's tokenizer; check_megatron_data compares it with the sidecars at start-up
    if tok is None:
        if mg.get("vocab_size") is None:
            raise ConfigError(
                f"megatron.vocab_size is needed: the indexed data {prefixes[0] if prefixes else ''} has no acmoe "
                "sidecar saying its vocabulary; set megatron.vocab_size (and null_tokenizer_eod_id) to those of the "
                "tokenizer that made it, or convert it from shards with `acmoe-data to-megatron`"
            )
        return
    vocab, eod = int(tok["vocab_size"]), int(tok["eod"])
    if mg.setdefault("vocab_size", vocab) != vocab:
        raise ConfigError(f"megatron.vocab_size={mg['vocab_size']} but the indexed data {prefixes[0]} was tokenized "
                          f"with {tok['name']!r} (vocab_size {vocab}); remove the key or fix it")
    if eod != vocab - 1 or mg.get("null_tokenizer_eod_id") is not None:  # NullTokenizer's default EOD: vocab - 1
        if mg.setdefault("null_tokenizer_eod_id", eod) != eod:
            raise ConfigError(f"megatron.null_tokenizer_eod_id={mg['null_tokenizer_eod_id']} but the indexed data "
                              f"{prefixes[0]} ends documents with EOD {eod}; remove the key or fix it")


def check_hang_bounds(args, run) -> None:
    """The hang watch (run.hang_timeout_s, runtime/hang_watch.py) must fire before megatron's own
    collective timeout, which ends a hung run with a timeout trace from another rank instead."""
    minutes = args.distributed_timeout_minutes
    after_init = args.distributed_timeout_seconds_after_init
    for key, bound, limit, flag in (
            ("hang_timeout_s", run.hang_timeout_s, after_init or minutes * 60,
             "distributed_timeout_seconds_after_init" if after_init else "distributed_timeout_minutes"),
            ("hang_timeout_checkpoint_s", run.hang_timeout_checkpoint_s, minutes * 60, "distributed_timeout_minutes")):
        if run.hang_timeout_s and limit and bound >= limit:
            raise ConfigError(
                f"run.{key}={bound:g} s is not below megatron's collective timeout ({flag}: {limit:g} s), so a hung "
                f"rank would end the run with megatron's timeout trace from another rank, not with its name: lower "
                f"run.{key}, or raise megatron.{flag}")


def validate_args(args, recipe, host_checks: bool = True, training: bool = True) -> None:
    """Checks megatron does not make, before any model is built. ``host_checks=False`` leaves out
    what depends on the machine it runs on (CUDA present, FP8 capability): a SLURM job is planned
    on a login node but runs elsewhere. ``training=False`` (evaluation of a trained run) leaves out
    what fails only with gradients."""
    check_settings(args, recipe.acmoe, recipe.elliptical, host_checks=host_checks)
    if training:
        check_expert_bias(args)
        check_hang_bounds(args, recipe.run)
    if recipe.run.trace_samples:

        if recipe.data.blend or uses_megatron_data(recipe.megatron):
            raise ConfigError("run.trace_samples=true records the sample ids of data.path's shards; megatron's "
                              "indexed data and data.blend go through megatron's datasets, which do not carry "
                              "them: train from data.path, or leave run.trace_samples off")
