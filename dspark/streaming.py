"""Streaming text: turn the token ids that ``Pipeline.generate(on_tokens=...)`` hands over as
rounds finish into text, written as soon as it is final.

Speculative decoding emits tokens in bursts (the accepted drafts and one more token per round),
and every emitted token is final — nothing is ever taken back — so a streamer only has to
decode. What it holds back is a character whose bytes are split across tokens: a byte-level
tokenizer decodes an incomplete UTF-8 sequence as U+FFFD, which is written once the rest arrives.

Each call decodes a window of a request's last tokens, not its whole output (which would make a
long stream quadratic): once everything in the window is written, the window restarts a few
tokens (:data:`CONTEXT_TOKENS`) before the end, so that a token decodes with the text before it
(tokenizers that drop or merge a leading space see their left context). A request's first
window starts with the last tokens of its prompt (:meth:`TextStreamer.start`; ``generate`` does
it): a SentencePiece tokenizer (Llama 2, Mistral) drops the word-start space of the first token
it decodes, so ``▁Paris`` alone reads ``Paris`` but ``is▁Paris`` reads ``is Paris``.
:func:`decode_continuation` is the same rule for a whole output. No window starts or ends inside
a character written as byte tokens (:func:`char_start`, :func:`char_end`): a byte-fallback
tokenizer would read the whole run of byte tokens as U+FFFD.
"""

from __future__ import annotations

import re
import sys
from typing import Callable, Sequence

REPLACEMENT = "\ufffd"  # what a tokenizer decodes an incomplete UTF-8 sequence to
#: tokens of left context a decoding window keeps when it moves on
CONTEXT_TOKENS = 8
#: a window longer than this moves on once everything in it is written
WINDOW_TOKENS = 64
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # a SentencePiece byte-fallback token


def _byte(tokenizer, token_id: int) -> int | None:
    """The byte a SentencePiece byte-fallback token (``<0xNN>``) stands for; ``None`` for any
    other token, and for every token of a tokenizer without byte pieces."""
    name = getattr(tokenizer, "convert_ids_to_tokens", None)
    piece = name(int(token_id)) if name is not None else None
    match = _BYTE_PIECE.fullmatch(piece) if isinstance(piece, str) else None
    return None if match is None else int(match.group(1), 16)


def _continues(byte: int | None) -> bool:
    return byte is not None and 0x80 <= byte < 0xC0  # a UTF-8 continuation byte


def char_start(tokenizer, ids: Sequence[int]) -> int:
    """Where a decoding window over ``ids`` can start: past the UTF-8 continuation bytes (at most
    3, a character's) that lead ``ids``, whose character began before them.

    A SentencePiece tokenizer with byte fallback (Llama 2, Mistral, Gemma) writes a character it
    has no piece for as ``<0xNN>`` byte tokens and decodes a run of them at once: a run that is not
    valid UTF-8 as a whole decodes to U+FFFD throughout, so a window starting mid-character would
    garble every character of its run. Other tokenizers have no byte pieces: 0."""
    start = 0
    while start < min(3, len(ids)) and _continues(_byte(tokenizer, ids[start])):
        start += 1
    return start


def char_end(tokenizer, ids: Sequence[int]) -> int:
    """``len(ids)``, less the byte tokens of a character ``ids`` leave incomplete at their end (a
    run of byte tokens ending mid-character decodes to U+FFFD throughout, its complete characters
    too: the text of ``ids[:char_end(...)]`` is what ``ids`` have written for sure)."""
    lead = len(ids)
    while lead > 0 and len(ids) - lead < 3 and _continues(_byte(tokenizer, ids[lead - 1])):
        lead -= 1
    byte = _byte(tokenizer, ids[lead - 1]) if lead > 0 else None
    if byte is None or byte < 0xC0:  # the last character is complete, or not made of byte tokens
        return len(ids)
    size = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
    return lead - 1 if len(ids) - lead + 1 < size else len(ids)


def decode_continuation(tokenizer, context: Sequence[int], ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
    """The text ``ids`` add after ``context`` (a prompt's last :data:`CONTEXT_TOKENS`, say): the
    decoding of ``context + ids`` past that of ``context``, as vLLM's detokenizer reads a
    continuation — a token that starts a word keeps its space. When the context's text ends in an
    incomplete character that ``ids`` complete, the character counts as theirs; when decoding is
    not prefix-stable there, ``ids`` are decoded alone."""
    decode = lambda x: tokenizer.decode(list(x), skip_special_tokens=skip_special_tokens)  # noqa: E731
    context = list(context)[char_start(tokenizer, context):]
    if not context:
        return decode(ids)
    head = decode(context[:char_end(tokenizer, context)]).rstrip(REPLACEMENT)
    whole = decode([*context, *ids])
    return whole[len(head):] if whole.startswith(head) else decode(ids)


class _Stream:
    """One request's decoding window: its last tokens, and the part of their text already written
    (the window's own decoding, left context included)."""

    def __init__(self, ids: list[int] | None = None, written: str = ""):
        self.ids: list[int] = ids or []
        self.written = written


class TextStreamer:
    """``on_tokens`` callback that decodes each request's new tokens and passes the new text on.

    Args:
        tokenizer: anything with ``decode(ids, skip_special_tokens=...)`` (a ``transformers`` tokenizer).
        on_text: ``on_text(request_index, text)``, called with each new piece of text; default: write
            it to standard output (whatever the request) and flush.
        skip_special_tokens: passed to ``decode``.

        keep_texts: keep :attr:`texts` (off for a long-running server that passes the text on and
            would otherwise hold every request's).
        prompt_context: read each request's first tokens on from its prompt (:meth:`start`; off:
            decode them alone, as a "tokenizer" that writes ids does).

    ``texts[i]`` is the text written so far for request ``i``; call :meth:`finish` after
    ``generate`` returns to write what was held back (an incomplete character at the very end).
    """

    def __init__(self, tokenizer, on_text: Callable[[int, str], None] | None = None, *,
                 skip_special_tokens: bool = True, keep_texts: bool = True, prompt_context: bool = True):
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self.on_text = on_text or _write_stdout
        self.keep_texts, self.prompt_context = keep_texts, prompt_context
        self.texts: dict[int, str] = {}
        self._streams: dict[int, _Stream] = {}

    def start(self, index: int, prompt_ids: Sequence[int]) -> None:
        """Request ``index``'s prompt, before its first tokens: its last :data:`CONTEXT_TOKENS` are
        the left context the first tokens decode with (never written themselves)."""
        if self.prompt_context:
            context = list(prompt_ids[-CONTEXT_TOKENS:])
            context = context[char_start(self.tokenizer, context):]
            self._streams[index] = _Stream(context, self._decode(context[:char_end(self.tokenizer, context)]).rstrip(REPLACEMENT))

    def __call__(self, index: int, token_ids: list[int]) -> None:
        stream = self._streams.setdefault(index, _Stream())
        stream.ids.extend(token_ids)
        end = char_end(self.tokenizer, stream.ids)  # an incomplete character waits for its other bytes
        text = self._decode(stream.ids[:end])
        self._write(index, stream, text.rstrip(REPLACEMENT))
        if end == len(stream.ids) and stream.written == text and len(stream.ids) > WINDOW_TOKENS:  # all written: the window moves on
            stream.ids = stream.ids[-CONTEXT_TOKENS:]
            stream.ids = stream.ids[char_start(self.tokenizer, stream.ids):]
            stream.written = self._decode(stream.ids)

    def finish(self, index: int | None = None) -> None:
        """Write every request's remaining text (or request ``index``'s alone, once it ended),
        incomplete characters included; the finished requests' windows are dropped."""
        for i in list(self._streams) if index is None else [index]:
            stream = self._streams.pop(i, None)
            if stream is not None:
                self._write(i, stream, self._decode(stream.ids))

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _write(self, index: int, stream: _Stream, text: str) -> None:
        shown = stream.written
        if len(text) <= len(shown):  # nothing new (or a character whose bytes are still arriving)
            return
        if text.startswith(shown):
            new = text[len(shown):]
        else:
            # the decoding rewrote text already written (a tokenizer that cleans up spaces before
            # punctuation; a run of byte tokens that proved invalid UTF-8): what was written stays,
            # and the text past the common prefix is written, so the stream goes on
            new = text[next(i for i, (a, b) in enumerate(zip(shown, text)) if a != b):]
        stream.written = text
        if self.keep_texts:
            self.texts[index] = self.texts.get(index, "") + new
        self.on_text(index, new)


def _write_stdout(index: int, text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
