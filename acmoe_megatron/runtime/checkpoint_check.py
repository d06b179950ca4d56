"""Before a resume starts any process: the checkpoint it will load is there and complete.

Megatron finds the checkpoint to load from ``latest_checkpointed_iteration.txt`` (or
``megatron.ckpt_step``) and discovers a damaged one only inside the workers, after start-up, often
as a torch error far from the cause; a ``latest`` that names a deleted iteration makes it start
from scratch. This check reads what a ``torch_dist`` checkpoint records about itself: PyTorch
distributed checkpoint's ``.metadata`` lists, for every saved tensor and object, the file and byte
range it is stored in, so a missing or truncated shard file is found from the sizes alone, without
reading the data. Each problem is a ``ConfigError`` naming the file, the complete earlier
iterations and the fix: ``acmoe-pretrain ... --resume-from N`` (``resume_from``: checks iteration N,
sets the newer iterations aside as ``iter_XXXXXXX.damaged`` and makes N the latest, so this and
every later restart continue from N). Bytes changed inside a shard of the right size are found by
the checksums written at the save (``checkpoint_digest.py``: the iteration to load is hashed and
compared, ``run.checkpoint_verify``); the earlier iterations offered as choices are checked by
size only.
"""

from __future__ import annotations

import sys
from pathlib import Path

from acmoe_megatron.core.errors import ConfigError
from acmoe_megatron.runtime.checkpoint_digest import verify

TRACKER = "latest_checkpointed_iteration.txt"
INFERENCE_STATS_FILE = "acmoe_inference_stats.pt"  # acmoe-eval --calibrate's tables, inside an iteration


def iteration_dir(ckpt_dir: Path, iteration: int) -> Path:
    return ckpt_dir / f"iter_{iteration:07d}"


def stats_path(checkpoint_dir: str | Path, iteration: int) -> Path:
    """Where a checkpoint iteration's calibrated AC tables live (inside megatron's iteration directory)."""
    return iteration_dir(Path(checkpoint_dir), iteration) / INFERENCE_STATS_FILE


def problem(it_dir: Path) -> str | None:
    """Why the checkpoint in ``it_dir`` cannot be loaded (None: complete as far as sizes tell)."""
    if not it_dir.is_dir():
        return f"{it_dir} does not exist"
    if not (it_dir / ".metadata").is_file():
        if any(it_dir.glob("mp_rank_*")):
            return None  # megatron's legacy "torch" format: nothing recorded to check against
        return f"{it_dir / '.metadata'} is missing (the save did not finish)"
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(it_dir)).read_metadata()
    except Exception as exc:  # noqa: BLE001 (a damaged pickle raises anything)
        return f"{it_dir / '.metadata'} cannot be read ({type(exc).__name__}: {exc})"
    extent: dict[str, int] = {}
    for info in metadata.storage_data.values():
        extent[info.relative_path] = max(extent.get(info.relative_path, 0), info.offset + info.length)
    for name, needed in sorted(extent.items()):
        path = it_dir / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size < needed:
            return f"{path} is truncated ({size} bytes, the checkpoint's metadata needs {needed})"
    if not (it_dir / "metadata.json").is_file():
        return f"{it_dir / 'metadata.json'} (megatron's) is missing"
    return None


def complete_iterations(ckpt_dir: Path) -> list[int]:
    its = sorted(int(d.name[5:]) for d in ckpt_dir.glob("iter_*") if d.name[5:].isdigit())
    return [it for it in its if problem(iteration_dir(ckpt_dir, it)) is None]


def check_resume_checkpoint(ckpt_dir: Path, ckpt_step: int | None = None, checksums: str = "auto") -> int | None:
    """The iteration a start in ``ckpt_dir`` resumes from, checked (sizes, then its checksums as
    ``checksums`` = run.checkpoint_verify says); None for a fresh start."""
    tracker = ckpt_dir / TRACKER
    if ckpt_step is None and not tracker.is_file():
        return None  # nothing saved yet: megatron starts from scratch
    if ckpt_step is not None:
        iteration, source = int(ckpt_step), f"megatron.ckpt_step={ckpt_step}"
    else:
        text = tracker.read_text().strip()
        if text == "release":
            return None
        if not text.isdigit():
            raise ConfigError(f"{tracker} holds {text!r}, not an iteration; write the iteration of a complete "
                              f"checkpoint into it ({_choices(ckpt_dir)})")
        iteration, source = int(text), str(tracker)
    why = problem(iteration_dir(ckpt_dir, iteration))
    if why is None:
        why, warning = verify(iteration_dir(ckpt_dir, iteration), checksums)
        if warning:
            print(f"[acmoe] warning: {warning}", file=sys.stderr, flush=True)
    if why is None:
        return iteration
    raise ConfigError(
        f"the checkpoint to resume from ({source}: iteration {iteration}) is damaged: {why}. "
        f"{_choices(ckpt_dir, below=iteration)}"
    )


def _choices(ckpt_dir: Path, below: int | None = None) -> str:
    complete = [it for it in complete_iterations(ckpt_dir) if below is None or it < below]
    if not complete:
        return ("No complete earlier checkpoint is left: restore the damaged files, or start afresh in a new "
                "run.dir")
    return (f"Complete checkpoints: iterations {complete}; resume from the newest with `acmoe-pretrain ... "
            f"--resume-from {complete[-1]}` (the steps after it are trained again)")


def resume_from(ckpt_dir: Path, iteration: int) -> list[Path]:
    """Make complete iteration ``iteration`` the one to resume from: newer ``iter_*`` directories are
    renamed ``*.damaged`` (kept for inspection, never loaded) and the tracker names ``iteration``.
    Returns the directories set aside."""
    why = problem(iteration_dir(ckpt_dir, iteration))
    if why is not None:
        raise ConfigError(f"--resume-from {iteration}: {why}. {_choices(ckpt_dir)}")
    aside = []
    for d in sorted(ckpt_dir.glob("iter_*")):
        if d.name[5:].isdigit() and int(d.name[5:]) > iteration:
            target = d.with_name(d.name + ".damaged")
            k = 1
            while target.exists():
                target, k = d.with_name(f"{d.name}.damaged{k}"), k + 1
            d.rename(target)
            aside.append(target)
    tmp = ckpt_dir / f".{TRACKER}.tmp"
    tmp.write_text(str(iteration))
    tmp.replace(ckpt_dir / TRACKER)
    return aside
