"""ByteTokenizer: encode/decode round trips, EOD handling, stable identity."""

import hashlib

import numpy as np
import pytest

from acmoe_megatron.data.tokenizers.byte import EOD_ID, VOCAB_SIZE, ByteTokenizer


@pytest.mark.parametrize("text", ["", "hello world", "naïve café \u2013 日本語 🚀", "a\nb\tc\x00d"])
def test_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.dtype == np.uint16
    assert ids.tolist() == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.detokenize(tok.tokenize(text)) == text


def test_vocab_and_eod():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.eod, tok.name) == (257, 256, "bytes")
    assert (VOCAB_SIZE, EOD_ID) == (257, 256)


def test_decode_eod():
    tok = ByteTokenizer()
    ids = [EOD_ID, *tok.encode("ab"), EOD_ID, *tok.encode("c"), EOD_ID]
    assert tok.decode(ids) == "abc"
    assert tok.decode(ids, eod_text="|") == "|ab|c|"


def test_decode_partial_utf8_is_replaced_not_raised():
    tok = ByteTokenizer()
    ids = tok.encode("é")[:1]
    assert tok.decode(ids) == "\ufffd"


def test_decode_rejects_foreign_ids():
    with pytest.raises(ValueError, match=r"ids must be in 0\.\.256"):
        ByteTokenizer().decode([65, 300])


def test_hash_is_stable_sha256():
    tok = ByteTokenizer()
    assert tok.hash == ByteTokenizer().hash
    assert len(tok.hash) == 64
    assert tok.hash == hashlib.sha256(ByteTokenizer._description.encode()).hexdigest()
