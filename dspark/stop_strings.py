"""Stop strings: end a request once its generated text contains one of them.

The check runs on the host, after each round, over the tokens the round emitted (read with the
round's one status read, as streaming's are): the request ends right after the token that
completes a stop string, which stays in its output (as an EOS token does); tokens the round
emitted after it are dropped. Only generated text counts — a stop string that begins in the
prompt does not. Stopping early never changes which tokens come before the stop, so the output
is a prefix of what decoding without stop strings gives: lossless as ever.
"""

from __future__ import annotations


class StopStrings:
    """``stop(request_index, new_ids) -> kept | None``: how many of ``new_ids`` the request keeps
    when one of them completes a stop string, else ``None``.

    Each new token is checked by decoding the request's last few generated tokens (enough to
    hold the longest stop string: a character is at most 4 bytes, a token at least one), so the
    cost per token does not grow with the output.

    Args:
        tokenizer: anything with ``decode(ids, skip_special_tokens=...)``.
        stops: non-empty strings.
    """

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, list(stops)
        self.window = 4 * max(len(s) for s in self.stops) + 4
        self.generated: dict[int, list[int]] = {}

    def __call__(self, index: int, new_ids: list[int]) -> int | None:
        ids = self.generated.setdefault(index, [])
        for kept, token in enumerate(new_ids, 1):
            ids.append(token)
            tail = self.tokenizer.decode(ids[-self.window:], skip_special_tokens=True)
            if any(stop in tail for stop in self.stops):
                return kept
        return None


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
