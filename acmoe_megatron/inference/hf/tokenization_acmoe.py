"""``ACMoEByteTokenizer``: acmoe_megatron's byte tokenizer as a Hugging Face tokenizer (remote code).

Copied into an export directory of a model trained with the byte tokenizer and loaded with
``AutoTokenizer.from_pretrained(OUT, trust_remote_code=True)``; imports only ``transformers``.
Ids 0..255 are the UTF-8 bytes of the text, 256 is the end-of-document token ``<|endoftext|>``
(eos and pad), 257 ids in all, as ``acmoe_megatron.data.tokenizers.byte.ByteTokenizer``. No special
tokens are added when encoding (the model was trained on raw bytes with an EOD after each
document); invalid UTF-8 decodes to U+FFFD.
"""

from __future__ import annotations

from transformers import AddedToken, PreTrainedTokenizer

NUM_BYTES = 256
EOD_ID = 256


class ACMoEByteTokenizer(PreTrainedTokenizer):
    """One token per UTF-8 byte (a byte's token is the character with that code point) + EOD."""

    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, eos_token="<|endoftext|>", pad_token="<|endoftext|>", **kwargs):
        eos = AddedToken(eos_token, special=True, normalized=False) if isinstance(eos_token, str) else eos_token
        pad = AddedToken(pad_token, special=True, normalized=False) if isinstance(pad_token, str) else pad_token
        kwargs.pop("added_tokens_decoder", None)
        self._added_tokens_decoder = {EOD_ID: eos}  # the EOD id is fixed, as in the trained model
        super().__init__(eos_token=eos, pad_token=pad, **kwargs)

    @property
    def vocab_size(self) -> int:
        return NUM_BYTES

    def get_vocab(self) -> dict[str, int]:
        vocab = {chr(i): i for i in range(NUM_BYTES)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return [chr(b) for b in text.encode("utf-8")]

    def _convert_token_to_id(self, token: str):
        return ord(token) if len(token) == 1 and ord(token) < NUM_BYTES else None

    def _convert_id_to_token(self, index: int) -> str:
        return chr(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        data = bytearray()
        for token in tokens:
            if token in self.added_tokens_encoder:
                data += token.encode("utf-8")
            else:
                data.append(ord(token))
        return bytes(data).decode("utf-8", errors="replace")

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        return ()  # no vocabulary file: the bytes are the vocabulary
