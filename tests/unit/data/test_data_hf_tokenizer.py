"""Local Hugging Face tokenizer.json: round trip through shards, uint32 ids, clear refusals."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("tokenizers")

from data_synthetic import synthetic_words  # noqa: E402

from acmoe_megatron.cli.data import main  # noqa: E402
from acmoe_megatron.data.loader.batches import TokenBatches, load_split_samples  # noqa: E402
from acmoe_megatron.data.shards.manifest import read_manifest  # noqa: E402
from acmoe_megatron.data.shards.writer import prepare  # noqa: E402
from acmoe_megatron.data.tokenizers.byte import load_tokenizer  # noqa: E402
from acmoe_megatron.data.tokenizers.hf import HFTokenizer  # noqa: E402


def _jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def test_bpe_round_trip_text_to_shards_to_text(bpe_tokenizer_file, tmp_path):
    tok = load_tokenizer(str(bpe_tokenizer_file))
    assert isinstance(tok, HFTokenizer) and tok.eod_token == "<|endoftext|>" and tok.eod == 0
    texts = [" ".join(synthetic_words(i, 40 + i)) for i in range(30)] + ["naïve café 日本 — ok\n\tend"]
    src = _jsonl(tmp_path / "docs.jsonl", texts)
    manifest = prepare(str(src), tmp_path / "out", 24, 10, tokenizer=str(bpe_tokenizer_file), splits=["train"],
                       valid_fraction=0.0, test_fraction=0.0)
    assert manifest.tokenizer["name"].startswith("hf:") and manifest.tokenizer["hash"] == tok.hash
    assert manifest.tokenizer["vocab_size"] == tok.vocab_size < 2**16 and manifest.dtype == "uint16"
    _, samples = load_split_samples(tmp_path / "out", "train")
    info = manifest.splits["train"]
    n = info.num_tokens
    stream = samples.reshape(-1)[:n]
    assert info.num_tokens < info.num_text_bytes  # BPE merges bytes
    eod = tok.decode([tok.eod])
    assert tok.decode(stream) == "".join(t + eod for t in texts)


def test_uint32_shards_for_large_vocab(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(70_000)} | {"[UNK]": 70_000, "</s>": 70_001}
    big = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    big.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    big.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)  # a directory holding tokenizer.json
    assert (tok.vocab_size, tok.eod_token, tok.eod) == (70_002, "</s>", 70_001)
    texts = [" ".join(f"w{(i * 7919 + j * 104729) % 70_000}" for j in range(50)) for i in range(20)]
    src = _jsonl(tmp_path / "d.jsonl", texts)
    manifest = prepare(str(src), tmp_path / "out", 16, 8, tokenizer=tok, valid_fraction=0.0, test_fraction=0.0,
                       splits=["train"])
    assert manifest.dtype == "uint32"
    _, samples = load_split_samples(tmp_path / "out", "train")
    assert samples.dtype == np.uint32 and samples.max() > 65_535
    expected = np.concatenate([np.append(tok.encode(t), tok.eod) for t in texts])
    np.testing.assert_array_equal(samples.reshape(-1)[: len(expected)], expected)
    batch = next(TokenBatches(tmp_path / "out", "train", 4, 0, 1, seed=0, shuffle=False, vocab_size=70_002))
    assert batch["tokens"].dtype == torch.long
    np.testing.assert_array_equal(batch["tokens"].numpy(), samples[:4, :-1].astype(np.int64))


def test_hub_names_and_missing_files_are_refused(tmp_path, capsys):
    for name in ("gpt2", "meta-llama/Llama-2-7b-hf"):
        hint = rf"{name!r} is not a local file; it looks like a Hugging Face hub name.*--tokenizer tok/tokenizer\.json"
        with pytest.raises(ValueError, match=hint):
            load_tokenizer(name)
    with pytest.raises(FileNotFoundError, match=r"tokenizer file .*nope\.json does not exist"):
        load_tokenizer(str(tmp_path / "nope.json"))
    with pytest.raises(FileNotFoundError, match=r"holds no tokenizer\.json"):
        load_tokenizer(tmp_path)
    rc = main(["prepare", "--source", "stdlib", "--out", str(tmp_path / "o"), "--seq-length", "8",
               "--tokenizer", "gpt2", "--max-bytes", "1000", "--no-progress"])
    assert rc == 2 and "hub name" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_eod_token_must_exist(bpe_tokenizer_file, tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"has none of .*to mark the end of a document.*--eod-token"):
        load_tokenizer(tmp_path / "tokenizer.json")
    assert load_tokenizer(tmp_path / "tokenizer.json", eod_token="[UNK]").eod == 1
    with pytest.raises(ValueError, match=r"has no token '<eot>'"):
        load_tokenizer(bpe_tokenizer_file, eod_token="<eot>")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="not a valid Hugging Face tokenizer.json"):
        load_tokenizer(tmp_path / "bad")


def test_tokenizer_hash_tracks_file_and_eod(bpe_tokenizer_file, tmp_path):
    a = load_tokenizer(bpe_tokenizer_file)
    assert a.hash == load_tokenizer(bpe_tokenizer_file).hash
    from tokenizers import Tokenizer

    t = Tokenizer.from_file(str(bpe_tokenizer_file))
    t.add_special_tokens(["</s>"])
    t.save(str(tmp_path / "tokenizer.json"))
    b = load_tokenizer(tmp_path / "tokenizer.json")
    c = load_tokenizer(tmp_path / "tokenizer.json", eod_token="</s>")
    assert len({a.hash, b.hash, c.hash}) == 3


def test_cli_prepare_with_tokenizer(bpe_tokenizer_file, tmp_path, capsys):
    src = _jsonl(tmp_path / "d.jsonl", [" ".join(synthetic_words(i, 80)) for i in range(40)])
    rc = main(["prepare", "--source", str(src), "--out", str(tmp_path / "o"), "--seq-length", "16",
               "--tokenizer", str(bpe_tokenizer_file), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert read_manifest(tmp_path / "o").tokenizer["eod_token"] == "<|endoftext|>"
