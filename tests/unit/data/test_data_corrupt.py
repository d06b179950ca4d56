"""Word-swap corruption of eval splits: requested fraction, reproducible, eval-only, recorded."""

import numpy as np
import pytest

from acmoe_megatron.cli.data import main
from acmoe_megatron.data.corpora.corrupt import Corruption, parse_corruption
from acmoe_megatron.data.loader.batches import load_split_samples
from acmoe_megatron.data.shards.manifest import read_manifest
from acmoe_megatron.data.shards.writer import prepare
from acmoe_megatron.data.tokenizers.byte import ByteTokenizer


def _text(shard_dir, split):
    manifest, samples = load_split_samples(shard_dir, split)
    stream = samples.reshape(-1)[: manifest.splits[split].num_tokens]
    return ByteTokenizer().decode(stream, eod_text="\n")


def _shard_bytes(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def clean_and_attacked(wikitext_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("corrupt")
    prepare(str(wikitext_dir), root / "clean", 128, 500)
    prepare(str(wikitext_dir), root / "attacked", 128, 500, corrupt="word-swap:0.025")
    return root


def test_fraction_of_words_replaced(clean_and_attacked, wikitext_dir):
    clean, attacked = _text(clean_and_attacked / "clean", "valid"), _text(clean_and_attacked / "attacked", "valid")
    assert "AAA" not in clean
    words_clean, words_attacked = clean.split(), attacked.split()
    assert len(words_clean) == len(words_attacked) > 50_000  # one word replaced by one word
    changed = [(a, b) for a, b in zip(words_clean, words_attacked, strict=True) if a != b]
    assert all(b == "AAA" for _, b in changed)
    fraction = len(changed) / len(words_clean)
    assert 0.025 * 0.9 <= fraction <= 0.025 * 1.1
    recorded = read_manifest(clean_and_attacked / "attacked").corruption
    assert recorded["spec"] == "word-swap:0.025" and recorded["marker"] == "AAA" and recorded["seed"] == 0
    assert recorded["applied_to"]["valid"] == {"units": len(words_clean), "replaced": len(changed)}
    assert set(recorded["applied_to"]) == {"valid", "test"}


def test_only_eval_splits_are_corrupted(clean_and_attacked):
    clean, attacked = clean_and_attacked / "clean", clean_and_attacked / "attacked"
    assert read_manifest(clean).corruption is None and "corruption" not in (clean / "manifest.json").read_text()
    for name in ("train-000000.tar", "train-000001.tar"):
        assert (clean / name).read_bytes() == (attacked / name).read_bytes()
    assert "AAA" in _text(attacked, "test")
    assert read_manifest(attacked).splits["train"] == read_manifest(clean).splits["train"]


def test_corruption_is_reproducible(clean_and_attacked, wikitext_dir, tmp_path):
    prepare(str(wikitext_dir), tmp_path / "again", 128, 500, corrupt="word-swap:0.025", splits=["valid"])
    again = _shard_bytes(tmp_path / "again")
    reference = _shard_bytes(clean_and_attacked / "attacked")
    assert [n for n in again if n.startswith("valid")] and all(again[n] == reference[n] for n in again if n.startswith("valid"))
    other_seed = Corruption(0.025, seed=1)
    prepare(str(wikitext_dir), tmp_path / "seed1", 128, 500, corrupt=other_seed, splits=["valid"])
    assert _text(tmp_path / "seed1", "valid") != _text(clean_and_attacked / "attacked", "valid")


def test_corrupt_bytes_unit():
    c = Corruption(0.5, marker="XX", seed=3)
    data = "  héllo wörld\tfoo\nbar baz  ".encode()
    out, words, replaced = c.corrupt_bytes(data, "doc")
    assert (out, words, replaced) == c.corrupt_bytes(data, "doc")  # same doc id, same draws
    assert words == 5 and 0 < replaced < 5
    assert out.split() == [b"XX" if w != v else w for w, v in zip(data.split(), out.split(), strict=True)]
    assert out.decode().count("\t") == 1 and out.startswith(b"  ")  # whitespace is kept
    assert Corruption(1.0).corrupt_bytes(data, "d")[0].split() == [b"AAA"] * 5


def test_corrupt_tokens_skips_specials_and_keeps_marker_sequences():
    c = Corruption(0.3, seed=0)
    ids = np.array([5, 6, 0, 7, 8, 9, 0, 10] * 500, dtype=np.uint32)
    out, units, replaced = c.corrupt_tokens(ids, "doc", marker_ids=np.array([1, 2]), special_ids=frozenset({0}))
    assert units == 3000 and abs(replaced / units - 0.3) < 0.03
    assert len(out) == len(ids) + replaced and (out == 0).sum() == 1000  # specials are never replaced
    rebuilt, i = [], 0
    while i < len(out):  # collapse each marker [1, 2] back into one slot
        rebuilt.append(-1 if out[i] == 1 else int(out[i]))
        i += 2 if out[i] == 1 else 1
    assert len(rebuilt) == len(ids) and all(r in (-1, int(v)) for r, v in zip(rebuilt, ids, strict=True))


def test_bpe_corruption(bpe_tokenizer_file, wikitext_dir, tmp_path):
    m = prepare(str(wikitext_dir), tmp_path / "bpe", 64, 500, tokenizer=str(bpe_tokenizer_file),
                corrupt="word-swap:0.05", splits=["valid"], max_bytes=100_000)
    counts = m.corruption["applied_to"]["valid"]
    assert 0.045 <= counts["replaced"] / counts["units"] <= 0.055


@pytest.mark.parametrize(
    "spec, match",
    [("word-swap", "KIND:FRACTION"), ("word-swap:x", "KIND:FRACTION"), ("shuffle:0.1", "unknown corruption"),
     ("word-swap:0", r"fraction must be in \(0, 1\]"), ("word-swap:1.5", r"fraction must be in \(0, 1\]")],
)
def test_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_corruption(spec)


def test_train_only_corruption_is_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match="evaluation splits .* only.*--splits valid test"):
        prepare("stdlib", tmp_path, 8, max_bytes=1000, splits=["train"], corrupt="word-swap:0.1")
    rc = main(["prepare", "--out", str(tmp_path / "o"), "--seq-length", "8", "--max-bytes", "30000",
               "--splits", "valid", "--corrupt", "word-swap:0.1", "--corrupt-marker", "ZZZ", "--no-progress"])
    assert rc == 0
    assert "corrupted  word-swap:0.1 marker 'ZZZ'" in capsys.readouterr().out
