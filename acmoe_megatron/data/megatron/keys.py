"""The recipe keys that select megatron's datasets and the checks made on them before megatron loads.

Light on purpose: imports neither torch nor megatron, so that the launch checks (``cli/common.ensure_data``,
the run plan, ``megatron_args``) can import it at module top and the commands stay fast to start.

- ``MEGATRON_DATA_KEYS`` / ``uses_megatron_data``: megatron's recipe keys that select its own
  datasets (indexed data or mock data) instead of our shards at ``data.path``.
- ``megatron_data_prefixes``: the prefixes megatron's data arguments name (``--data-path [w1] p1
  [w2] p2``, ``--train/valid/test-data-path``, ``--data-args-path``, ``--per-split-data-args-path``),
  each checked to exist and each weight to be positive; ``check_megatron_data`` adds the sidecars'
  tokenizer against megatron's, before megatron's builder (whose errors are asserts).
- ``parse_shard_blend`` / ``check_shard_blend``: ``data.blend: [w1, dir1, w2, dir2, ...]`` of our
  shard directories (weights positive, directories agreeing on tokenizer, seq_length and dtype).
- Weighted lists are parsed as megatron's ``get_blend_from_list`` parses them (``blend_from_list``,
  the same code, so that a list passes here exactly when megatron reads it the same way; megatron's
  ``IndexedDataset.exists`` and path helpers are ``sidecar.py``'s).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from acmoe_megatron.data.megatron.sidecar import get_bin_path, get_idx_path, indexed_exists, sidecar_tokenizer
from acmoe_megatron.data.shards.manifest import MANIFEST_NAME, Manifest, read_manifest

__all__ = [
    "MEGATRON_DATA_KEYS",
    "blend_from_list",
    "check_megatron_data",
    "check_shard_blend",
    "megatron_data_prefixes",
    "parse_shard_blend",
    "uses_megatron_data",
]

# megatron's recipe keys that select its own datasets (indexed data or mock data)
MEGATRON_DATA_KEYS = ("data_path", "train_data_path", "valid_data_path", "test_data_path", "data_args_path",
                      "per_split_data_args_path", "mock_data")


# ---------------------------------------------------------------------------------------------
# megatron's data keys


def uses_megatron_data(megatron: dict[str, Any]) -> bool:
    """Whether a recipe's ``megatron`` section selects megatron's own datasets."""
    return any(megatron.get(key) not in (None, False, [], "") for key in MEGATRON_DATA_KEYS)


def megatron_data_prefixes(values: dict[str, Any] | Any) -> list[tuple[str, str]]:
    """``[(key, prefix)]`` named by megatron's data arguments (a recipe's ``megatron`` mapping or
    megatron's parsed args), every prefix checked to exist and every weight to be positive;
    ``ValueError`` naming the key, the prefix and the fix."""
    get = values.get if isinstance(values, dict) else (lambda key: getattr(values, key, None))
    lists: list[tuple[str, list]] = []
    for key in ("data_path", "train_data_path", "valid_data_path", "test_data_path"):
        value = get(key)
        if value:
            lists.append((key, value if isinstance(value, (list, tuple)) else [value]))
    if get("data_args_path"):
        lists.append(("data_args_path", Path(get("data_args_path")).read_text().split()))
    if get("per_split_data_args_path"):
        per_split = json.loads(Path(get("per_split_data_args_path")).read_text())
        for split in ("train", "valid", "test"):
            value = per_split.get(split)
            if value:
                lists.append((f"per_split_data_args_path[{split}]", value.split() if isinstance(value, str) else value))
    found = []
    for key, value in lists:
        paths, _ = _weighted(value, f"megatron.{key}")
        for prefix in paths:
            if not indexed_exists(prefix):
                raise ValueError(
                    f"megatron.{key}: prefix {prefix} has no {Path(get_bin_path(prefix)).name} + "
                    f"{Path(get_idx_path(prefix)).name}; give the path without .bin/.idx, or make the files "
                    f"with `acmoe-data to-megatron SHARD_DIR --out {Path(prefix).parent}` (or megatron's "
                    "preprocess_data.py)"
                )
            found.append((key, prefix))
    return found


def check_megatron_data(args, tokenizer=None) -> dict[str, Any] | None:
    """Before megatron's builder (whose errors are asserts): the prefixes exist, the weights are
    positive, the sidecars agree on one tokenizer and that tokenizer is megatron's (``vocab_size``,
    ``eod``). Returns the sidecars' tokenizer entry (None without sidecars)."""
    if getattr(args, "sft", False):
        raise ValueError("megatron.sft: our forward_step trains on GPT batches; SFT datasets need "
                         "pretrain_gpt.py's SFT path: leave sft out")
    prefixes = [p for _, p in megatron_data_prefixes(args)]
    tok = sidecar_tokenizer(prefixes)
    if tok is not None and tokenizer is not None:
        if tokenizer.vocab_size != tok["vocab_size"]:
            raise ValueError(
                f"the indexed data {prefixes[0]} was tokenized with {tok['name']!r} (vocab_size "
                f"{tok['vocab_size']}) but megatron's tokenizer has vocab_size {tokenizer.vocab_size}: set "
                f"megatron.vocab_size: {tok['vocab_size']} (NullTokenizer) or the tokenizer that made the data"
            )
        if getattr(tokenizer, "eod", tok["eod"]) != tok["eod"]:
            raise ValueError(
                f"the indexed data {prefixes[0]} ends documents with EOD {tok['eod']} but megatron's tokenizer "
                f"says eod {tokenizer.eod}: set megatron.null_tokenizer_eod_id: {tok['eod']} (NullTokenizer) or "
                "use the tokenizer that made the data"
            )
    return tok


# ---------------------------------------------------------------------------------------------
# our shard directories blended (data.blend)


def parse_shard_blend(values: Sequence[Any], what: str = "data.blend") -> tuple[list[str], list[float]]:
    """``[w1, dir1, w2, dir2, ...]`` -> (dirs, weights): weights positive numbers (normalised, as
    megatron does), every directory a shard directory; ``ValueError`` naming the entry and the fix."""
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"{what}={values!r}: give a list [weight1, dir1, weight2, dir2, ...]")
    if len(values) % 2 or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values[0::2]) \
            or any(not isinstance(v, str) for v in values[1::2]):
        raise ValueError(f"{what}={list(values)}: write [weight1, dir1, weight2, dir2, ...], a positive number "
                         "before each shard directory")
    dirs, weights = _weighted(values, what)
    for d in dirs:
        if not (Path(d) / MANIFEST_NAME).is_file():
            raise ValueError(f"{what}: {d} is not a shard directory (no {MANIFEST_NAME}); build it with "
                             f"`acmoe-data prepare --out {d} ...` or `acmoe-data from-megatron PREFIX --out {d} ...`")
    return dirs, weights


def check_shard_blend(dirs: Sequence[str]) -> Manifest:
    """The manifests of the blended directories agree on tokenizer, seq_length and dtype (one model
    reads them all); ``ValueError`` naming the two directories, the field and the fix. Returns the
    first manifest."""
    first = read_manifest(dirs[0])
    for d in dirs[1:]:
        other = read_manifest(d)
        for field, a, b in (("tokenizer hash", first.tokenizer["hash"], other.tokenizer["hash"]),
                            ("vocab_size", first.tokenizer["vocab_size"], other.tokenizer["vocab_size"]),
                            ("eod", first.tokenizer["eod"], other.tokenizer["eod"]),
                            ("seq_length", first.seq_length, other.seq_length),
                            ("dtype", first.dtype, other.dtype)):
            if a != b:
                raise ValueError(
                    f"data.blend: {d} has {field} {b} (tokenizer {other.tokenizer['name']!r}) but {dirs[0]} has "
                    f"{a} (tokenizer {first.tokenizer['name']!r}): blended directories must share one tokenizer "
                    f"and seq_length; re-run `acmoe-data prepare` for {d} with the tokenizer and --seq-length of "
                    f"{dirs[0]}"
                )
    return first


# ---------------------------------------------------------------------------------------------
# weighted lists (megatron's --data-path form, our data.blend)


def _weighted(values: Sequence[Any], what: str) -> tuple[list[str], list[float] | None]:
    """``[w1, p1, w2, p2, ...]`` or ``[p1, p2, ...]`` -> (paths, weights or None), parsed by megatron's
    ``get_blend_from_list``; ``ValueError`` naming ``what`` for malformed lists and bad weights."""
    values = [str(v) for v in values]
    if not values:
        raise ValueError(f"{what} is empty: give [weight1, path1, weight2, path2, ...] or [path1, ...]")
    try:
        paths, weights = blend_from_list(values)
    except AssertionError:  # megatron asserts when only some pairs have a numeric weight
        raise ValueError(f"{what}={values}: some entries have a weight and some not: write [weight1, path1, "
                         "weight2, path2, ...] (or paths only)") from None
    if weights is None:
        numeric = [p for p in paths if _is_number(p)]
        if numeric:
            raise ValueError(
                f"{what}={values}: {numeric[0]!r} looks like a weight but the list does not alternate "
                "weight, path: write [weight1, path1, weight2, path2, ...] (or paths only)"
            )
        return paths, None
    bad = [w for w in weights if not (math.isfinite(w) and w > 0)]
    if bad:
        raise ValueError(
            f"{what}={values}: weight {bad[0]} is not a positive number; every weight must be > 0 (they are "
            "normalised to sum to 1, as megatron does): drop a source instead of weighting it 0"
        )
    return paths, weights


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def blend_from_list(blend: Sequence[str]) -> tuple[list[str], list[float] | None]:
    """megatron's ``get_blend_from_list`` (megatron.core.datasets.utils), statement for statement:
    ``[w1, p1, w2, p2, ...]`` -> (paths, weights), ``[p1, p2, ...]`` -> (paths, None). An even-length
    list is read as weight, path pairs unless a weight slot is not a number: then it is a list of
    paths, or megatron's ``AssertionError`` when a number follows that slot (megatron's ``any`` and
    ``all`` share one iterator)."""
    if len(blend) % 2 == 1:
        weight_per_dataset = None
        raw_prefix_per_dataset = blend
    else:
        raw_weight_per_dataset, raw_prefix_per_dataset = zip(
            *[(blend[i], blend[i + 1]) for i in range(0, len(blend), 2)]
        )
        weight_per_dataset = []
        for rwpd in raw_weight_per_dataset:
            try:
                weight = float(rwpd)
            except ValueError:
                weight = None
            weight_per_dataset.append(weight)
        is_none = (w is None for w in weight_per_dataset)  # one iterator for any() and all(), as megatron's map
        if any(is_none):
            assert all(is_none)
            weight_per_dataset = None
            raw_prefix_per_dataset = blend
    return [rppd.strip() for rppd in raw_prefix_per_dataset], weight_per_dataset
