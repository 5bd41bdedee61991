"""The n-gram (prompt lookup) drafter against a plain-Python reference."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dspark.drafters.ngram import NgramConfig, NgramDrafter
from dspark.records import DecodingState, SamplingParams


def reference(context: list[int], gamma: int, min_n: int, max_n: int, periodic: bool = False) -> list[int]:
    """Longest n first; the most recent earlier occurrence of the last n tokens; what followed it
    (``periodic``: then what followed that, as if the text repeats, until there are γ)."""
    for n in range(max_n, min_n - 1, -1):
        if len(context) < n + 1:
            continue
        suffix = context[-n:]
        for end in range(len(context) - 2, n - 2, -1):  # window ends before the suffix's last token
            if context[end - n + 1: end + 1] == suffix:
                if not periodic:
                    return context[end + 1: end + 1 + gamma]
                extended = list(context)
                for i in range(gamma):  # each draft is the token one period back, drafts included
                    extended.append(extended[end + 1 + i])
                return extended[len(context):]
    return []


def state_of(contexts: list[list[int]], width: int) -> DecodingState:
    tokens = torch.zeros(len(contexts), width, dtype=torch.long)
    for b, c in enumerate(contexts):
        tokens[b, : len(c)] = torch.tensor(c)
    lengths = torch.tensor([len(c) for c in contexts])
    return DecodingState(tokens=tokens, prompt_lengths=lengths.clone(), lengths=lengths,
                         done=torch.zeros(len(contexts), dtype=torch.bool), max_new_tokens=1, params=SamplingParams())


@given(contexts=st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=24), min_size=1, max_size=5),
       gamma=st.integers(1, 5), min_n=st.integers(1, 3), extra=st.integers(0, 2), periodic=st.booleans())
def test_matches_reference(contexts, gamma, min_n, extra, periodic):
    max_n = min_n + extra
    drafter = NgramDrafter(NgramConfig(num_speculative_tokens=gamma, min_n=min_n, max_n=max_n, periodic=periodic),
                           target=None, sampler=None)
    proposal = drafter.propose(state_of(contexts, width=32), torch.zeros(len(contexts), 0))
    for b, context in enumerate(contexts):
        expected = reference(context, gamma, min_n, max_n, periodic)
        n = proposal.num_tokens[b].item()
        assert proposal.tokens[b, :n].tolist() == expected
    assert proposal.probs is None and proposal.tokens.shape == (len(contexts), gamma)


def test_periodic_drafts_continue_a_repeating_text():
    drafter = NgramDrafter(NgramConfig(num_speculative_tokens=5, min_n=1, max_n=2, periodic=True), target=None, sampler=None)
    proposal = drafter.propose(state_of([[7, 1, 2, 3, 1, 2], [4, 4]], width=16), torch.zeros(2, 0))
    assert proposal.tokens.tolist() == [[3, 1, 2, 3, 1], [4, 4, 4, 4, 4]] and proposal.num_tokens.tolist() == [5, 5]


def test_max_n_past_the_token_buffer_matches_as_the_longest_that_fits():
    """A ``max_n`` longer than the buffer (prompt + budget + lookahead) once crashed on a short
    request (a negative slice width); n-grams that long cannot match, so the result is max_n = width's."""
    contexts = [[5, 6, 7, 5, 6], [1, 2, 1]]
    for max_n in (9, 10, 11, 40):
        drafter = NgramDrafter(NgramConfig(num_speculative_tokens=3, min_n=1, max_n=max_n), target=None, sampler=None)
        proposal = drafter.propose(state_of(contexts, width=8), torch.zeros(2, 0))
        for b, context in enumerate(contexts):
            assert proposal.tokens[b, :proposal.num_tokens[b]].tolist() == reference(context, 3, 1, max_n)


def test_bad_n_range_is_an_error():
    with pytest.raises(ValueError, match="needs 1 <= min_n <= max_n, got min_n=3, max_n=2"):
        NgramDrafter(NgramConfig(min_n=3, max_n=2), target=None, sampler=None)
    with pytest.raises(ValueError, match="num_speculative_tokens must be an integer >= 1"):
        NgramDrafter(NgramConfig(num_speculative_tokens=0), target=None, sampler=None)
