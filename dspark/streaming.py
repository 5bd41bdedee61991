"""Streaming text: turn the token ids that ``Pipeline.generate(on_tokens=...)`` hands over as
rounds finish into text, written as soon as it is final.

Speculative decoding emits tokens in bursts (the accepted drafts and one more token per round),
and every emitted token is final — nothing is ever taken back — so a streamer only has to
decode. What it holds back is a character whose bytes are split across tokens: a byte-level
tokenizer decodes an incomplete UTF-8 sequence as U+FFFD, which is written once the rest arrives.
"""

from __future__ import annotations

import sys
from typing import Callable

REPLACEMENT = "\ufffd"  # what a tokenizer decodes an incomplete UTF-8 sequence to


class TextStreamer:
    """``on_tokens`` callback that decodes each request's tokens so far and passes the new text on.

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
        self.token_ids: dict[int, list[int]] = {}
        self.texts: dict[int, str] = {}

    def __call__(self, index: int, token_ids: list[int]) -> None:
        ids = self.token_ids.setdefault(index, [])
        ids.extend(token_ids)
        text = self._decode(ids)
        complete = text.rstrip(REPLACEMENT)  # an incomplete character waits for its other bytes
        self._write(index, complete)

    def finish(self) -> None:
        """Write every request's remaining text, incomplete characters included."""
        for index, ids in self.token_ids.items():
            self._write(index, self._decode(ids))

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _write(self, index: int, text: str) -> None:
        shown = self.texts.get(index, "")
        # decoding is prefix-stable for byte-level tokenizers; text that rewrites what was shown
        # is not written (texts[i] keeps what was), here or in finish()
        if len(text) > len(shown) and text.startswith(shown):
            self.texts[index] = text
            self.on_text(index, text[len(shown):])


def _write_stdout(index: int, text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
