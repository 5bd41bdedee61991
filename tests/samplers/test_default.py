"""DefaultSampler: processed distributions against their definitions; inverse-CDF sampling."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dspark.records import SamplingParams, batch_params
from dspark.samplers import DefaultSampler, default, sample_from

from helpers import chi_square_p_value

sampler = DefaultSampler()


def reference_probs(logits: list[float], temperature: float, top_k: int, top_p: float, min_p: float) -> list[float]:
    """The definitions, one token at a time, in float64 Python arithmetic."""
    scaled = [x / temperature for x in logits]
    order = sorted(range(len(scaled)), key=lambda i: -scaled[i])
    keep = set(range(len(scaled)))
    if 0 < top_k < len(scaled):
        kth = scaled[order[top_k - 1]]
        keep = {i for i in keep if scaled[i] >= kth}
    if top_p < 1.0:  # a token stays while its strictly likelier tokens weigh less than top_p (ties together)
        z = sum(math.exp(scaled[i]) for i in keep)
        q = {i: math.exp(scaled[i]) / z for i in keep}
        ahead = {i: sum(q[j] for j in order if j in keep and q[j] > q[i]) for i in keep}
        keep = {i for i in keep if ahead[i] < top_p}
    z = sum(math.exp(scaled[i]) for i in keep)
    probs = [math.exp(scaled[i]) / z if i in keep else 0.0 for i in range(len(scaled))]
    if min_p > 0:
        top = max(probs)
        probs = [p if p >= min_p * top else 0.0 for p in probs]
        total = sum(probs)
        probs = [p / total for p in probs]
    return probs


@given(
    logits=st.lists(st.floats(-8, 8, allow_nan=False), min_size=2, max_size=12, unique=True),
    temperature=st.sampled_from([0.3, 0.7, 1.0, 2.5]),
    top_k=st.integers(0, 12),
    top_p=st.sampled_from([1.0, 0.95, 0.8, 0.5, 0.1]),
    min_p=st.sampled_from([0.0, 0.05, 0.3]),
)
def test_processed_distribution_matches_definition(logits, temperature, top_k, top_p, min_p):
    params = SamplingParams(temperature, top_k, top_p, min_p).validate()
    got = sampler.probs(torch.tensor(logits, dtype=torch.float64), params)
    expected = torch.tensor(reference_probs(logits, temperature, top_k, top_p, min_p), dtype=torch.float64)
    assert torch.allclose(got, expected, atol=1e-12, rtol=0)


def test_greedy_is_one_hot_at_first_argmax():
    probs = sampler.probs(torch.tensor([[1.0, 3.0, 3.0, -1.0]]), SamplingParams())
    assert probs.tolist() == [[0.0, 1.0, 0.0, 0.0]]
    assert sampler.greedy(torch.tensor([1.0, 3.0, 3.0])).item() == 1


@given(weights=st.lists(st.sampled_from([0.0, 0.0, 1e-6, 0.1, 0.5, 1.0, 3.0]), min_size=1, max_size=10))
def test_inverse_cdf_frequencies_on_a_grid(weights):
    if sum(weights) == 0:
        weights = weights[:-1] + [1.0]
    probs = torch.tensor(weights, dtype=torch.float64)
    n = 20000
    grid = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    tokens = sample_from(probs.expand(n, -1), grid)
    counts = torch.bincount(tokens, minlength=len(weights)).double()
    assert (counts[probs == 0] == 0).all()
    assert torch.allclose(counts / n, probs / probs.sum(), atol=2.0 / n)


def test_inverse_cdf_never_returns_zero_weight_tokens_at_the_edges():
    probs = torch.tensor([[0.0, 0.3, 0.0, 0.7, 0.0, 0.0]])
    for u in (0.0, 1e-12, 0.3, 1 - 1e-7, 0.9999999999999999):
        assert sample_from(probs, torch.tensor([u], dtype=torch.float64)).item() in (1, 3)
    probs32 = torch.tensor([[0.1, 0.9, 0.0]], dtype=torch.float32)
    assert sample_from(probs32, torch.tensor([0.99999994])).item() == 1


def test_sampled_tokens_follow_processed_distribution_chi_square():
    """Significance 0.001, fixed seed: 20,000 draws from a top-k/top-p processed distribution."""
    logits = torch.randn(16, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2
    probs = sampler.probs(logits, SamplingParams(0.8, 10, 0.9, 0.0))
    uniforms = torch.rand(20000, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    counts = torch.bincount(sample_from(probs.expand(20000, -1), uniforms), minlength=16)
    assert chi_square_p_value(counts, probs) > 1e-3
    skewed = probs.roll(1)
    assert chi_square_p_value(counts, skewed) < 1e-3  # the test has power


def test_sampling_params_validation_messages():
    with pytest.raises(ValueError, match=r"top_p must be a number in \(0, 1\]"):
        SamplingParams(top_p=0).validate()
    for bad in (float("nan"), -0.5, 1e-46, float("inf"), True):  # 1e-46 once gave NaN probabilities
        with pytest.raises(ValueError, match="temperature must be a number >= 0"):
            SamplingParams(temperature=bad).validate()
    assert SamplingParams(temperature=1e-6).validate().temperature == 1e-6
    with pytest.raises(ValueError, match="top_k must be an integer in \\[0, "):
        SamplingParams(top_k=True).validate()


def test_draw_is_the_argmax_when_greedy_and_a_draw_from_the_processed_q_otherwise():
    """``Sampler.draw``, the drafters' step: greedy → argmax and no ``q``; sampling → the token
    ``sample(q, u)`` and that ``q``, with the sampler's processing applied."""
    sampler = DefaultSampler()
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0], [3.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    tokens, q = sampler.draw(logits, SamplingParams(0.0), None)
    assert tokens.tolist() == [1, 0] and q is None
    params, uniforms = SamplingParams(0.7, top_k=2), torch.tensor([0.99, 0.01], dtype=torch.float64)
    tokens, q = sampler.draw(logits, params, uniforms)
    torch.testing.assert_close(q, sampler.probs(logits, params), rtol=0, atol=0)
    assert tokens.tolist() == sample_from(q, uniforms).tolist() == [2, 0]


request_settings = st.builds(SamplingParams, temperature=st.sampled_from([0.0, 0.3, 1.0, 2.5]), top_k=st.integers(0, 12),
                             top_p=st.sampled_from([1.0, 0.95, 0.5]), min_p=st.sampled_from([0.0, 0.05, 0.3]))


@given(rows=st.lists(request_settings, min_size=2, max_size=5), seed=st.integers(0, 2**16))
def test_settings_per_request_process_each_row_as_alone(rows, seed):
    """A batch whose requests differ (greedy ones among them): each row's distribution, at every
    position, is bit for bit the one its own settings give it alone."""
    logits = torch.randn(len(rows), 3, 10, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3
    got = sampler.probs(logits, batch_params(rows, len(rows)))
    for b, row in enumerate(rows):
        assert torch.equal(got[b], sampler.probs(logits[b:b + 1], row)[0])


@given(seed=st.integers(0, 2**16), scale=st.sampled_from([0.5, 3.0, 10.0]), candidates=st.integers(1, 40),
       top_p=st.lists(st.sampled_from([0.3, 0.8, 0.95, 0.999, 1.0]), min_size=3, max_size=3))
def test_top_p_from_candidates_equals_the_full_sort(seed, scale, candidates, top_p):
    """On the CPU the top-p cut is looked for among the likeliest tokens first, and rows whose cut
    lies beyond them sort the whole vocabulary: the same sets, bit for bit, as sorting every row
    (requests with their own top-p included)."""
    logits = torch.randn(3, 4, 40, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    params = batch_params([SamplingParams(0.9, top_p=p) for p in top_p], 3)
    assert default.TOP_P_CANDIDATES >= 40  # (so that the 40-token rows below are sorted whole)
    saved, default.TOP_P_CANDIDATES = default.TOP_P_CANDIDATES, candidates
    try:
        partial = sampler.probs(logits, params)
    finally:
        default.TOP_P_CANDIDATES = saved
    full = sampler.probs(logits, params)  # 40 tokens < TOP_P_CANDIDATES: every row sorted whole
    assert torch.equal(partial, full)


def test_top_p_keeps_tokens_tied_at_the_cut_together():
    """Probabilities ½, ¼, ¼ (and a little less): at top-p 0.6 the cut falls between the two tied
    tokens, which stay (or go) together, whatever order a sort puts them in."""
    logits = torch.tensor([[2.0, 1.0, 1.0, -3.0], [2.0, -3.0, 1.0, 1.0]], dtype=torch.float64).log_softmax(-1)
    probs = sampler.probs(logits.exp().log(), SamplingParams(1.0, top_p=0.6))
    assert (probs[0, :3] > 0).all() and probs[0, 3] == 0
    assert (probs[1, [0, 2, 3]] > 0).all() and probs[1, 1] == 0
    assert torch.allclose(probs[0, 1], probs[0, 2])


def test_top_p_from_candidates_compiled_keeps_the_same_sets():
    """Compiled steps (``engine.compile``) take the static-shape search — every row sorted when one
    row's cut lies beyond the candidates: the same sets as the eager search."""
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(0)) * torch.tensor([0.5, 1, 2, 4, 8, 16]).view(6, 1)
    params = batch_params([SamplingParams(0.9, top_p=0.9)] * 6, 6, columns=True)
    saved, default.TOP_P_CANDIDATES = default.TOP_P_CANDIDATES, 5
    try:
        compiled = torch.compile(sampler.probs, dynamic=False)(logits, params)
        eager = sampler.probs(logits, params)
    finally:
        default.TOP_P_CANDIDATES = saved
    assert torch.equal(compiled > 0, eager > 0) and torch.allclose(compiled, eager, atol=1e-6)
    assert 5 < int((eager > 0).sum(-1).max()) and int((eager > 0).sum(-1).min()) < 5  # both kinds of rows
