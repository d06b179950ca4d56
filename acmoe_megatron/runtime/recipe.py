"""YAML run recipes: megatron flags + our AC/data/run settings, with overrides and strict keys.

A recipe has five sections (all optional except ``megatron``):

    megatron:  any argument of Megatron's trainer, by its argparse name with underscores
               (``num_layers: 4`` → ``--num-layers 4``; ``true`` on a switch adds it,
               ``false`` on a ``--no-*`` switch adds that). Checked against megatron's own parser.
    acmoe:     ``settings.ACSettings`` (router type, first AC layer, eps, clip, cluster rows).
    elliptical: ``settings.EllipticalSettings`` (Elliptical Attention on/off, first layer,
               source ``sequence``/``prefix``, scale ``standard``/``none``); works with every router.
    data:      ``DataSettings`` (webdataset shard directory with its manifest, shuffle seed).
    run:       ``RunSettings`` (run directory; TensorBoard/checkpoint paths are derived from it).

Overrides use the same names: ``megatron.lr=3e-4 acmoe.first_ac_layer=2 run.dir=runs/x`` (values
are parsed as YAML). Unknown sections or keys are errors that name the key and suggest the fix.
The resolved recipe is written to ``<run.dir>/config.yaml`` so every run is reproducible.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from acmoe_megatron.core.errors import ConfigError
from acmoe_megatron.core.settings import ACSettings, EllipticalSettings, check_types
from acmoe_megatron.runtime.checkpoint_digest import VERIFY_MODES
from acmoe_megatron.runtime.dependencies import check_installed

SECTIONS = ("megatron", "acmoe", "elliptical", "data", "run")


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.1 reads ``3e-4`` (no dot) as a string; recipes mean a float."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml(text: str, where: str):
    try:
        return yaml.load(text, Loader=_YamlLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML ({err})") from err


@dataclass(frozen=True)
class DataSettings:
    path: str = "data/stdlib"  # directory with manifest.json + webdataset shards (acmoe-data prepare)
    prepare_stdlib: bool = True  # build the embedded stdlib corpus at ``path`` if it is missing
    seed: int = 1234  # shuffle seed of the training stream
    verify_checksums: bool = False  # sha256 of each shard against the manifest when first read
    shuffle_window: int | None = 2**20  # samples per shuffle window of a larger split (null: whole split);
    #   the default is sample_order.DEFAULT_WINDOW (not imported: recipes load without the data code)
    # [w1, dir1, w2, dir2, ...]: train on these shard directories blended by megatron's
    # BlendedMegatronDatasetBuilder (data/megatron/, docs/data.md) instead of path alone
    blend: list | None = None
    cache_dir: str | None = None  # local cache of a URL / pipe: data.path's shards (default $TMPDIR/acmoe-shards/...)

    def __post_init__(self):
        check_types(dataclasses.replace(self, blend=None) if self.blend is not None else self, "data")
        if self.shuffle_window is not None and self.shuffle_window < 1:
            raise ValueError(f"data.shuffle_window={self.shuffle_window}: a number of samples >= 1, or null "
                             "(one permutation of the whole split, O(samples) memory)")
        if self.blend is not None:
            self._check_blend()

    def _check_blend(self) -> None:
        """``blend`` alternates positive weights and shard directories. It replaces ``path`` as the
        training data, so ``path`` becomes the first directory unless it is one of them (the launch
        checks read the manifest at ``data.path``; no embedded corpus is built for a blend)."""
        blend = self.blend
        weights, dirs = (blend[0::2], blend[1::2]) if isinstance(blend, list) else ([], [])
        if not blend or not dirs or len(blend) % 2 or not all(isinstance(d, str) for d in dirs) \
                or not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
            raise ValueError(f"data.blend={blend!r}: write [weight1, dir1, weight2, dir2, ...], a positive number "
                             "before each shard directory")
        for w, d in zip(weights, dirs):
            if not (w > 0 and w != float("inf")):
                raise ValueError(f"data.blend: weight {w} of {d} is not a positive number; weights are > 0 (they "
                                 "are normalised to sum to 1, as megatron does): drop a directory instead of weight 0")
            if not (Path(d) / "manifest.json").is_file():
                raise ValueError(f"data.blend: {d} is not a shard directory (no manifest.json); build it with "
                                 f"`acmoe-data prepare --out {d} ...` or "
                                 f"`acmoe-data from-megatron PREFIX --out {d} ...`")
        if self.path not in dirs:
            object.__setattr__(self, "path", dirs[0])


@dataclass(frozen=True)
class RunSettings:
    dir: str = "runs/default"  # TensorBoard in dir/tensorboard, checkpoints in dir/checkpoints
    name: str = ""  # free-form label written to the summary
    log_router_grad_norms: bool = False  # per step, per router: dir/router_grad_norms_rank*.jsonl
    keep_last_checkpoints: int = 0  # after each save keep only the newest N iter_* dirs (0 = keep all)
    peak_tflops: float | None = None  # per-device peak for throughput/mfu (null: the table of known GPUs)
    per_expert_scalars_max: int = 16  # per-expert load scalars only up to this many experts (histograms always)
    image_interval: int = 100  # expert-load heatmap + AC weight distribution images every N steps (0: none)
    trace_samples: bool = False  # the sample ids of every training micro-batch: dir/sample_trace/ (sample_trace.py)
    checkpoint_checksums: bool = True  # SHA-256 of every checkpoint file after each save (checkpoint_digest.py)
    checkpoint_verify: str = "auto"  # before a resume: auto | full | sample | sizes (checkpoint_digest.verify)
    # hang detection (runtime/hang_watch.py): the run ends (exit 124) when no rank makes progress for
    # this long; 0: off. Below megatron.distributed_timeout_minutes (10 min), which is the backstop.
    hang_timeout_s: float = 180.0
    # the same bound for checkpoint saves and loads, start-up and the first step of a start
    hang_timeout_checkpoint_s: float = 540.0

    def __post_init__(self):
        check_types(self, "run")
        if self.keep_last_checkpoints < 0:
            raise ValueError(f"run.keep_last_checkpoints={self.keep_last_checkpoints}: must be >= 0 (0 keeps all)")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ValueError(f"run.peak_tflops={self.peak_tflops}: a positive TFLOP/s per device, or null")
        if self.image_interval < 0:
            raise ValueError(f"run.image_interval={self.image_interval}: must be >= 0 (0: no images)")
        if self.checkpoint_verify not in VERIFY_MODES:
            raise ValueError(f"run.checkpoint_verify={self.checkpoint_verify!r}: choose one of {VERIFY_MODES}")
        if self.per_expert_scalars_max < 0:
            raise ValueError(f"run.per_expert_scalars_max={self.per_expert_scalars_max}: must be >= 0")
        if self.hang_timeout_s < 0 or self.hang_timeout_checkpoint_s < 0:
            raise ValueError(f"run.hang_timeout_s={self.hang_timeout_s}, run.hang_timeout_checkpoint_s="
                             f"{self.hang_timeout_checkpoint_s}: seconds >= 0 (0: no hang detection)")
        if self.hang_timeout_s and self.hang_timeout_checkpoint_s < self.hang_timeout_s:
            raise ValueError(f"run.hang_timeout_checkpoint_s={self.hang_timeout_checkpoint_s} is below run.hang_timeout_s="
                             f"{self.hang_timeout_s}: the bound for checkpoints and start-up is the longer one; raise it")


@dataclass
class Recipe:
    megatron: dict[str, Any] = field(default_factory=dict)
    acmoe: ACSettings = field(default_factory=ACSettings)
    elliptical: EllipticalSettings = field(default_factory=EllipticalSettings)
    data: DataSettings = field(default_factory=DataSettings)
    run: RunSettings = field(default_factory=RunSettings)

    def to_dict(self) -> dict[str, Any]:
        return {
            "megatron": dict(self.megatron),
            "acmoe": dataclasses.asdict(self.acmoe),
            "elliptical": dataclasses.asdict(self.elliptical),
            "data": dataclasses.asdict(self.data),
            "run": dataclasses.asdict(self.run),
        }

    def hash(self) -> str:
        """Identity of the configuration (summaries, cached benchmark runs). Keys added after runs
        were recorded (``HASH_OMITS_AT_DEFAULT``) are left out while they hold their default, so an
        old run's recorded hash still names the same configuration."""
        blob = json.dumps(self.identity_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def identity_dict(self) -> dict[str, Any]:
        """``to_dict`` less the ``HASH_OMITS_AT_DEFAULT`` keys that hold their default."""
        d = self.to_dict()
        defaults = Recipe().to_dict()
        for section, keys in HASH_OMITS_AT_DEFAULT.items():
            for key in keys:
                if d[section].get(key) == defaults[section][key]:
                    d[section].pop(key, None)
        return d


# Keys added since recorded runs (summaries, benchmarks/results/*/runs): hashed only when set.
HASH_OMITS_AT_DEFAULT: dict[str, tuple[str, ...]] = {"acmoe": ("compile", "expert_norm", "lead_router"),
                                                      "data": ("shuffle_window", "blend", "cache_dir"),
                                                      "run": ("peak_tflops", "per_expert_scalars_max",
                                                              "image_interval", "trace_samples",
                                                              "checkpoint_checksums", "checkpoint_verify",
                                                              "hang_timeout_s", "hang_timeout_checkpoint_s")}


def _suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _build_dataclass(cls, section: str, values: dict[str, Any]):
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"section {section!r} must be a mapping, got {type(values).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise ConfigError(
                f"unknown key {section}.{key}{_suggest(key, names)}; known keys: {sorted(names)}"
            )
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from err


def parse_override(text: str) -> tuple[str, str, Any]:
    """``section.key=value`` → (section, key, YAML-parsed value)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override {text!r}: write SECTION.KEY=VALUE, e.g. megatron.lr=3e-4")
    lhs, raw = text.split("=", 1)
    section, key = lhs.split(".", 1)
    if section not in SECTIONS:
        raise ConfigError(f"override {text!r}: unknown section {section!r}{_suggest(section, SECTIONS)}")
    if raw[:1] in "*&!|>%@`" and raw != "":  # YAML syntax characters: a hybrid pattern such as *E*E is text
        try:
            return section, key, _yaml(raw, f"override {text!r}")
        except ConfigError as err:
            raise ConfigError(f"{err}; a value starting with {raw[0]!r} is YAML syntax: quote it, e.g. "
                              f"{section}.{key}=\"'{raw}'\"") from None
    return section, key, _yaml(raw, f"override {text!r}") if raw != "" else None


def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> Recipe:
    """Read a YAML recipe, apply ``section.key=value`` overrides and validate every key."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} not found; recipes live in configs/")
        raw = _yaml(p.read_text(), str(p)) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: a recipe must be a mapping of sections {SECTIONS}")
    for section in raw:
        if section not in SECTIONS:
            raise ConfigError(f"unknown section {section!r}{_suggest(section, SECTIONS)}; sections: {SECTIONS}")
    for section in SECTIONS:
        if raw.get(section) is not None and not isinstance(raw[section], dict):
            raise ConfigError(f"section {section!r} must be a mapping of keys, got {raw[section]!r}")
    raw = {s: dict(raw.get(s) or {}) for s in SECTIONS}
    for text in overrides:
        section, key, value = parse_override(text)
        raw[section][key] = value
    # our own sections first: an error in them is refused before megatron (and torch) is imported,
    # which the megatron keys' check needs (megatron's own argument parser)
    ours = dict(
        acmoe=_build_dataclass(ACSettings, "acmoe", raw["acmoe"]),
        elliptical=_build_dataclass(EllipticalSettings, "elliptical", raw["elliptical"]),
        data=_build_dataclass(DataSettings, "data", raw["data"]),
        run=_build_dataclass(RunSettings, "run", raw["run"]),
    )
    megatron = raw["megatron"]
    check_megatron_keys(megatron)
    return Recipe(megatron=megatron, **ours)


# ---------------------------------------------------------------------------------------------
# megatron flags


_PARSER_CACHE: dict[str, list[argparse.Action]] | None = None


def _quiet_megatron_import() -> None:
    """Importing megatron warns about missing Transformer Engine / Apex and CUDA: noise in front of
    a launcher's one-line answer (the workers report what they really use)."""
    import logging
    import warnings

    check_installed()  # a package that would break the import below is refused by name first
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import megatron.core.models.gpt.gpt_layer_specs  # noqa: F401
        import megatron.training.arguments  # noqa: F401


def megatron_actions() -> dict[str, list[argparse.Action]]:
    """dest → argparse actions of Megatron's trainer parser (megatron.training.arguments)."""
    global _PARSER_CACHE
    if _PARSER_CACHE is None:
        _quiet_megatron_import()
        from megatron.training.arguments import add_megatron_arguments

        parser = add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
        actions: dict[str, list[argparse.Action]] = {}
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                actions.setdefault(action.dest, []).append(action)
        _PARSER_CACHE = actions
    return _PARSER_CACHE


def check_megatron_keys(values: dict[str, Any]) -> None:
    actions = megatron_actions()
    for key in values:
        if key not in actions:
            raise ConfigError(
                f"unknown megatron option megatron.{key}{_suggest(key, actions)}: keys are "
                "megatron.training argument names with '_' (e.g. num_layers for --num-layers)"
            )


def _long_option(action: argparse.Action) -> str:
    longs = [o for o in action.option_strings if o.startswith("--")]
    return longs[0] if longs else action.option_strings[0]


def megatron_argv(values: dict[str, Any]) -> list[str]:
    """Translate the ``megatron`` section into Megatron's command-line flags."""
    actions = megatron_actions()
    argv: list[str] = []
    for key, value in values.items():
        if value is None:
            continue
        candidates = actions[key]
        bool_actions = [a for a in candidates if isinstance(a, (argparse._StoreTrueAction, argparse._StoreFalseAction))]
        if bool_actions:
            if not isinstance(value, bool):
                raise ConfigError(f"megatron.{key} is a switch: use true or false, not {value!r}")
            wanted = [a for a in bool_actions if a.const is value]
            if wanted:
                argv.append(_long_option(wanted[0]))
            elif value != bool(bool_actions[0].default):
                raise ConfigError(f"megatron.{key}={value}: megatron has no flag for this value")
            continue
        action = candidates[0]
        option = _long_option(action)
        if action.nargs in ("+", "*") or isinstance(action.nargs, int):
            items = value if isinstance(value, (list, tuple)) else [value]
            argv += [option] + [str(v) for v in items]
        elif isinstance(value, (list, tuple)):
            argv += [option, json.dumps(list(value), separators=(",", ":"))]  # moe_layer_freq: "[1,0,1,0]"
        else:
            argv += [option, str(value)]
    return argv


def write_resolved(recipe: Recipe, run_dir: Path) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "config.yaml"
    tmp = out.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    tmp.replace(out)
    return out
