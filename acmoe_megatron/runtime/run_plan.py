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

from acmoe_megatron.core.errors import ConfigError
from acmoe_megatron.data.megatron.keys import megatron_data_prefixes, uses_megatron_data
from acmoe_megatron.data.megatron.sidecar import sidecar_tokenizer
from acmoe_megatron.data.shards.manifest import read_manifest
from acmoe_megatron.data.shards.remote import is_remote
from acmoe_megatron.data.tokenizers.byte import VOCAB_SIZE


def parallel_layout(megatron: dict, world_size: int) -> dict[str, int]:
    """Megatron's process layout for ``world_size`` ranks, from the recipe's ``megatron`` section;
    ConfigError naming the sizes when they do not tile (the one place these rules are stated in our
    words; megatron's validate_args checks them again in build_plan and in every worker)."""
    def size(key: str, default: int = 1) -> int:
        value = megatron.get(key)
        return int(value) if value is not None else default

    tp, pp, cp = size("tensor_model_parallel_size"), size("pipeline_model_parallel_size"), size("context_parallel_size")
    ep = size("expert_model_parallel_size")
    etp = size("expert_tensor_parallel_size", tp)
    if world_size < 1:
        raise ConfigError(f"world size {world_size}: need at least one process")
    if world_size % (tp * pp * cp):
        raise ConfigError(
            f"{world_size} processes cannot be split into tensor {tp} x pipeline {pp} x context {cp} "
            f"(= {tp * pp * cp}) model-parallel groups: use a multiple of {tp * pp * cp} processes or change "
            "megatron.tensor/pipeline/context_model_parallel_size"
        )
    if world_size % (etp * ep * pp):
        raise ConfigError(
            f"{world_size} processes cannot hold expert parallel {ep} x expert-tensor {etp} x pipeline {pp} "
            f"(= {etp * ep * pp}, megatron's expert process groups): use a multiple of {etp * ep * pp} processes, "
            "or change megatron.expert_model_parallel_size"
        )
    dp = world_size // (tp * pp * cp)
    mbs = size("micro_batch_size")
    gbs = size("global_batch_size", mbs * dp)
    if gbs % (mbs * dp):
        raise ConfigError(
            f"megatron.global_batch_size={gbs} is not divisible by micro_batch_size x data parallel = "
            f"{mbs} x {dp} (data parallel = {world_size} processes / (tp {tp} x pp {pp} x cp {cp})): use a "
            f"multiple of {mbs * dp}"
        )
    experts = megatron.get("num_experts")
    if experts and int(experts) % ep:
        raise ConfigError(f"megatron.num_experts={experts} is not divisible by expert_model_parallel_size={ep}")
    return {"world": world_size, "tp": tp, "pp": pp, "cp": cp, "ep": ep, "etp": etp, "dp": dp,
            "expert_dp": world_size // (etp * ep * pp), "grad_accum": gbs // (mbs * dp)}


@dataclass(frozen=True)
class RunPlan:
    recipe: object  # config.Recipe
    world_size: int
    layout: dict  # parallel_layout: tp, pp, cp, ep, etp, dp, expert_dp, grad_accum
    argv: tuple[str, ...]  # Megatron's flags for this recipe
    args: argparse.Namespace  # Megatron's parsed and validated arguments at ``world_size``
    data_ready: bool  # False: the job builds the embedded corpus first

    @property
    def data_parallel_size(self) -> int:
        return self.args.data_parallel_size


def _stdlib_standin(recipe):
    """What ``ensure_data`` will build: the byte-level stdlib corpus at the recipe's seq_length."""

    seq = recipe.megatron.get("seq_length")
    if seq is None:
        raise ConfigError("megatron.seq_length is needed to build the embedded corpus shards")
    return SimpleNamespace(seq_length=int(seq), tokenizer={"vocab_size": VOCAB_SIZE, "name": "byte"})


def megatron_data_standin(recipe):
    """For megatron's own indexed data (no shard manifest): the tokenizer the run's summary records,
    from the acmoe sidecars next to the prefixes or from the recipe's megatron keys."""

    try:
        tok = sidecar_tokenizer([prefix for _, prefix in megatron_data_prefixes(recipe.megatron)])
    except (ValueError, OSError) as err:
        raise ConfigError(str(err)) from None
    if tok is None:
        tok = {"name": recipe.megatron.get("tokenizer_type", "NullTokenizer"),
               "vocab_size": recipe.megatron.get("vocab_size")}
    return SimpleNamespace(seq_length=recipe.megatron.get("seq_length"), tokenizer=tok, splits={})


def _read_data(recipe, vocab_standin: int | None = None):
    """(manifest, ready): the shard manifest, with every shard file checked by presence and size
    (megatron's indexed data: a stand-in; megatron's builder checks its files). ``vocab_standin``:
    a data directory that is not prepared yet stands for a corpus of that vocabulary (estimates)."""

    if uses_megatron_data(recipe.megatron):
        return megatron_data_standin(recipe), True

    if is_remote(recipe.data.path):  # a URL / pipe: command: the manifest now, each shard checked when fetched
        try:
            return read_manifest(recipe.data.path), True
        except (OSError, ValueError) as err:
            raise ConfigError(f"data.path={recipe.data.path!r}: {err}") from None
    path = Path(recipe.data.path)
    if not (path / "manifest.json").is_file():
        if vocab_standin is not None:
            return SimpleNamespace(seq_length=int(recipe.megatron.get("seq_length") or 0),
                                   tokenizer={"vocab_size": vocab_standin, "name": "stand-in"}), False
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
    """Megatron's parser reads sys.argv and WORLD_SIZE/RANK from the environment, and validate_args
    checks CUDA_DEVICE_MAX_CONNECTIONS, which both launchers give the workers (default 1)."""
    keys = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "CUDA_DEVICE_MAX_CONNECTIONS")
    saved_argv, saved_env = sys.argv, {k: os.environ.get(k) for k in keys}
    sys.argv = ["acmoe-plan", *argv]
    os.environ.update(WORLD_SIZE=str(world_size), RANK="0", LOCAL_RANK="0")
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")  # what the workers get (launcher, env_defaults.sh)
    try:
        yield
    finally:
        sys.argv = saved_argv
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _planned_gpu(remote: bool):
    """A run planned here for other machines (a SLURM job from a login node without GPUs): megatron's
    ``validate_args`` asks CUDA for the device capability (``moe_grouped_gemm``), which raises where no
    driver is. The question is about the target nodes, so it gets Hopper's answer (9, 0) here; the
    preflight asks the real GPUs on the nodes. Nothing changes where CUDA is present, or for a
    local run (its CUDA-less failure is the right answer there)."""
    import torch

    if not remote or torch.cuda.is_available():
        yield
        return
    saved = torch.cuda.get_device_capability
    torch.cuda.get_device_capability = lambda device=None: (9, 0)
    try:
        yield
    finally:
        torch.cuda.get_device_capability = saved


def megatron_args(argv: list[str], world_size: int, ours=None, remote: bool = False) -> argparse.Namespace:
    """Megatron's ``parse_args`` + ``validate_args`` for ``world_size`` processes, quietly (its
    700-line argument dump is dropped); ConfigError with megatron's own message when it refuses.
    ``ours(args)`` runs between the two: our checks name the recipe key where megatron's message
    for the same problem does not. ``remote``: the processes run on other machines."""
    from acmoe_megatron.runtime import cpu_runtime  # torch: this module is imported by the commands
    cpu_runtime.install_for_training()  # without CUDA, megatron's validate_args asks CUDA too (device arch)
    from megatron.training.arguments import parse_args, validate_args

    out, err = io.StringIO(), io.StringIO()
    with (_as_world(world_size, argv), _planned_gpu(remote), contextlib.redirect_stdout(out),
          contextlib.redirect_stderr(err)):
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


def build_plan(recipe, world_size: int, host_checks: bool = True, vocab_standin: int | None = None) -> RunPlan:
    """Validate ``recipe`` for ``world_size`` processes; the plan or a ConfigError naming the fix.
    ``host_checks=False``: the run happens on other machines (SLURM), so leave out the checks that
    depend on this one (CUDA present, FP8 capability). ``vocab_standin``: plan a recipe whose data
    is not prepared yet as if its tokenizer had that vocabulary (the preflight's memory estimate)."""
    from acmoe_megatron.runtime.megatron_args import build_argv, validate_args

    layout = parallel_layout(recipe.megatron, world_size)  # our message for the layout, before megatron's
    manifest, ready = _read_data(recipe, vocab_standin)
    argv = build_argv(recipe, manifest)
    args = megatron_args(argv, world_size, ours=lambda a: validate_args(a, recipe, host_checks=host_checks),
                         remote=not host_checks)
    if ready and manifest.splits:  # megatron's indexed data: its builder checks the split sizes
        _check_split_sizes(recipe, manifest, args)
    return RunPlan(recipe=recipe, world_size=world_size, layout=layout, argv=tuple(argv), args=args,
                   data_ready=ready)


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
