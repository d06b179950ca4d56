"""acmoe-data CLI: prepare + info on a small stdlib corpus and on text files; clear errors."""

from acmoe_megatron.cli.data import main
from acmoe_megatron.data.shards.manifest import read_manifest


def test_prepare_and_info(tmp_path, capsys):
    out = tmp_path / "shards"
    rc = main(
        [
            "prepare",
            "--source",
            "stdlib",
            "--out",
            str(out),
            "--seq-length",
            "32",
            "--samples-per-shard",
            "200",
            "--max-bytes",
            "20000",
            "--no-progress",
        ]
    )
    assert rc == 0
    manifest = read_manifest(out)
    assert manifest.seq_length == 32 and manifest.source["max_bytes"] == 20000
    assert main(["info", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "seq_length 32" in printed and "train" in printed


def test_prepare_text_glob(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        (src / f"doc{i}.txt").write_text(f"document number {i}\n" * 20)
    out = tmp_path / "out"
    rc = main(
        [
            "prepare",
            "--source",
            f"{src}/*.txt",
            "--out",
            str(out),
            "--seq-length",
            "16",
            "--valid-fraction",
            "0",
            "--test-fraction",
            "0",
            "--splits",
            "train",
            "--no-progress",
        ]
    )
    assert rc == 0
    train = read_manifest(out).splits["train"]
    assert train.num_documents == 5
    assert train.num_tokens == sum(len(f"document number {i}\n") * 20 + 1 for i in range(5))


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["prepare", "--source", "no/such/dir", "--out", str(tmp_path), "--seq-length", "8"]) == 2
    assert "unknown source 'no/such/dir'" in capsys.readouterr().err
    assert main(["info", str(tmp_path)]) == 2
    assert "no manifest.json" in capsys.readouterr().err
