"""Corpora: the stdlib corpus selection and its stable, disjoint split; text-file sources."""

import pytest

from acmoe_megatron.data.corpora.corpus import SPLITS, split_of
from acmoe_megatron.data.corpora.sources import resolve_source
from acmoe_megatron.data.corpora.stdlib import stdlib_corpus, stdlib_documents, stdlib_files
from acmoe_megatron.data.corpora.text import text_files_corpus


def test_split_of_is_stable_and_respects_fractions():
    keys = [f"pkg/module_{i}.py" for i in range(20_000)]
    first = [split_of(k) for k in keys]
    assert first == [split_of(k) for k in keys]
    share = {s: first.count(s) / len(keys) for s in SPLITS}
    assert 0.015 < share["valid"] < 0.025 and 0.015 < share["test"] < 0.025
    assert {split_of(k, 0.5, 0.0) for k in keys} == {"train", "valid"}


def test_split_of_rejects_bad_fractions():
    with pytest.raises(ValueError, match=r"sum must be < 1"):
        split_of("x", 0.6, 0.5)


def test_stdlib_files_exclude_tests_and_site_packages():
    files = stdlib_files()
    assert files == sorted(files) and len(files) > 100
    assert "os.py" in files and "json/__init__.py" in files
    for rel in files:
        dirs = rel.split("/")[:-1]
        assert not {"site-packages", "dist-packages", "test", "tests"} & set(dirs), rel
        assert not rel.startswith(("idlelib/idle_test/", "lib2to3/tests/")), rel
        assert rel.endswith(".py")


def test_stdlib_split_is_disjoint_complete_and_stable():
    corpus = stdlib_corpus()
    parts = {s: corpus.files(s) for s in SPLITS}
    assert all(parts.values())
    union = [f for s in SPLITS for f in parts[s]]
    assert sorted(union) == list(corpus.relpaths)  # disjoint and complete
    assert parts == {s: stdlib_corpus().files(s) for s in SPLITS}
    for s in SPLITS:
        assert all(split_of(f) == s for f in parts[s])


def test_max_bytes_caps_each_split_with_a_prefix():
    full, capped = stdlib_corpus(), stdlib_corpus(max_bytes=50_000)
    for s in SPLITS:
        files = capped.files(s)
        assert capped.num_bytes(s) <= 50_000
        assert files == full.files(s)[: len(files)]


def test_stdlib_documents_yield_path_and_text():
    docs = list(stdlib_documents("train", max_bytes=30_000))
    assert docs and all(isinstance(d.doc_id, str) and isinstance(d.text, str) for d in docs)
    assert [d.doc_id for d in docs] == stdlib_corpus(max_bytes=30_000).files("train")


@pytest.fixture
def text_dir(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("alpha\n")
    (tmp_path / "sub" / "b.txt").write_text("beta\n")
    (tmp_path / "sub" / "c.md").write_text("gamma\n")
    (tmp_path / ".hidden").write_text("secret\n")
    return tmp_path


def test_text_directory_and_glob(text_dir):
    assert text_files_corpus(text_dir).relpaths == ("a.txt", "sub/b.txt", "sub/c.md")
    globbed = text_files_corpus(f"{text_dir}/**/*.txt")
    assert globbed.relpaths == ("a.txt", "sub/b.txt")
    docs = {d.doc_id: d.text for s in SPLITS for d in globbed.documents(s)}
    assert docs == {"a.txt": "alpha\n", "sub/b.txt": "beta\n"}


def test_binary_file_is_an_error_not_skipped(tmp_path):
    (tmp_path / "bin.dat").write_bytes(b"ab\x00cd")
    corpus = text_files_corpus(tmp_path, valid_fraction=0.0, test_fraction=0.0)
    with pytest.raises(ValueError, match=r"bin\.dat contains NUL bytes"):
        list(corpus.documents("train"))


def test_unknown_sources_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="unknown source 'nope'"):
        resolve_source("nope")
    with pytest.raises(ValueError, match="matched no files"):
        resolve_source(f"{tmp_path}/*.txt")
    with pytest.raises(ValueError, match=r"unknown source 'data\.jsonl'.*jsonl source"):
        resolve_source("data.jsonl")  # missing input, detected as JSONL by its name
    with pytest.raises(ValueError, match=r"looks like a \.tar file.*--format text"):
        resolve_source("shards.tar")
