"""``acmoe-data``: build and inspect token-shard directories.

Examples:
    acmoe-data prepare --source stdlib --out data/stdlib_s256 --seq-length 256
    acmoe-data prepare --source 'corpus/**/*.txt' --out data/mytext --seq-length 1024 \\
        --samples-per-shard 2048 --max-bytes 50000000
    acmoe-data prepare --source enwik8.zip --out data/enwik8_s512 --seq-length 512
    acmoe-data prepare --source wikitext-103-raw --out data/wt103 --seq-length 512 \\
        --tokenizer tok/tokenizer.json
    acmoe-data prepare --source wikitext-103-raw --out data/wt103_attacked --seq-length 512 \\
        --tokenizer tok/tokenizer.json --splits valid test --corrupt word-swap:0.025
    acmoe-data prepare --source 'dump/*.jsonl.gz' --text-field content --out data/mine --seq-length 1024
    acmoe-data info data/stdlib_s256
    acmoe-data index data/old_shards          # sample-offset indexes for shards made before prepare wrote them
    acmoe-data to-megatron data/stdlib_s256 --out data/stdlib_megatron
    acmoe-data from-megatron data/stdlib_megatron --out data/stdlib_s512 --seq-length 512

``--source`` is ``stdlib`` (this Python's standard-library sources, the embedded default), enwik8
(``enwik8.zip``), a WikiText directory, JSONL or Parquet files, or plain-text files (a directory,
file or glob); ``--format`` overrides the detection (see ``data/corpora/sources.py``). See docs/data.md.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Sequence

from tqdm import tqdm

from acmoe_megatron.data.corpora.corpus import SPLITS
from acmoe_megatron.data.corpora.corrupt import parse_corruption
from acmoe_megatron.data.corpora.sources import FORMATS, resolve_source
from acmoe_megatron.data.shards.index import ShardIndexError, scan_offsets, write_index
from acmoe_megatron.data.shards.manifest import Manifest, read_manifest
from acmoe_megatron.data.shards.store import npy_header
from acmoe_megatron.data.shards.writer import prepare
from acmoe_megatron.data.tokenizers.byte import load_tokenizer

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="acmoe-data", description="Build and inspect webdataset token shards for acmoe_megatron."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="tokenize a corpus into webdataset shards + manifest.json")
    p.add_argument(
        "--source",
        default="stdlib",
        help="'stdlib' (default), enwik8.zip, a WikiText directory, or a directory / file / glob of "
        "JSONL, Parquet or plain-text files",
    )
    p.add_argument("--format", default="auto", choices=FORMATS, help="source format (default: detect from the name)")
    p.add_argument("--text-field", default="text", help="JSONL field / Parquet column holding the text (default: text)")
    p.add_argument(
        "--tokenizer",
        default="bytes",
        help="'bytes' (default: byte-level, vocab 257) or a local Hugging Face tokenizer.json (no hub names)",
    )
    p.add_argument("--eod-token", default=None, help="end-of-document token of a tokenizer.json (default: auto)")
    p.add_argument(
        "--corrupt",
        default=None,
        metavar="word-swap:P",
        help="replace a fraction P of words (bytes) / non-special tokens (BPE) of the valid and test "
        "splits by a marker, for robustness evaluation",
    )
    p.add_argument("--corrupt-marker", default="AAA", help="replacement word for --corrupt (default: AAA)")
    p.add_argument("--corrupt-seed", type=int, default=0, help="seed of --corrupt (default: 0)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--seq-length", type=int, required=True, help="model sequence length; samples hold seq_length + 1 tokens"
    )
    p.add_argument("--samples-per-shard", type=int, default=4096, help="samples per tar shard")
    p.add_argument(
        "--max-bytes",
        type=int,
        default=None,
        help="cap on the source bytes read per split (whole documents in order; enwik8: a byte prefix)",
    )
    p.add_argument(
        "--valid-fraction", type=float, default=None, help="fraction of files/records for valid (default 0.02)"
    )
    p.add_argument(
        "--test-fraction", type=float, default=None, help="fraction of files/records for test (default 0.02)"
    )
    p.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS, help="splits to write (default: all)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    i = sub.add_parser("info", help="print the summary of a shard directory's manifest")
    i.add_argument("dir", help="directory holding manifest.json")

    x = sub.add_parser("index", help="write the sample-offset index of every shard (directories made before "
                       "prepare wrote them; readers otherwise scan each shard's tar headers on first use)")
    x.add_argument("dir", help="directory holding manifest.json")

    t = sub.add_parser("to-megatron", help="write a shard directory's splits as megatron indexed data "
                       "(<out>/<split>_text_document.bin/.idx + an acmoe sidecar)")
    t.add_argument("shard_dir", help="directory holding manifest.json")
    t.add_argument("--out", required=True, help="output directory of the megatron prefixes")
    t.add_argument("--splits", nargs="+", default=None, choices=SPLITS, help="splits to convert (default: all)")
    t.add_argument("--overwrite", action="store_true", help="replace existing prefixes in --out")

    f = sub.add_parser("from-megatron", help="write megatron indexed data as a shard directory + manifest.json")
    f.add_argument("prefix_or_dir", help="a megatron prefix (PATH/NAME for NAME.bin + NAME.idx) or a directory of "
                   "<split>_text_document prefixes")
    f.add_argument("--out", required=True, help="output shard directory")
    f.add_argument("--seq-length", type=int, required=True, help="model sequence length; samples hold "
                   "seq_length + 1 tokens")
    f.add_argument("--samples-per-shard", type=int, default=None,
                   help="samples per tar shard (default: the sidecar's, else 4096)")
    f.add_argument("--tokenizer", default=None, help="the tokenizer the data was made with: 'bytes' or a local "
                   "tokenizer.json (needed when the data has no acmoe sidecar)")
    f.add_argument("--eod-token", default=None, help="end-of-document token of a tokenizer.json (default: auto)")
    f.add_argument("--split", default=None, choices=SPLITS,
                   help="split of a single prefix (default: from its name <split>_text_document, else train)")
    f.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
    return parser


def _prepare(args: argparse.Namespace) -> int:
    corpus = resolve_source(
        args.source,
        args.valid_fraction,
        args.test_fraction,
        args.max_bytes,
        source_format=args.format,
        text_field=args.text_field,
    )
    tokenizer = load_tokenizer(args.tokenizer, args.eod_token)
    corruption = parse_corruption(args.corrupt, args.corrupt_marker, args.corrupt_seed)
    sizes = [corpus.num_bytes(split) for split in args.splits]
    total = None if None in sizes else sum(sizes)
    bar = None  # created on the first document, so errors before that print cleanly

    def progress(split: str, n_bytes: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", disable=args.no_progress)
        bar.set_postfix_str(split, refresh=False)
        bar.update(n_bytes)

    start = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            manifest = prepare(
                corpus,
                args.out,
                args.seq_length,
                args.samples_per_shard,
                splits=args.splits,
                overwrite=args.overwrite,
                progress=progress,
                tokenizer=tokenizer,
                corrupt=corruption,
            )
    finally:
        if bar is not None:
            bar.close()
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s")
    print(summary(manifest))
    return 0


def _quiet_megatron():
    """megatron-core's import and dataset classes warn about Transformer Engine, Apex, CUDA and the
    rank: noise for a converter that uses only its indexed-dataset files."""
    import contextlib
    import logging

    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore", UserWarning)
    return stack


def _to_megatron(args: argparse.Namespace) -> int:
    with _quiet_megatron():
        from acmoe_megatron.data.megatron.convert import shards_to_indexed

    start = time.perf_counter()
    prefixes = shards_to_indexed(args.shard_dir, args.out, args.splits, overwrite=args.overwrite)
    print(f"wrote {len(prefixes)} megatron prefixes in {time.perf_counter() - start:.1f} s:")
    for split, prefix in prefixes.items():
        print(f"{split:<6} {prefix}")
    return 0


def _from_megatron(args: argparse.Namespace) -> int:
    with _quiet_megatron():
        from acmoe_megatron.data.megatron.convert import indexed_to_shards

    tokenizer = load_tokenizer(args.tokenizer, args.eod_token) if args.tokenizer is not None else None
    start = time.perf_counter()
    with _quiet_megatron():
        manifest = indexed_to_shards(args.prefix_or_dir, args.out, args.seq_length, args.samples_per_shard,
                                     tokenizer=tokenizer, split=args.split, overwrite=args.overwrite)
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s")
    print(summary(manifest))
    return 0


def _index(args: argparse.Namespace) -> int:
    from pathlib import Path

    manifest = read_manifest(args.dir)
    import numpy as np

    member = len(npy_header(manifest.sample_length, np.dtype(manifest.dtype))) + \
        manifest.sample_length * np.dtype(manifest.dtype).itemsize
    start, count = time.perf_counter(), 0
    for info in manifest.splits.values():
        for shard in info.shards:
            path = Path(args.dir) / shard.file
            try:
                write_index(path, scan_offsets(path, shard.first_sample, shard.samples, member))
            except (ShardIndexError, FileNotFoundError) as exc:
                raise ValueError(f"{exc}; re-create the directory with `acmoe-data prepare ... --overwrite`") from exc
            count += 1
    print(f"indexed {count} shards of {args.dir} in {time.perf_counter() - start:.1f} s")
    return 0


def summary(manifest: Manifest) -> str:
    """A short human-readable summary of a manifest."""
    tok = manifest.tokenizer
    src = manifest.source
    files = f"{src['num_files']} files, " if "num_files" in src else ""
    lines = [
        f"format     {manifest.format} v{manifest.format_version}",
        f"tokenizer  {tok['name']} (vocab {tok['vocab_size']}, eod {tok['eod']}, hash {tok['hash'][:12]})",
        f"seq_length {manifest.seq_length} (samples of {manifest.sample_length} {manifest.dtype} tokens)",
        f"source     {src.get('kind')} {src.get('spec', src.get('root', src.get('path')))} "
        f"({files}max_bytes={src.get('max_bytes')})",
        f"{'split':<6} {'docs':>8} {'tokens':>12} {'samples':>9} {'shards':>6}",
    ]
    for name, info in manifest.splits.items():
        lines.append(
            f"{name:<6} {info.num_documents:>8} {info.num_tokens:>12} {info.num_samples:>9} {len(info.shards):>6}"
        )
    if manifest.corruption is not None:
        c = manifest.corruption
        applied = ", ".join(
            f"{split}: {n['replaced']}/{n['units']} replaced" for split, n in c.get("applied_to", {}).items()
        )
        lines.append(f"corrupted  {c['spec']} marker {c['marker']!r} seed {c['seed']} ({applied})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "prepare":
            return _prepare(args)
        if args.command == "index":
            return _index(args)
        if args.command == "to-megatron":
            return _to_megatron(args)
        if args.command == "from-megatron":
            return _from_megatron(args)
        print(summary(read_manifest(args.dir)))
        return 0
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, ImportError) as exc:
        print(f"acmoe-data {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
