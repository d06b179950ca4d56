"""The run plan: everything derived from a recipe and the target world size, validated in the
launching process before ``torchrun`` or ``sbatch`` starts anything.

``build_plan(recipe, world_size)`` reads the shard manifest (sequence length, vocabulary, split
sizes; every shard file present at its recorded size), turns the recipe into Megatron's flags
(``megatron_args.build_argv``), runs **Megatron's own** ``parse_args`` and ``validate_args`` at the
target world size (``WORLD_SIZE`` set for the call; nothing of megatron's rules is re-implemented)
and then our checks (``megatron_args.validate_args``: router settings against the model, CPU
recipe on a CPU, warm-up vs decay, FP8). Every failure is a ``ConfigError`` with one line naming the
key and the fix; the launchers print it and exit 2 within seconds, instead of a traceback inside
the workers after start-up.

Used by ``acmoe-pretrain`` (world size = ``--nproc``) and ``acmoe-launch slurm`` (nodes × processes
per node). When the recipe's data directory does not exist yet and ``data.prepare_stdlib`` lets the
job build the embedded corpus there, the data-derived values are those that corpus will have.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from acmoe_megatron.config import ConfigError


@dataclass(frozen=True)
class RunPlan:
    recipe: object  # config.Recipe
    world_size: int
    argv: tuple[str, ...]  # Megatron's flags for this recipe
    args: argparse.Namespace  # Megatron's parsed and validated arguments at ``world_size``
    data_ready: bool  # False: the job builds the embedded corpus first

    @property
    def data_parallel_size(self) -> int:
        return self.args.data_parallel_size


def _stdlib_standin(recipe):
    """What ``ensure_data`` will build: the byte-level stdlib corpus at the recipe's seq_length."""
    from acmoe_megatron.data.tokenizer import VOCAB_SIZE

    seq = recipe.megatron.get("seq_length")
    if seq is None:
        raise ConfigError("megatron.seq_length is needed to build the embedded corpus shards")
    return SimpleNamespace(seq_length=int(seq), tokenizer={"vocab_size": VOCAB_SIZE, "name": "byte"})


def _read_data(recipe):
    """(manifest, ready): the shard manifest, with every shard file checked by presence and size."""
    from acmoe_megatron.data.manifest import read_manifest

    path = Path(recipe.data.path)
    if not (path / "manifest.json").is_file():
        if recipe.data.prepare_stdlib:
            return _stdlib_standin(recipe), False
        raise ConfigError(
            f"data.path={str(path)!r} has no manifest.json; build shards with `acmoe-data prepare --source ... "
            f"--out {path}` or point data.path at a shard directory"
        )
    try:
        manifest = read_manifest(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"data.path={str(path)!r}: {err}") from None
    for split, info in manifest.splits.items():
        for shard in info.shards:
            file = path / shard.file
            if not file.is_file():
                raise ConfigError(f"data.path: shard {file} of split {split!r} is missing; re-run `acmoe-data "
                                  "prepare` for this directory or restore the file")
            size = file.stat().st_size
            if size != shard.bytes:
                raise ConfigError(f"data.path: shard {file} has {size} bytes, the manifest records {shard.bytes} "
                                  "(truncated or replaced); re-run `acmoe-data prepare` or restore the file")
    return manifest, True


_FLAG = re.compile(r"argument (--[\w-]+)")


def _megatron_key(flag: str) -> str:
    return "megatron." + flag.lstrip("-").replace("-", "_")


@contextlib.contextmanager
def _as_world(world_size: int, argv: list[str]):
    """Megatron's parser reads sys.argv and WORLD_SIZE/RANK from the environment."""
    saved_argv, saved_env = sys.argv, {k: os.environ.get(k) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    sys.argv = ["acmoe-plan", *argv]
    os.environ.update(WORLD_SIZE=str(world_size), RANK="0", LOCAL_RANK="0")
    try:
        yield
    finally:
        sys.argv = saved_argv
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def megatron_args(argv: list[str], world_size: int, ours=None) -> argparse.Namespace:
    """Megatron's ``parse_args`` + ``validate_args`` for ``world_size`` processes, quietly (its
    700-line argument dump is dropped); ConfigError with megatron's own message when it refuses.
    ``ours(args)`` runs between the two: our checks name the recipe key where megatron's message
    for the same problem does not."""
    from megatron.training.arguments import parse_args, validate_args

    out, err = io.StringIO(), io.StringIO()
    with _as_world(world_size, argv), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            args = parse_args()
        except SystemExit:
            message = (err.getvalue().strip().splitlines() or ["invalid arguments"])[-1]
            message = message.split("error:", 1)[-1].strip()
            flag = _FLAG.search(message)
            key = _megatron_key(flag.group(1)) if flag else "megatron"
            raise ConfigError(f"{key}: {message}") from None
        if ours is not None:
            ours(args)
        try:
            validate_args(args, {})
        except (AssertionError, ValueError, TypeError, RuntimeError) as exc:
            raise ConfigError(f"megatron refuses this recipe with {world_size} processes: {exc}") from None
    return args


def build_plan(recipe, world_size: int, host_checks: bool = True) -> RunPlan:
    """Validate ``recipe`` for ``world_size`` processes; the plan or a ConfigError naming the fix.
    ``host_checks=False``: the run happens on other machines (SLURM), so leave out the checks that
    depend on this one (CUDA present, FP8 capability)."""
    from acmoe_megatron.megatron_args import build_argv, check_world_size, validate_args

    check_world_size(recipe, world=world_size)  # our message for the layout, before megatron's
    manifest, ready = _read_data(recipe)
    argv = build_argv(recipe, manifest)
    args = megatron_args(argv, world_size, ours=lambda a: validate_args(a, recipe, host_checks=host_checks))
    if ready:
        _check_split_sizes(recipe, manifest, args)
    return RunPlan(recipe=recipe, world_size=world_size, argv=tuple(argv), args=args, data_ready=ready)


def _check_split_sizes(recipe, manifest, args) -> None:
    """The training split must fill one global batch; evaluation needs a valid split."""
    splits = manifest.splits
    if "train" not in splits and not args.skip_train:
        raise ConfigError(f"data.path={recipe.data.path!r} has no train split (it has {sorted(splits)}); "
                          "prepare the shards with a train split")
    if "train" in splits and not args.skip_train and splits["train"].num_samples < args.global_batch_size:
        raise ConfigError(
            f"data.path={recipe.data.path!r}: the train split holds {splits['train'].num_samples} samples, fewer "
            f"than one global batch (megatron.global_batch_size={args.global_batch_size}); use more data or a "
            "smaller global batch"
        )
    if args.eval_iters and "valid" not in splits:
        raise ConfigError(f"data.path={recipe.data.path!r} has no valid split but megatron.eval_iters="
                          f"{args.eval_iters}; prepare a valid split or set megatron.eval_iters: 0")
