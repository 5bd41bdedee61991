"""Streaming text: turn the token ids that ``Pipeline.generate(on_tokens=...)`` hands over as
rounds finish into text, written as soon as it is final.

Speculative decoding emits tokens in bursts (the accepted drafts and one more token per round),
and every emitted token is final — nothing is ever taken back — so a streamer only has to
decode. What it holds back is a character whose bytes are split across tokens: a byte-level
tokenizer decodes an incomplete UTF-8 sequence as U+FFFD, which is written once the rest arrives.

Each call decodes a window of a request's last tokens, not its whole output (which would make a
long stream quadratic): once everything in the window is written, the window restarts a few
tokens (:data:`CONTEXT_TOKENS`) before the end, so that a token decodes with the text before it
(tokenizers that drop or merge a leading space see their left context).
"""

from __future__ import annotations

import sys
from typing import Callable

REPLACEMENT = "\ufffd"  # what a tokenizer decodes an incomplete UTF-8 sequence to
#: tokens of left context a decoding window keeps when it moves on
CONTEXT_TOKENS = 8
#: a window longer than this moves on once everything in it is written
WINDOW_TOKENS = 64


class _Stream:
    """One request's decoding window: its last tokens, and the part of their text already written
    (the window's own decoding, left context included)."""

    def __init__(self):
        self.ids: list[int] = []
        self.written = ""


class TextStreamer:
    """``on_tokens`` callback that decodes each request's new tokens and passes the new text on.

    Args:
        tokenizer: anything with ``decode(ids, skip_special_tokens=...)`` (a ``transformers`` tokenizer).
        on_text: ``on_text(request_index, text)``, called with each new piece of text; default: write
            it to standard output (whatever the request) and flush.
        skip_special_tokens: passed to ``decode``.

    ``texts[i]`` is the text written so far for request ``i``; call :meth:`finish` after
    ``generate`` returns to write what was held back (an incomplete character at the very end).
    """

    def __init__(self, tokenizer, on_text: Callable[[int, str], None] | None = None, *,
                 skip_special_tokens: bool = True):
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self.on_text = on_text or _write_stdout
        self.texts: dict[int, str] = {}
        self._streams: dict[int, _Stream] = {}

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
        incomplete characters included."""
        for i, stream in self._streams.items():
            if index is None or i == index:
                self._write(i, stream, self._decode(stream.ids))

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _write(self, index: int, stream: _Stream, text: str) -> None:
        shown = stream.written
        # decoding is prefix-stable for byte-level tokenizers; text that rewrites what was shown
        # is not written (texts[i] keeps what was), here or in finish()
        if len(text) > len(shown) and text.startswith(shown):
            stream.written = text
            self.texts[index] = self.texts.get(index, "") + text[len(shown):]
            self.on_text(index, text[len(shown):])


def _write_stdout(index: int, text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
