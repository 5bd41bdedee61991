"""Tokenizer loading: a Hugging Face tokenizer directory, or a built-in byte-level tokenizer."""

from __future__ import annotations

from pathlib import Path

BYTE_TOKENIZER = "bytes"


def byte_tokenizer():
    """A byte-level tokenizer with 256 byte tokens, then ``<|eos|>`` (id 256) and ``<|pad|>`` (id 257).

    Built in memory with ``tokenizers`` (no training, no download): every string round-trips.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet, key=lambda s: _byte_of(s)))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|eos|>", pad_token="<|pad|>")
    return tokenizer


def _byte_table() -> dict[str, int]:
    """GPT-2's byte-level symbols → their bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {chr(b): b for b in printable}, 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


_BYTES = _byte_table()


def _byte_of(symbol: str) -> int:
    """The byte that GPT-2's byte-to-unicode table maps to ``symbol``."""
    return _BYTES[symbol]


def token_bytes(tokenizer, token_id: int) -> bytes | None:
    """The raw bytes token ``token_id`` stands for (OpenAI's logprobs ``bytes``: a character split
    across tokens is rebuilt by joining them), where the tokenizer says them: a byte-level BPE's
    symbols (GPT-2, Llama 3, Qwen), a SentencePiece byte-fallback token ``<0xNN>``, or an added
    token's text (its UTF-8: neither byte symbols nor byte pieces); else ``None`` (the token's text
    is whole characters: its UTF-8)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or token_id >= backend.get_vocab_size(with_added_tokens=False):  # (added ids come last)
        added = getattr(tokenizer, "added_tokens_decoder", {}).get(int(token_id))  # (a dict built per call)
        if added is not None:  # (its content: its piece may be normalized, "▁" prepended)
            return added.content.encode("utf-8")
    piece = tokenizer.convert_ids_to_tokens(int(token_id))
    if not isinstance(piece, str):
        return None
    decoder = getattr(backend, "decoder", None)
    if type(decoder).__name__ == "ByteLevel" and all(c in _BYTES for c in piece):
        return bytes(_BYTES[c] for c in piece)
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return bytes([int(piece[3:5], 16)])
        except ValueError:
            return None
    return None


def load_tokenizer(source, *, trust_remote_code: bool = False):
    """A tokenizer from a directory path, ``"bytes"``, or an existing tokenizer object (returned as is).
    ``trust_remote_code`` lets ``transformers`` run a tokenizer class shipped with the directory."""
    if source is None or not isinstance(source, (str, Path)):
        return source
    if str(source) == BYTE_TOKENIZER:
        return byte_tokenizer()
    from transformers import AutoTokenizer

    path = Path(source)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory {str(path)!r} does not exist")
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def has_tokenizer_files(path: str | Path | None) -> bool:
    """Whether a checkpoint directory also holds a tokenizer."""
    if path is None:
        return False
    path = Path(path)
    return (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()
