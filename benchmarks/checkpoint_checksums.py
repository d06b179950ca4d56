"""The cost of checkpoint checksums (runtime/checkpoint_digest.py): hashing throughput, and what it
adds to a training step when the hashing runs in the background beside it.

1. ``write_part`` + ``verify(full)`` on a synthetic save of ``--shards`` files of ``--shard-mib``
   MiB each (one process hashing everything: the slowest case; with P processes each hashes 1/P);
2. the step time of one process doing a CPU matmul loop (a stand-in for a training step that
   holds the GIL only briefly, as torch kernels do) with and without a background thread hashing
   the same save.

    python benchmarks/checkpoint_checksums.py            # writes benchmarks/results/checkpoint_checksums.md
    python benchmarks/checkpoint_checksums.py --out -    # print only
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from acmoe_megatron.runtime.checkpoint_digest import verify, write_part


def _save(root: Path, shards: int, mib: int) -> Path:
    d = root / "iter_0000001"
    d.mkdir(parents=True)
    (d / ".metadata").write_bytes(os.urandom(1 << 16))
    block = os.urandom(1 << 20)
    for i in range(shards):
        with open(d / f"__{i}_0.distcp", "wb") as f:
            for _ in range(mib):
                f.write(block)
    return d


def _steps(n: int, size: int) -> float:
    a = torch.randn(size, size)
    start = time.perf_counter()
    for _ in range(n):
        a = torch.tanh(a @ a / size)
    return (time.perf_counter() - start) / n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--shard-mib", type=int, default=64)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--matmul", type=int, default=768)
    p.add_argument("--out", default="benchmarks/results/checkpoint_checksums.md")
    cli = p.parse_args(argv)
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="acmoe_ckdigest_"))
    try:
        d = _save(root, cli.shards, cli.shard_mib)
        total = cli.shards * cli.shard_mib
        hashed = write_part(d, 0, 1)
        t = time.perf_counter()
        problem, _ = verify(d, "full")
        verify_s = time.perf_counter() - t
        assert problem is None
        base = _steps(cli.steps, cli.matmul)
        shutil.rmtree(d / ".acmoe_checksums")
        thread = threading.Thread(target=lambda: [write_part(d, 0, 1) for _ in range(3)])
        thread.start()
        busy = _steps(cli.steps, cli.matmul)
        overlapped = thread.is_alive()
        thread.join()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows = [
        ("save hashed (write_part, 1 process)", f"{total} MiB in {hashed['seconds']:.2f} s = "
         f"{total / hashed['seconds']:.0f} MiB/s"),
        ("verified before a resume (full)", f"{total} MiB in {verify_s:.2f} s = {total / verify_s:.0f} MiB/s"),
        ("step time, no hashing", f"{base * 1e3:.1f} ms"),
        ("step time, hashing in a background thread", f"{busy * 1e3:.1f} ms ({busy / base:.2f}x; hashing still "
         f"running at the end: {overlapped})"),
    ]
    cmd = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    text = "\n".join([
        "# Checkpoint checksum cost", "",
        f"`{cmd}` on {platform.node()} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), "
        f"{dt.date.today().isoformat()}; torch {torch.__version__}, 1 thread.", "",
        "| what | measured |", "|---|---|", *[f"| {a} | {b} |" for a, b in rows], "",
        "SHA-256 runs in hashlib's C code, which releases the GIL for large buffers, so the hashing thread",
        "competes for a core, not for the interpreter. With P processes per save each hashes 1/P of the",
        "files. On a 2-core machine the step-time ratio is an upper bound of what a GPU step (which waits on",
        "the device, not the CPU) pays.", ""])
    if cli.out == "-":
        print(text)
    else:
        Path(cli.out).write_text(text)
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
