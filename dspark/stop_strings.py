"""Stop strings: end a request once its generated text contains one of them.

The check runs on the host, after each round, over the tokens the round emitted (read with the
round's one status read, as streaming's are): the request ends right after the token that
completes a stop string, which stays in its output (as an EOS token does); tokens the round
emitted after it are dropped. Only generated text counts — a stop string that begins in the
prompt does not — and with ``min_new_tokens`` only tokens from that one on. The generated text is
read as a continuation of the prompt (:func:`~dspark.streaming.decode_continuation`): the first
token keeps the space a SentencePiece tokenizer drops at the start of a decoding. Stopping early never
changes which tokens come before the stop, so the output is a prefix of what decoding without
stop strings gives: lossless as ever.
"""

from __future__ import annotations

from typing import Sequence

from dspark.streaming import CONTEXT_TOKENS, REPLACEMENT, char_end, char_start


class StopStrings:
    """``stop(request_index, new_ids) -> kept | None``: how many of ``new_ids`` the request keeps
    when one of them completes a stop string, else ``None``.

    A token completes a stop string when an occurrence ends in the text it adds. Each new token is
    checked by decoding the request's last few generated tokens with and without it (enough to
    hold the longest stop string: a character is at most 4 bytes, a token at least one; more
    where special tokens, skipped in the text, leave them short of it), so the cost per token does
    not grow with the output.

    Args:
        tokenizer: anything with ``decode(ids, skip_special_tokens=...)``.
        stops: non-empty strings.
        min_new_tokens: only tokens from the ``min_new_tokens``-th on can complete one (as in vLLM:
            a request with ``min_new_tokens`` never ends on a stop string before it has that many).
        prompt: the request's prompt ids (its last :data:`~dspark.streaming.CONTEXT_TOKENS` are the
            left context the first tokens are read with; none: read alone).
    """

    def __init__(self, tokenizer, stops: list[str], min_new_tokens: int = 0, prompt: Sequence[int] = ()):
        self.tokenizer, self.stops, self.min_new_tokens = tokenizer, list(stops), min_new_tokens
        self.context = list(prompt[-CONTEXT_TOKENS:])
        self.context = self.context[char_start(tokenizer, self.context):]
        self.longest = max(len(s) for s in self.stops)
        self.window = 4 * self.longest + 4  # tokens: a character is at most 4 bytes, a token at least one
        self.generated: dict[int, list[int]] = {}

    def __call__(self, index: int, new_ids: list[int]) -> int | None:
        ids = self.generated.setdefault(index, list(self.context))  # the context, then the generated tokens
        for kept, token in enumerate(new_ids, 1):
            ids.append(token)
            if len(ids) - len(self.context) >= self.min_new_tokens and self._completes(ids, len(ids) - len(self.context)):
                return kept
        return None

    def _completes(self, ids: list[int], generated: int) -> bool:
        """Whether ``ids[-1]`` completes a stop string: one occurs in the text of the last tokens and
        ends past the text of those before the new one (whose incomplete last character, if any,
        the new token may finish), beginning in the generated text (the last ``generated`` ids)."""
        # (text of a run of tokens: up to a character they leave incomplete, whose bytes may
        # otherwise decode to U+FFFD together with the characters before it)
        read = lambda x: self.tokenizer.decode(x[:char_end(self.tokenizer, x)], skip_special_tokens=True  # noqa: E731
                                               ).rstrip(REPLACEMENT)
        size = self.window
        while True:
            window = ids[-size - 1:]
            window = window[char_start(self.tokenizer, window):]  # (not inside a character's byte tokens)
            before = read(window[:-1])
            # a stop string ending in the new text starts at most its length − 1 characters before it:
            # tokens without text (skipped special tokens) can leave a window of tokens short of that
            if len(before) >= self.longest or size + 1 >= len(ids):
                break
            size *= 2
        text = self.tokenizer.decode(window, skip_special_tokens=True)
        context = len(window) - generated  # context tokens still in the window
        start = len(read(window[:context])) if context > 0 else 0
        return any(text.find(stop, max(start, len(before) - len(stop) + 1)) >= 0 for stop in self.stops)


def check_stop_strings(stop, tokenizer) -> list[str]:
    """Validate a ``stop`` argument (``None``, or a list of non-empty strings) → the list."""
    if stop is None:
        return []
    if isinstance(stop, str) or not isinstance(stop, (list, tuple)):
        raise TypeError(f"stop must be a list of strings, got {stop!r}")
    bad = [s for s in stop if not isinstance(s, str) or s == ""]
    if bad:
        raise ValueError(f"stop must hold non-empty strings, got {bad[:5]}")
    if stop and tokenizer is None:
        raise ValueError("stop strings need a tokenizer to read the generated text; this pipeline has none "
                         "(pass build_pipeline(tokenizer=...) or use stop_token_ids)")
    return list(stop)
