"""What every command shares: a free local port, the torchrun of a worker module, the checkpoint
checks of the commands that load a trained run, and plan → refuse (exit 2) → launch.

A command module parses its arguments, builds its plan with every check that needs no process
(raising ``ConfigError``), and hands both steps to ``refuse_or_launch``; nothing here imports torch
or megatron, so a refused command exits in the time it takes to read its recipe.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from acmoe_megatron.cli.data import main as data_main
from acmoe_megatron.core.errors import ConfigError
from acmoe_megatron.core.exit_codes import EXIT_CONFIG
from acmoe_megatron.data.megatron.keys import uses_megatron_data
from acmoe_megatron.data.shards.remote import is_remote
from acmoe_megatron.runtime.checkpoint_check import stats_path
from acmoe_megatron.runtime.lifetime import wrapped
from acmoe_megatron.runtime.recipe import load_recipe

T = TypeVar("T")

# overrides that load a run into one process (acmoe-generate, acmoe-export-hf): the checkpoint,
# saved in any layout, is resharded on load
ONE_PROCESS = ["megatron.tensor_model_parallel_size=1", "megatron.pipeline_model_parallel_size=1",
               "megatron.expert_model_parallel_size=1", "megatron.context_parallel_size=1",
               "megatron.micro_batch_size=1", "megatron.global_batch_size=1"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (torchrun's rendezvous, test servers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(module: str, nproc: int, args: list[str], *, prog: str, what: str, echo: bool = False) -> int:
    """torchrun ``nproc`` local processes of ``python -m module args`` (the workers of acmoe-eval,
    acmoe-generate, acmoe-export-hf); their exit code, with a line naming ``what`` failed."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", module, *args]
    if echo:
        print(f"[{prog}] " + " ".join(cmd), flush=True)
    rc = subprocess.call(wrapped(cmd), env=env)  # torchrun dies with this command (runtime/lifetime.py)
    if rc != 0:
        print(f"{prog}: {what} failed (exit {rc}); see the log above", file=sys.stderr)
    return rc


def refuse_or_launch(prog: str, plan: Callable[[], T], launch: Callable[[T], int]) -> int:
    """``launch(plan())``, or exit 2 with the plan's ``ConfigError`` before any process starts."""
    try:
        planned = plan()
    except ConfigError as err:
        print(f"{prog}: config error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    return launch(planned)


def check_checkpoint(ckpt: Path, iteration: int | None) -> None:
    """``ckpt`` holds megatron checkpoints, and iteration ``iteration`` if one is asked for."""
    latest = ckpt / "latest_checkpointed_iteration.txt"
    if not latest.is_file():
        raise ConfigError(f"{ckpt} holds no checkpoint (no latest_checkpointed_iteration.txt); train the run first "
                          "or give a run directory with checkpoints/")
    if iteration is not None and not (ckpt / f"iter_{iteration:07d}").is_dir():
        have = sorted(p.name for p in ckpt.glob("iter_*"))
        raise ConfigError(f"--iteration {iteration}: {ckpt} has no iter_{iteration:07d} (it has {have})")


def checkpoint_iteration(ckpt: Path, iteration: int | None) -> int:
    """The iteration a command loads: ``--iteration`` or megatron's latest."""
    if iteration is not None:
        return iteration
    text = (ckpt / "latest_checkpointed_iteration.txt").read_text().strip()
    if not text.isdigit():
        raise ConfigError(f"{ckpt}/latest_checkpointed_iteration.txt holds {text!r}, not an iteration; "
                          "give --iteration N")
    return int(text)


def single_process_plan(run_dir: Path, iteration: int | None, overrides: list[str], why: str):
    """(recipe, overrides, worker arguments) for loading a trained run into one process with a
    batch-independent AC transform (acmoe-generate, acmoe-export-hf), or ConfigError."""
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} is not a run directory of acmoe-pretrain (no config.yaml)")
    overrides = [f"run.dir={run_dir}", *overrides, *ONE_PROCESS]
    if iteration is not None:
        overrides.append(f"megatron.ckpt_step={iteration}")
    recipe = load_recipe(run_dir / "config.yaml", overrides)
    ckpt = Path(recipe.megatron.get("load") or run_dir / "checkpoints")
    check_checkpoint(ckpt, iteration)
    worker = []
    if recipe.acmoe.router == "ac" and recipe.acmoe.source == "batch":
        stats_file = stats_path(ckpt, checkpoint_iteration(ckpt, iteration))
        if not stats_file.is_file():
            raise ConfigError(
                f"the run's AC layers were trained with acmoe.source=batch: they route with the statistics of their "
                f"batch, {why}. Calibrate them first: `acmoe-eval {run_dir} --calibrate 64` (writes {stats_file})")
        worker += ["--stats-file", str(stats_file)]
    return recipe, overrides, worker


def ensure_data(recipe) -> None:
    """Build the embedded default corpus if the recipe points at a missing directory."""
    path = Path(recipe.data.path)
    if uses_megatron_data(recipe.megatron) or is_remote(recipe.data.path) or (path / "manifest.json").is_file():
        return  # megatron's indexed data needs no shards; a remote manifest is read by the launch checks
    if not recipe.data.prepare_stdlib:
        raise ConfigError(
            f"no shard manifest at {path}/manifest.json; build shards with "
            f"`acmoe-data prepare --source ... --out {path}` or set data.prepare_stdlib: true"
        )
    seq = recipe.megatron.get("seq_length")
    if seq is None:
        raise ConfigError("megatron.seq_length is needed to build the embedded corpus shards")
    print(f"[acmoe] building the embedded stdlib corpus at {path} (seq_length {seq})", flush=True)
    rc = data_main(["prepare", "--source", "stdlib", "--out", str(path), "--seq-length", str(seq)])
    if rc:
        raise SystemExit(rc)
