"""Data-loader throughput and memory: tokens per second and peak RSS per process of ``TokenBatches``.

Prepares the embedded stdlib corpus (all of it) into a temporary directory for each sequence
length, or reuses ``--data-root`` (one sub-directory ``stdlib_s{seq}`` per length), then times
``next()`` on a training stream (shuffled, infinite, DP rank 0 of 1, and one rank of DP=8) and one
finite validation pass. Tokens per micro-batch are ``micro_batch_size * seq_length`` (the model's
input tokens). One process, ``torch.set_num_threads(1)``: what one training rank's data path
costs. Goal (issue 4): >= 20M tokens/s per process.

Memory (issue 16): peak RSS of one reader process (a fresh ``python`` each) that opens the train
split and reads 2000 shuffled micro-batches, for the embedded corpus (1x) and synthetic corpora of
10x and 100x its tokens (``--source synthetic:SIZE``) at sequence length 2048: flat means memory
does not grow with the corpus.

    python benchmarks/data_throughput.py                      # writes benchmarks/results/data_throughput.md
    python benchmarks/data_throughput.py --seconds 1 --out -  # print only
    python benchmarks/data_throughput.py --rss-scales 1,10   # a smaller memory table
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from acmoe_megatron.data.loader.batches import TokenBatches
from acmoe_megatron.data.shards.writer import prepare

GOAL = 20e6
CONFIGS = [(256, 8), (512, 16), (1024, 8), (2048, 8), (4096, 4)]  # (seq_length, micro_batch_size)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def timed(batches: TokenBatches, seconds: float, tokens_per_batch: int, finite: bool = False) -> tuple[float, int]:
    """(tokens/s, micro-batches) over at least ``seconds`` (a finite pass is repeated as needed)."""
    if not finite:
        for _ in range(20):
            next(batches)
    n, start = 0, time.perf_counter()
    while True:
        if finite:
            for _ in batches.worker_view(0, 1):  # a fresh pass over the split
                n += 1
        else:
            for _ in range(200):
                next(batches)
            n += 200
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return n * tokens_per_batch / elapsed, n


RSS_SEQ, RSS_MBS, RSS_BATCHES = 2048, 8, 2000


def rss_probe(shard_dir: str) -> dict:
    """In this (fresh) process: open the train split, read RSS_BATCHES micro-batches; peak RSS."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    tb = TokenBatches(shard_dir, "train", RSS_MBS, 0, 1, seed=1, verify_checksums=False)
    open_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(RSS_BATCHES):
        next(tb)
    elapsed = time.perf_counter() - start
    return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "samples": tb.num_samples,
            "shards": len(tb._store.shard_sizes), "open_s": open_s,
            "tokens_per_s": RSS_BATCHES * RSS_MBS * RSS_SEQ / elapsed, "two_level": tb._order.two_level}


def rss_rows(root: Path, scales: list[int]) -> list[tuple]:
    base = root / f"stdlib_s{RSS_SEQ}"
    if not (base / "manifest.json").is_file():
        prepare("stdlib", base, RSS_SEQ, 4096)
    base_tokens = sum(s.tokens for s in TokenBatches(base, "train", 1, 0, 1, seed=0,
                                                     verify_checksums=False).manifest.splits["train"].shards)
    rows = []
    for scale in scales:
        data = base if scale == 1 else root / f"synthetic_x{scale}_s{RSS_SEQ}"
        if scale != 1 and not (data / "manifest.json").is_file():
            prepare(f"synthetic:{base_tokens * scale}", data, RSS_SEQ, 4096, splits=["train"])
        out = subprocess.run([sys.executable, __file__, "--rss-probe", str(data)], capture_output=True, text=True,
                             check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        probe = json.loads(out.stdout.strip().splitlines()[-1])
        size = sum(f.stat().st_size for f in data.glob("train-*.tar"))
        rows.append((scale, size, probe))
        print(f"x{scale}: {size / 2**20:,.0f} MiB of shards, peak RSS {probe['peak_rss_mib']:.0f} MiB", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="minimum timing per row")
    parser.add_argument("--data-root", default=None, help="reuse/prepare shards here (default: a temp dir)")
    parser.add_argument("--out", default="benchmarks/results/data_throughput.md", help="markdown file, or - for stdout only")
    parser.add_argument("--rss-scales", default="1,10,100", help="corpus sizes for the memory table, x the embedded corpus")
    parser.add_argument("--rss-probe", default=None, help=argparse.SUPPRESS)  # internal: one fresh reader process
    args = parser.parse_args(argv)
    if args.rss_probe:
        print(json.dumps(rss_probe(args.rss_probe)))
        return 0
    torch.set_num_threads(1)

    tmp = None if args.data_root else tempfile.TemporaryDirectory(prefix="acmoe_bench_")
    root = Path(args.data_root or tmp.name)
    rows = []
    for seq, mbs in CONFIGS:
        data = root / f"stdlib_s{seq}"
        prep_s = None
        if not (data / "manifest.json").is_file():
            t0 = time.perf_counter()
            prepare("stdlib", data, seq, 4096)
            prep_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        train = TokenBatches(data, "train", mbs, 0, 1, seed=1, shuffle=True, infinite=True, verify_checksums=True)
        load_s = time.perf_counter() - t0
        tok = mbs * seq
        rate, n = timed(train, args.seconds, tok)
        rows.append((seq, mbs, "train, DP 1, shuffled", rate, n, load_s, prep_s, train.num_samples))
        rank = TokenBatches(data, "train", mbs, 5, 8, seed=1, verify_checksums=False)
        rate, n = timed(rank, args.seconds, tok)
        rows.append((seq, mbs, "train, DP rank 5 of 8", rate, n, None, None, rank.num_samples))
        valid = TokenBatches(data, "valid", mbs, 0, 1, seed=0, shuffle=False, infinite=False, verify_checksums=False)
        rate, n = timed(valid, args.seconds, tok, finite=True)
        rows.append((seq, mbs, "valid, one finite pass", rate, n, None, None, valid.num_samples))
        for row in rows[-3:]:
            print(f"seq {row[0]:>5} mbs {row[1]:>3} {row[2]:<24} {row[3] / 1e6:8.1f} M tokens/s ({row[4]} batches)", flush=True)

    rss = rss_rows(root, [int(x) for x in args.rss_scales.split(",")])
    lines = [
        "# Data-loader throughput (`benchmarks/data_throughput.py`)",
        "",
        f"- date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {cpu_model()}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}; no GPU used",
        f"- software: Python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}; "
        "torch.set_num_threads(1), one process",
        f"- command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
        "- corpus: the embedded stdlib corpus (all of it), byte tokenizer, prepared per sequence length "
        "(`acmoe-data prepare --source stdlib --seq-length S`)",
        "- metric: micro-batches returned by `next(TokenBatches)` x micro_batch_size x seq_length, divided by "
        f"wall time (>= {args.seconds:g} s per row, after 20 warm-up batches). Goal: >= {GOAL / 1e6:.0f}M tokens/s per process.",
        "",
        "| seq_length | micro-batch | stream | M tokens/s | micro-batches/s | samples in split | load (s) | prepare (s) |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for seq, mbs, what, rate, n, load_s, prep_s, samples in rows:
        lines.append(
            f"| {seq} | {mbs} | {what} | {rate / 1e6:.1f} | {rate / (seq * mbs):,.0f} | {samples:,} | "
            f"{'' if load_s is None else f'{load_s:.2f}'} | {'' if prep_s is None else f'{prep_s:.1f}'} |"
        )
    worst = min(r[3] for r in rows)
    lines += [
        "",
        f"Slowest row: {worst / 1e6:.1f}M tokens/s, "
        f"{'meets' if worst >= GOAL else 'BELOW'} the {GOAL / 1e6:.0f}M tokens/s goal. Samples are read on demand "
        "(one positioned read per sample at the shard index's offset, `data/shards/store.py`); `load` is the start-up "
        "cost of opening the split (with `verify_checksums=True` the sha256 of a shard is checked when it is "
        "first read, so it falls in the timed rows of DP 1); `prepare` the time to tokenize and write the shards. "
        "The machine is shared: rows vary by up to ~2x between runs.",
        "",
        f"## Peak RSS versus corpus size (seq_length {RSS_SEQ}, micro-batch {RSS_MBS}, {RSS_BATCHES} shuffled "
        "micro-batches, one fresh process each)",
        "",
        "| corpus | train shards (MiB) | samples | shards | shuffle | open (s) | M tokens/s | peak RSS (MiB) |",
        "|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for scale, size, p in rss:
        name = "embedded stdlib (1x)" if scale == 1 else f"synthetic, {scale}x the embedded tokens"
        lines.append(f"| {name} | {size / 2**20:,.0f} | {p['samples']:,} | {p['shards']} | "
                     f"{'shards + windows' if p['two_level'] else 'full permutation'} | {p['open_s']:.2f} | "
                     f"{p['tokens_per_s'] / 1e6:.1f} | {p['peak_rss_mib']:.0f} |")
    spread = max(r[2]["peak_rss_mib"] for r in rss) - min(r[2]["peak_rss_mib"] for r in rss)
    lines += ["", f"Peak RSS spread over the corpus sizes: {spread:.1f} MiB (the process's imports, torch "
              "included, are the baseline). The reader before issue 16 loaded the whole split: on the 2 GiB "
              "corpus of `tests/integration/test_data_scale.py` one rank peaked at 6.7 GiB.", ""]
    text = "\n".join(lines)
    print(text)
    if args.out != "-":
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
