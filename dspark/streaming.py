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
:func:`decode_continuation` is the same rule for a whole output.
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

REPLACEMENT = "\ufffd"  # what a tokenizer decodes an incomplete UTF-8 sequence to
#: tokens of left context a decoding window keeps when it moves on
CONTEXT_TOKENS = 8
#: a window longer than this moves on once everything in it is written
WINDOW_TOKENS = 64


def decode_continuation(tokenizer, context: Sequence[int], ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
    """The text ``ids`` add after ``context`` (a prompt's last :data:`CONTEXT_TOKENS`, say): the
    decoding of ``context + ids`` past that of ``context``, as vLLM's detokenizer reads a
    continuation — a token that starts a word keeps its space. When the context's text ends in an
    incomplete character that ``ids`` complete, the character counts as theirs; when decoding is
    not prefix-stable there, ``ids`` are decoded alone."""
    decode = lambda x: tokenizer.decode(list(x), skip_special_tokens=skip_special_tokens)  # noqa: E731
    if not context:
        return decode(ids)
    head, whole = decode(context).rstrip(REPLACEMENT), decode([*context, *ids])
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
            self._streams[index] = _Stream(context, self._decode(context).rstrip(REPLACEMENT))

    def __call__(self, index: int, token_ids: list[int]) -> None:
        stream = self._streams.setdefault(index, _Stream())
        stream.ids.extend(token_ids)
        text = self._decode(stream.ids)
        self._write(index, stream, text.rstrip(REPLACEMENT))  # an incomplete character waits for its other bytes
        if stream.written == text and len(stream.ids) > WINDOW_TOKENS:  # all written: the window moves on
            stream.ids = stream.ids[-CONTEXT_TOKENS:]
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
        # decoding is prefix-stable for byte-level tokenizers; text that rewrites what was shown
        # is not written (texts[i] keeps what was), here or in finish()
        if len(text) > len(shown) and text.startswith(shown):
            stream.written = text
            if self.keep_texts:
                self.texts[index] = self.texts.get(index, "") + text[len(shown):]
            self.on_text(index, text[len(shown):])


def _write_stdout(index: int, text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
