"""Checksums of checkpoint files: written when a save is complete, verified before a resume.

Megatron's ``torch_dist`` checkpoints record which file and byte range hold every tensor, but no
checksums, so a shard whose bytes changed at the same size (bit rot, a bad copy between file
systems) loads and the run continues from wrong weights. After megatron records an iteration as
complete (``latest_checkpointed_iteration.txt``, after every rank finished writing, asynchronous
saves included), every training process hashes its share of that iteration's files (SHA-256 of
files ``i`` with ``i % world_size == rank`` in name order) in a background thread, off the training
step, and writes ``iter_N/.acmoe_checksums/rank_<r>.json`` (name → bytes, sha256) atomically. The
parts together cover every file of the save. Written only for iterations this run saved (newer
than the one it loaded).

Before a resume (``checkpoint_check.check_resume_checkpoint``, in the launching process, before any
worker starts) the iteration to load is verified against them. ``run.checkpoint_verify``: ``full``
hashes every recorded file; ``sample`` checks every size and hashes a deterministic sample (the
metadata files and up to ``SAMPLE_FILES`` shards); ``auto`` (default) is ``full`` up to
``AUTO_FULL_BYTES`` of checkpoint and ``sample`` above; ``sizes`` checks sizes only. A checkpoint
without checksums (saved before this existed, or by another tool) still loads, with a warning.
Files added after the save (``acmoe-eval --calibrate``'s tables) are not part of it.

Why our own: PyTorch distributed checkpointing and megatron store no checksums, and
nvidia-resiliency-ext's checkpointing does not either (its local checkpoints hash nothing we can
read back from the launcher).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

DIGEST_DIR = ".acmoe_checksums"
LATER_FILES = ("acmoe_inference_stats.pt",)  # written into an iteration after its save
VERIFY_MODES = ("auto", "full", "sample", "sizes")
SAMPLE_FILES = 16
AUTO_FULL_BYTES = 64 * 1024**3
_CHUNK = 8 << 20


def checkpoint_files(it_dir: Path) -> list[str]:
    """The files of a save, relative to its iteration directory, in name order."""
    out = []
    for root, dirs, files in os.walk(it_dir):
        dirs[:] = sorted(d for d in dirs if d != DIGEST_DIR)
        for name in files:
            rel = str((Path(root) / name).relative_to(it_dir))
            if rel not in LATER_FILES and not name.endswith(".tmp"):
                out.append(rel)
    return sorted(out)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_part(it_dir: Path, rank: int, world_size: int) -> dict:
    """Hash this process's share of ``it_dir``'s files into ``.acmoe_checksums/rank_<rank>.json``;
    {"files", "bytes", "seconds"} of the work (nothing written when the iteration is gone)."""
    start = time.perf_counter()
    names = checkpoint_files(it_dir)[rank::world_size]
    entries, total = {}, 0
    try:
        for name in names:
            path = it_dir / name
            size = path.stat().st_size
            entries[name] = {"bytes": size, "sha256": sha256(path)}
            total += size
        out = it_dir / DIGEST_DIR
        out.mkdir(exist_ok=True)
        tmp = out / f".rank_{rank}.json.tmp"
        tmp.write_text(json.dumps({"algorithm": "sha256", "rank": rank, "world_size": world_size,
                                   "files": entries}))
        tmp.replace(out / f"rank_{rank}.json")
    except FileNotFoundError:  # the iteration was deleted meanwhile (run.keep_last_checkpoints)
        return {"files": 0, "bytes": 0, "seconds": time.perf_counter() - start}
    return {"files": len(entries), "bytes": total, "seconds": time.perf_counter() - start}


def read_digest(it_dir: Path) -> tuple[dict[str, dict], int | None] | None:
    """(recorded files, the world size that wrote them) from every part, or None without checksums."""
    parts = sorted((it_dir / DIGEST_DIR).glob("rank_*.json")) if (it_dir / DIGEST_DIR).is_dir() else []
    if not parts:
        return None
    files, world = {}, None
    for part in parts:
        data = json.loads(part.read_text())
        files.update(data["files"])
        world = data.get("world_size", world)
    return files, world


def verify(it_dir: Path, mode: str = "auto") -> tuple[str | None, str | None]:
    """(problem, warning) of ``it_dir`` against its checksums: a problem names the first file whose
    size or bytes differ from what was recorded; a warning says what could not be verified."""
    if mode == "sizes":
        return None, None
    digest = read_digest(it_dir)
    if digest is None:
        return None, (f"{it_dir} has no checksums (saved before they were written, or by another tool): its "
                      "bytes are not verified, only its sizes")
    files, world = digest
    for name, rec in sorted(files.items()):
        path = it_dir / name
        if not path.is_file():
            return f"{path} is missing (it has a checksum)", None
        if path.stat().st_size != rec["bytes"]:
            return f"{path} has {path.stat().st_size} bytes, {rec['bytes']} when it was saved", None
    total = sum(rec["bytes"] for rec in files.values())
    if mode == "auto":
        mode = "full" if total <= AUTO_FULL_BYTES else "sample"
    names = sorted(files)
    if mode == "sample":
        shards = [n for n in names if n.endswith(".distcp")]
        step = max(1, len(shards) // SAMPLE_FILES)
        names = [n for n in names if not n.endswith(".distcp")] + shards[::step][:SAMPLE_FILES]
    for name in names:
        if sha256(it_dir / name) != files[name]["sha256"]:
            return (f"{it_dir / name} has the size it was saved with but not the same bytes (its SHA-256 differs "
                    "from the one recorded at the save: corrupted on disk or in a copy)"), None
    uncovered = sorted(set(checkpoint_files(it_dir)) - set(files))
    warning = None
    if uncovered:
        warning = (f"{len(uncovered)} file(s) of {it_dir} have no checksum (e.g. {uncovered[0]}: a process of the "
                   f"{world}-process save did not finish hashing); they were checked by size only")
    return None, warning


class ChecksumWriter:
    """The background hashing of one training process (``runtime/hooks.install_checkpoint_checksums``)."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.threads: dict[Path, threading.Thread] = {}
        self.done: list[dict] = []

    def start(self, save_dir: Path, loaded_iteration: int) -> None:
        """Hash, in the background, every recorded-complete iteration newer than ``loaded_iteration``
        that lacks this process's part."""
        tracker = save_dir / "latest_checkpointed_iteration.txt"
        try:
            latest = int(tracker.read_text().strip())
        except (OSError, ValueError):
            return
        for d in sorted(save_dir.glob("iter_*")):
            if not d.name[5:].isdigit() or not loaded_iteration < int(d.name[5:]) <= latest:
                continue
            if d in self.threads or (d / DIGEST_DIR / f"rank_{self.rank}.json").is_file():
                continue
            thread = threading.Thread(target=self._hash, args=(d,), name=f"acmoe-checksums-{d.name}", daemon=True)
            self.threads[d] = thread
            thread.start()

    def _hash(self, it_dir: Path) -> None:
        self.done.append({"iteration": it_dir.name, **write_part(it_dir, self.rank, self.world_size)})

    def finish(self, save_dir: Path | None, loaded_iteration: int) -> list[dict]:
        """Start what is left (saves finalized at the end) and wait for every thread."""
        if save_dir is not None:
            self.start(save_dir, loaded_iteration)
        for thread in self.threads.values():
            thread.join()
        return self.done
