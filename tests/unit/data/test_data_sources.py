"""Sources: JSONL, Parquet, enwik8 and WikiText inputs, format detection, and their errors."""

import gzip
import json
import zipfile

import numpy as np
import pytest
from data_synthetic import synthetic_words

from acmoe_megatron.data.corpora.corpus import SPLITS, split_of
from acmoe_megatron.data.corpora.enwik8 import ENWIK8_SPLIT_BYTES, Enwik8Corpus
from acmoe_megatron.data.corpora.jsonl import JsonlCorpus
from acmoe_megatron.data.corpora.sources import detect_format, resolve_source
from acmoe_megatron.data.corpora.wikitext import WikiTextCorpus, split_articles
from acmoe_megatron.data.loader.batches import load_split_samples
from acmoe_megatron.data.shards.writer import prepare
from acmoe_megatron.data.tokenizers.byte import ByteTokenizer


def split_texts(shard_dir, split, tokenizer=None):
    """Decode a split's shards back into its documents' texts (split at EOD)."""
    tok = tokenizer or ByteTokenizer()
    manifest, samples = load_split_samples(shard_dir, split)
    info = manifest.splits[split]
    lengths = [info.sample_length(i, manifest.sample_length) for i in range(info.num_samples)]
    stream = np.concatenate([s[:n] for s, n in zip(samples, lengths, strict=True)]).astype(np.int64)
    assert stream[-1] == tok.eod
    cuts = np.flatnonzero(stream == tok.eod)
    starts = np.concatenate([[0], cuts[:-1] + 1])
    return [tok.decode(stream[a:b]) for a, b in zip(starts, cuts, strict=True)]


# -- JSONL ------------------------------------------------------------------------------------


@pytest.fixture
def jsonl_dir(tmp_path):
    d = tmp_path / "jsonl"
    d.mkdir()
    words = synthetic_words(0, 6000)
    for f in range(3):
        lines = [json.dumps({"id": i, "content": " ".join(words[(f * 40 + i) * 50 : (f * 40 + i + 1) * 50])}) for i in range(40)]
        lines.insert(5, "")  # a blank line is not a record
        (d / f"part{f}.jsonl").write_text("\n".join(lines) + "\n")
    with gzip.open(d / "part3.jsonl.gz", "wt") as f:
        f.write(json.dumps({"content": "gzipped ☃ record"}) + "\n")
    return d


def test_jsonl_round_trip(jsonl_dir, tmp_path):
    corpus = resolve_source(str(jsonl_dir), 0.2, 0.2, text_field="content")
    assert isinstance(corpus, JsonlCorpus) and corpus.relpaths[-1] == "part3.jsonl.gz"
    docs = {s: list(corpus.documents(s)) for s in SPLITS}
    keys = [d.doc_id for s in SPLITS for d in docs[s]]
    assert len(keys) == len(set(keys)) == 3 * 40 + 1  # blank lines are not records
    assert all(split_of(d.doc_id, 0.2, 0.2) == s for s in SPLITS for d in docs[s])
    assert docs["train"][0].doc_id == "part0.jsonl:1"
    manifest = prepare(corpus, tmp_path / "out", 32, 50)
    assert manifest.source["kind"] == "jsonl" and manifest.source["text_field"] == "content"
    for s in SPLITS:
        assert split_texts(tmp_path / "out", s) == [d.text for d in docs[s]]


def test_jsonl_bad_records_are_errors(tmp_path):
    path = tmp_path / "bad.jsonl"
    cases = [
        ('{"text": "ok"}\n{"text": "broken\n', r"bad\.jsonl:2: not a valid JSON line"),
        ('{"body": "x"}\n', r"bad\.jsonl:1: no field 'text' \(fields: \['body'\]\); pass --text-field"),
        ('{"text": 3}\n', r"field 'text' is a int, expected a string"),
        ('["text"]\n', r"expected a JSON object"),
    ]
    for content, match in cases:
        path.write_text(content)
        with pytest.raises(ValueError, match=match):
            list(JsonlCorpus(path, valid_fraction=0, test_fraction=0).documents("train"))


# -- Parquet ----------------------------------------------------------------------------------


def test_parquet_round_trip_and_errors(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = [" ".join(synthetic_words(i, 30)) for i in range(120)]
    pq.write_table(pa.table({"n": list(range(120)), "text": texts}), tmp_path / "a.parquet", row_group_size=50)
    corpus = resolve_source(str(tmp_path / "a.parquet"), 0.1, 0.1)
    assert corpus.kind == "parquet"
    manifest = prepare(corpus, tmp_path / "out", 16, 100)
    got = {s: split_texts(tmp_path / "out", s) for s in SPLITS}
    assert sorted(t for s in SPLITS for t in got[s]) == sorted(texts)
    assert got["train"] == [t for i, t in enumerate(texts) if split_of(f"a.parquet:{i}", 0.1, 0.1) == "train"]
    assert sum(i.num_documents for i in manifest.splits.values()) == 120

    with pytest.raises(ValueError, match=r"no column 'body' \(columns: \['n', 'text'\]\); pass --text-field"):
        list(resolve_source(str(tmp_path / "a.parquet"), text_field="body").documents("train"))
    with pytest.raises(ValueError, match=r"column 'n' has type int64, expected a string column"):
        list(resolve_source(str(tmp_path / "a.parquet"), text_field="n").documents("train"))
    pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "nulls.parquet")
    with pytest.raises(ValueError, match=r"nulls\.parquet: row 1 has a null 'text'"):
        list(resolve_source(str(tmp_path / "nulls.parquet"), 0.0, 0.0).documents("train"))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"junk\.parquet: cannot be read as Parquet"):
        list(resolve_source(str(tmp_path / "junk.parquet"), 0.0, 0.0).documents("train"))


# -- enwik8 -----------------------------------------------------------------------------------


@pytest.fixture
def enwik8_zip(tmp_path):
    """A synthetic enwik8.zip: 10,000 bytes, a 2-byte UTF-8 character across the 9,000 boundary."""
    rng = np.random.default_rng(0)
    data = bytearray(rng.integers(32, 127, size=10_000, dtype=np.uint8).tobytes())
    data[8999:9001] = "é".encode()
    path = tmp_path / "enwik8.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("enwik8", bytes(data))
    return path, bytes(data)


def test_enwik8_byte_exact_splits(enwik8_zip, tmp_path):
    path, data = enwik8_zip
    assert ENWIK8_SPLIT_BYTES == (90_000_000, 5_000_000, 5_000_000)
    assert detect_format(str(path)) == "enwik8"
    corpus = Enwik8Corpus(path, split_bytes=(9000, 500, 500))
    manifest = prepare(corpus, tmp_path / "out", 64, 40)
    bounds = {"train": (0, 9000), "valid": (9000, 9500), "test": (9500, 10_000)}
    for split, (a, b) in bounds.items():
        info = manifest.splits[split]
        assert (info.num_documents, info.num_text_bytes, info.num_tokens) == (1, b - a, b - a + 1)
        _, samples = load_split_samples(tmp_path / "out", split)
        stream = samples.reshape(-1)[: b - a].astype(np.uint8).tobytes()
        assert stream == data[a:b]  # raw bytes, even the half character at 9000
    assert manifest.source["split_bytes"] == {"train": 9000, "valid": 500, "test": 500}

    extracted = tmp_path / "x" / "enwik8"
    extracted.parent.mkdir()
    extracted.write_bytes(data)
    doc = next(Enwik8Corpus(extracted, max_bytes=100, split_bytes=(9000, 500, 500)).documents("valid"))
    assert doc.raw == data[9000:9100]


def test_enwik8_refuses_other_files(enwik8_zip, tmp_path):
    path, _ = enwik8_zip
    with pytest.raises(ValueError, match=r"holds 10,000 bytes of enwik8, expected 100,000,000"):
        resolve_source(str(path))
    with pytest.raises(ValueError, match=r"fixed train/valid/test splits"):
        resolve_source(str(path), valid_fraction=0.1)
    other = tmp_path / "other" / "enwik8.zip"
    other.parent.mkdir()
    with zipfile.ZipFile(other, "w") as zf:
        zf.writestr("readme.txt", "x")
    with pytest.raises(ValueError, match=r"no member 'enwik8'"):
        resolve_source(str(other))
    with pytest.raises(ValueError, match=r"unknown source .*enwik8\.zip does not exist; download"):
        resolve_source(str(tmp_path / "missing" / "enwik8.zip"))


# -- WikiText ---------------------------------------------------------------------------------


def test_wikitext_articles(wikitext_dir):
    text = (wikitext_dir / "wiki.valid.raw").read_text()
    articles = list(split_articles(iter(text.splitlines(keepends=True))))
    assert "".join(a for _, a in articles) == text  # nothing lost
    assert len(articles) == 60
    assert articles[0][1].startswith(" \n = Article 1 0 = \n")  # lines before the first title
    assert all(a.startswith(f" = Article 1 {i} = \n") for i, (_, a) in enumerate(articles[1:], 1))
    assert sum(a.count(" = = Section two = = ") for _, a in articles) == 60  # sections don't split
    corpus = resolve_source(str(wikitext_dir))
    assert isinstance(corpus, WikiTextCorpus) and corpus.variant == ".raw"
    docs = list(corpus.documents("valid"))
    assert [d.text for d in docs] == [a for _, a in articles]
    assert docs[1].doc_id == f"wiki.valid.raw:{articles[1][0]}"


def test_wikitext_round_trip_and_cap(wikitext_dir, tmp_path):
    manifest = prepare(str(wikitext_dir), tmp_path / "out", 128, 200, max_bytes=20_000)
    assert manifest.source["kind"] == "wikitext"
    for split in SPLITS:
        docs = list(WikiTextCorpus(wikitext_dir, max_bytes=20_000).documents(split))
        assert split_texts(tmp_path / "out", split) == [d.text for d in docs]
        assert sum(len(d.text.encode()) for d in docs) <= 20_000


def test_wikitext_errors(wikitext_dir, tmp_path):
    both = tmp_path / "both"
    both.mkdir()
    (both / "wiki.train.raw").write_text(" = A = \n")
    (both / "wiki.train.tokens").write_text(" = A = \n")
    with pytest.raises(ValueError, match="both wiki.*raw and wiki.*tokens"):
        resolve_source(str(both))
    only_train = tmp_path / "only"
    only_train.mkdir()
    (only_train / "wiki.train.tokens").write_text(" = A = \n")
    corpus = resolve_source(str(only_train))
    with pytest.raises(FileNotFoundError, match=r"wiki\.valid\.tokens, which does not exist"):
        list(corpus.documents("valid"))
    with pytest.raises(ValueError, match="fixed train/valid/test splits"):
        resolve_source(str(wikitext_dir), test_fraction=0.1)


# -- detection and generic errors -------------------------------------------------------------


def test_format_detection(tmp_path, jsonl_dir):
    assert detect_format(str(jsonl_dir)) == "jsonl"
    assert detect_format(f"{jsonl_dir}/*.jsonl") == "jsonl"
    assert detect_format("stdlib") == "stdlib"
    (jsonl_dir / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"mixes plain files with structured ones"):
        resolve_source(str(jsonl_dir))
    assert resolve_source(f"{jsonl_dir}/*.txt").kind == "text"
    assert resolve_source(str(jsonl_dir), source_format="jsonl", text_field="content").kind == "jsonl"
    with pytest.raises(ValueError, match=r"looks like a \.json file"):
        resolve_source(str(tmp_path / "dump.json"))


def test_empty_corpus_is_an_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match=r"has no text in splits .*the corpus is empty"):
        prepare(str(tmp_path / "empty.jsonl"), tmp_path / "out", 8)
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n' * 5)
    with pytest.raises(ValueError, match=r"\(5 documents, 0 bytes\): the corpus is empty"):
        prepare(str(tmp_path / "blank.jsonl"), tmp_path / "out2", 8, valid_fraction=0, test_fraction=0)
    assert not list((tmp_path / "out2").iterdir())  # no orphan shards left behind
