"""``token_bytes``: the raw bytes a token stands for (chat logprobs' ``bytes``)."""

import pytest

from dspark.assets import resolve_model
from dspark.tokenization import load_tokenizer, token_bytes

from helpers import byte_fallback_tokenizer, sentencepiece_style_tokenizer

ADDED = ["日本", "✓tok", "café", "ÿĀ"]  # ("é", "ÿ", "Ā" are byte-level symbols too: bytes 0xE9, 0xFF, 0x00)


@pytest.mark.parametrize("build", ["byte_level", "sentencepiece", "byte_fallback"])
def test_added_tokens_are_their_text_s_utf8(build):
    """An added token's bytes are its text's UTF-8, whatever the vocabulary's own pieces say
    (byte-level symbols, ``<0xNN>`` pieces, a normalizer's ``▁`` in its piece); special tokens too."""
    tokenizer = {"byte_level": lambda: load_tokenizer(resolve_model("dspark-tiny")),
                 "sentencepiece": sentencepiece_style_tokenizer, "byte_fallback": byte_fallback_tokenizer}[build]()
    assert tokenizer.add_tokens(ADDED) == len(ADDED)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|é|>"]})
    for text in [*ADDED, "<|é|>"]:
        assert token_bytes(tokenizer, tokenizer.convert_tokens_to_ids(text)) == text.encode("utf-8")


def test_vocabulary_tokens_keep_their_bytes():
    """Byte-level symbols and ``<0xNN>`` pieces are single bytes joined into a character's UTF-8;
    a SentencePiece word is whole characters (``None``: its text)."""
    tokenizer = load_tokenizer(resolve_model("dspark-tiny"))
    tokenizer.add_tokens(ADDED)
    ids = tokenizer.encode(" 語", add_special_tokens=False)
    assert b"".join(token_bytes(tokenizer, t) for t in ids) == " 語".encode("utf-8")
    fallback = byte_fallback_tokenizer()
    fallback.add_tokens(ADDED)
    ids = fallback.encode("語", add_special_tokens=False)[1:]  # (after the "▁" it prepends)
    assert [token_bytes(fallback, t) for t in ids] == [bytes([b]) for b in "語".encode("utf-8")]
    words = sentencepiece_style_tokenizer()
    assert token_bytes(words, words.convert_tokens_to_ids("▁Paris")) is None
