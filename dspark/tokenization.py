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


def _byte_of(symbol: str) -> int:
    """The byte that GPT-2's byte-to-unicode table maps to ``symbol``."""
    code = ord(symbol)
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def load_tokenizer(source):
    """A tokenizer from a directory path, ``"bytes"``, or an existing tokenizer object (returned as is)."""
    if source is None or not isinstance(source, (str, Path)):
        return source
    if str(source) == BYTE_TOKENIZER:
        return byte_tokenizer()
    from transformers import AutoTokenizer

    path = Path(source)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory {str(path)!r} does not exist")
    return AutoTokenizer.from_pretrained(path)


def has_tokenizer_files(path: str | Path | None) -> bool:
    """Whether a checkpoint directory also holds a tokenizer."""
    if path is None:
        return False
    path = Path(path)
    return (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()
