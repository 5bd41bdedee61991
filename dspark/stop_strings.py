"""Stop strings: end a request once its generated text contains one of them.

The check runs on the host, after each round, over the tokens the round emitted (read with the
round's one status read, as streaming's are): the request ends right after the token that
completes a stop string, which stays in its output (as an EOS token does); tokens the round
emitted after it are dropped. Only generated text counts — a stop string that begins in the
prompt does not — and with ``min_new_tokens`` only tokens from that one on. Stopping early never
changes which tokens come before the stop, so the output is a prefix of what decoding without
stop strings gives: lossless as ever.
"""

from __future__ import annotations

from dspark.streaming import REPLACEMENT


class StopStrings:
    """``stop(request_index, new_ids) -> kept | None``: how many of ``new_ids`` the request keeps
    when one of them completes a stop string, else ``None``.

    A token completes a stop string when an occurrence ends in the text it adds. Each new token is
    checked by decoding the request's last few generated tokens with and without it (enough to
    hold the longest stop string: a character is at most 4 bytes, a token at least one), so the
    cost per token does not grow with the output.

    Args:
        tokenizer: anything with ``decode(ids, skip_special_tokens=...)``.
        stops: non-empty strings.
        min_new_tokens: only tokens from the ``min_new_tokens``-th on can complete one (as in vLLM:
            a request with ``min_new_tokens`` never ends on a stop string before it has that many).
    """

    def __init__(self, tokenizer, stops: list[str], min_new_tokens: int = 0):
        self.tokenizer, self.stops, self.min_new_tokens = tokenizer, list(stops), min_new_tokens
        self.window = 4 * max(len(s) for s in self.stops) + 4
        self.generated: dict[int, list[int]] = {}

    def __call__(self, index: int, new_ids: list[int]) -> int | None:
        ids = self.generated.setdefault(index, [])
        for kept, token in enumerate(new_ids, 1):
            ids.append(token)
            if len(ids) >= self.min_new_tokens and self._completes(ids[-self.window - 1:]):
                return kept
        return None

    def _completes(self, ids: list[int]) -> bool:
        """Whether ``ids[-1]`` completes a stop string: one occurs in the text of ``ids`` and ends past
        the text of ``ids[:-1]`` (whose incomplete last character, if any, the new token may finish)."""
        before = self.tokenizer.decode(ids[:-1], skip_special_tokens=True).rstrip(REPLACEMENT)
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return any(text.find(stop, max(0, len(before) - len(stop) + 1)) >= 0 for stop in self.stops)


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
