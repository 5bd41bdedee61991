"""The prefix schedulers are lossless: exact output distributions, enumerated in float64, equal the
target's; without the early stop the paper's counterexample appears; the greedy admission finds
the global optimum on a smooth cost curve."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dspark.scheduling import ThroughputProfile, survival, threshold_lengths, throughput_lengths, top_k_lengths


def round_output(p, q, anchor, drafts, verify):
    """Exact distribution ``[V, V]`` of a request's next two tokens (y1, y2) after one round that
    verifies the first ``verify`` of ``drafts`` with rejection sampling; tokens the round does not
    emit come from the target (the next round, lossless by induction).

    p, q: ``[V + 1, V]`` target and draft next-token tables indexed by the previous token (row V
    is the anchor's context)."""
    vocab = p.shape[1]
    out = torch.zeros(vocab, vocab, dtype=torch.float64)
    p1, q1 = p[anchor], q[anchor]
    if verify == 0:
        return p1[:, None] * p[:vocab]
    x1 = drafts[0]
    accept1 = min(1.0, float(p1[x1] / q1[x1]))
    residual1 = (p1 - q1).clamp(min=0)
    if residual1.sum() > 0:
        out += (1 - accept1) * (residual1 / residual1.sum())[:, None] * p[:vocab]
    if verify == 1:
        out[x1] += accept1 * p[x1]  # bonus token after x1
        return out
    x2 = drafts[1]
    accept2 = min(1.0, float(p[x1, x2] / q[x1, x2]))
    residual2 = (p[x1] - q[x1]).clamp(min=0)
    out[x1, x2] += accept1 * accept2
    if residual2.sum() > 0:
        out[x1] += accept1 * (1 - accept2) * residual2 / residual2.sum()
    return out


def exact_outputs(targets, drafts_q, confidence, gamma, schedule):
    """Per request, the exact joint of its first two output tokens when every request's γ drafts
    are sampled from its drafter and ``schedule(survivals [R, γ]) → ℓ [R]`` picks the verified
    prefix lengths jointly for the batch. confidence[r][j][prev] is ``c_{r,j+1}`` after ``prev``."""
    num_requests, vocab = len(targets), targets[0].shape[1]
    anchor = vocab  # the row of the context before the first draft
    outputs = [torch.zeros(vocab, vocab, dtype=torch.float64) for _ in range(num_requests)]
    per_request = list(itertools.product(range(vocab), repeat=gamma))
    for joint in itertools.product(per_request, repeat=num_requests):
        prob, conf = 1.0, torch.zeros(num_requests, gamma, dtype=torch.float64)
        for r, drafts in enumerate(joint):
            previous = anchor
            for j, x in enumerate(drafts):
                prob *= float(drafts_q[r][previous, x])
                conf[r, j] = confidence[r][j][previous]
                previous = x
        if prob == 0:
            continue
        lengths = schedule(survival(conf))
        for r, drafts in enumerate(joint):
            outputs[r] += prob * round_output(targets[r], drafts_q[r], anchor, drafts, int(lengths[r]))
    return outputs


def target_joint(p):
    vocab = p.shape[1]
    return p[vocab][:, None] * p[:vocab]


def markov_table(draw, vocab, zeros_allowed=True):
    rows = []
    for _ in range(vocab + 1):
        weights = draw(st.lists(st.floats(0.0 if zeros_allowed else 0.05, 1.0), min_size=vocab, max_size=vocab))
        row = torch.tensor(weights, dtype=torch.float64) + 1e-3
        rows.append(row / row.sum())
    return torch.stack(rows)


@st.composite
def scheduling_problems(draw):
    vocab = draw(st.integers(2, 3))
    gamma = draw(st.integers(1, 3))
    max_requests = max(r for r in (1, 2, 3) if vocab ** (gamma * r) <= 800)
    requests = draw(st.integers(1, max_requests))
    targets = [markov_table(draw, vocab) for _ in range(requests)]
    drafters = [markov_table(draw, vocab) for _ in range(requests)]
    confidence = [[[draw(st.floats(0.0, 1.0)) for _ in range(vocab + 1)] for _ in range(gamma)]
                  for _ in range(requests)]
    # a decreasing, smooth-ish cost curve over 1..R(γ+1) tokens
    steps = draw(st.lists(st.floats(0.0, 0.5), min_size=requests * (gamma + 1), max_size=requests * (gamma + 1)))
    sps = [1.0]
    for s in steps[1:]:
        sps.append(sps[-1] * (1 - s))
    profile = ThroughputProfile(list(range(1, len(sps) + 1)), [max(v, 1e-3) for v in sps])
    return targets, drafters, confidence, gamma, profile


@settings(max_examples=40, deadline=None)
@given(scheduling_problems(), st.booleans())
def test_hardware_aware_scheduler_is_exactly_lossless(problem, padded):
    """Per-draft admission (the paper's cost) and whole-depth admission (a padded forward's cost)."""
    targets, drafters, confidence, gamma, profile = problem
    num_requests = len(targets)
    offered, active = torch.full((num_requests,), gamma), torch.ones(num_requests, dtype=torch.bool)
    outputs = exact_outputs(targets, drafters, confidence, gamma,
                            lambda a: throughput_lengths(a, offered, active, profile.sps, padded=padded))
    for p, out in zip(targets, outputs):
        assert torch.allclose(out, target_joint(p), atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(scheduling_problems(), st.floats(0.0, 1.0))
def test_threshold_scheduler_is_exactly_lossless(problem, threshold):
    targets, drafters, confidence, gamma, _ = problem
    offered = torch.full((len(targets),), gamma)
    outputs = exact_outputs(targets, drafters, confidence, gamma, lambda a: threshold_lengths(a, offered, threshold))
    for p, out in zip(targets, outputs):
        assert torch.allclose(out, target_joint(p), atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(scheduling_problems(), st.integers(0, 9))
def test_top_k_with_a_capacity_fixed_in_advance_is_exactly_lossless(problem, k):
    """The asynchronous scheduler's rule: the k most likely drafts, k chosen before the round."""
    targets, drafters, confidence, gamma, _ = problem
    offered, active = torch.full((len(targets),), gamma), torch.ones(len(targets), dtype=torch.bool)
    outputs = exact_outputs(targets, drafters, confidence, gamma, lambda a: top_k_lengths(a, offered, active, k))
    for p, out in zip(targets, outputs):
        assert torch.allclose(out, target_joint(p), atol=1e-12)


def test_top_k_admits_the_most_likely_drafts_as_prefixes():
    a = torch.tensor([[0.9, 0.5, 0.1], [0.8, 0.8, 0.0], [0.95, 0.2, 0.1]], dtype=torch.float64)
    offered, active = torch.tensor([3, 3, 3]), torch.tensor([True, True, True])
    assert top_k_lengths(a, offered, active, 4).tolist() == [1, 2, 1]  # 0.95, 0.9, 0.8, 0.8 (tie: position)
    assert top_k_lengths(a, offered, active, 100).tolist() == [3, 2, 3]  # a = 0 is never admitted
    assert top_k_lengths(a, offered, torch.tensor([True, False, True]), 3).tolist() == [2, 0, 1]
    assert top_k_lengths(a, torch.tensor([1, 3, 3]), active, 0).tolist() == [0, 0, 0]


def test_a_capacity_taken_from_the_same_round_is_biased():
    """Why the asynchronous scheduler's capacity must come from an earlier round: filling the
    capacity that the global search finds on *this* round's survivals verifies what that search
    verifies, and reproduces the paper's counterexample."""
    p = torch.tensor([[0.7, 0.3]] * 3, dtype=torch.float64)
    q = torch.tensor([[0.5, 0.5]] * 3, dtype=torch.float64)
    confidence = [[[0.8, 0.8, 0.8], [0.9, 0.0, 0.9]]]
    profile = ThroughputProfile([1, 2, 3], [1.0, 0.5, 0.45])
    one, active = torch.tensor([2]), torch.tensor([True])

    def same_round(a):
        capacity = int(throughput_lengths(a, one, active, profile.sps, early_stop=False).sum())
        return top_k_lengths(a, one, active, capacity)

    biased = exact_outputs([p], [q], confidence, 2, same_round)[0].sum(1)
    assert torch.allclose(biased, torch.tensor([0.85, 0.15], dtype=torch.float64))


def paper_counterexample(early_stop):
    """Appendix A: one request, γ = 2, target (0.7, 0.3), drafter (0.5, 0.5), c_1 = 0.8 and
    c_2 = 0.9 after A, 0 after B; SPS(1, 2, 3) = 1.0, 0.5, 0.45."""
    p = torch.tensor([[0.7, 0.3]] * 3, dtype=torch.float64)
    q = torch.tensor([[0.5, 0.5]] * 3, dtype=torch.float64)
    confidence = [[[0.8, 0.8, 0.8], [0.9, 0.0, 0.9]]]  # [request][position][previous token; row 2 = anchor]
    profile = ThroughputProfile([1, 2, 3], [1.0, 0.5, 0.45])
    one, active = torch.tensor([2]), torch.tensor([True])
    schedule = lambda a: throughput_lengths(a, one, active, profile.sps, early_stop=early_stop)  # noqa: E731
    return exact_outputs([p], [q], confidence, 2, schedule)[0].sum(1)  # first token's distribution


def test_without_the_early_stop_the_choice_peeks_and_is_biased():
    assert torch.allclose(paper_counterexample(early_stop=False), torch.tensor([0.85, 0.15], dtype=torch.float64))
    assert torch.allclose(paper_counterexample(early_stop=True), torch.tensor([0.7, 0.3], dtype=torch.float64))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.data())
def test_greedy_admission_equals_brute_force_on_a_concave_cost_curve(num_requests, gamma, data):
    conf = torch.tensor([[data.draw(st.floats(0.01, 1.0)) for _ in range(gamma)] for _ in range(num_requests)],
                        dtype=torch.float64)
    a = survival(conf)
    largest = num_requests * (gamma + 1)
    curvature = data.draw(st.floats(0.1, 0.9))
    counts = list(range(1, largest + 1))
    profile = ThroughputProfile(counts, [1.0 - curvature * (b / largest) ** 2 for b in counts])

    def throughput(lengths):
        tokens = num_requests + sum(lengths)
        tau = num_requests + sum(float(a[r, :n].sum()) for r, n in enumerate(lengths))
        return tau * float(profile.sps(torch.tensor([tokens]))[0])

    best = max(throughput(lengths) for lengths in itertools.product(range(gamma + 1), repeat=num_requests))
    greedy = throughput_lengths(a, torch.full((num_requests,), gamma), torch.ones(num_requests, dtype=torch.bool),
                                profile.sps).tolist()
    assert throughput(greedy) == pytest.approx(best, rel=1e-9)


def test_padded_cost_admits_whole_depths():
    """Θ_D = τ_D · SPS(R·(1+D)) for three requests: 2.7, 3.27, 3.30, 3.01 → depth 2 for everyone,
    where per-draft admission (4, 5, … tokens) stops at different lengths."""
    a = survival(torch.tensor([[0.9, 0.8, 0.5], [0.6, 0.5, 0.5], [0.95, 0.9, 0.9]], dtype=torch.float64))
    profile = ThroughputProfile([1, 3, 6, 9, 12], [1.0, 0.9, 0.6, 0.45, 0.35])
    offered, active = torch.tensor([3, 3, 3]), torch.ones(3, dtype=torch.bool)
    assert throughput_lengths(a, offered, active, profile.sps, padded=True).tolist() == [2, 2, 2]
    assert throughput_lengths(a, offered, active, profile.sps).tolist() == [2, 0, 3]
    # a request offering one draft stops there; an inactive row still pays for its padding
    lengths = throughput_lengths(a, torch.tensor([3, 1, 3]), torch.tensor([True, True, False]), profile.sps,
                                 padded=True)
    assert lengths.tolist()[1:] == [1, 0] and lengths[0] >= 1


def test_inactive_requests_and_unoffered_drafts_are_never_scheduled():
    a = survival(torch.tensor([[0.99, 0.99, 0.99], [0.99, 0.99, 0.99], [0.99, 0.99, 0.99]]))
    flat = ThroughputProfile([1, 64], [1.0, 1.0])  # verification is free: admit everything allowed
    lengths = throughput_lengths(a, torch.tensor([3, 1, 3]), torch.tensor([True, True, False]), flat.sps)
    assert lengths.tolist() == [3, 1, 0]
    assert threshold_lengths(a, torch.tensor([3, 1, 0]), 0.5).tolist() == [3, 1, 0]
    expensive = ThroughputProfile([1, 3, 4, 64], [1.0, 1.0, 0.5, 0.01])  # a 4th token halves the step rate
    assert throughput_lengths(a, torch.tensor([3, 3, 3]), torch.ones(3, dtype=torch.bool), expensive.sps).tolist() == [0, 0, 0]


def test_throughput_profile_interpolates_and_refuses_bad_tables(tmp_path):
    profile = ThroughputProfile([1, 3, 5], [90.0, 60.0, 40.0], model="dspark-tiny", dtype="float32")
    assert profile.sps(torch.tensor([1, 2, 5, 10])).tolist() == pytest.approx([90.0, 75.0, 40.0, 20.0])
    profile.save(tmp_path / "sps.json")
    loaded = ThroughputProfile.load(tmp_path / "sps.json")
    assert loaded == profile
    with pytest.raises(ValueError, match=r"another set-up: dtype 'float32' \(this run: 'bfloat16'\)"):
        loaded.check_matches("dspark-tiny", "bfloat16")
    with pytest.raises(ValueError, match="token_counts must be increasing integers >= 1"):
        ThroughputProfile([2, 1], [1.0, 1.0])
    with pytest.raises(ValueError, match="steps_per_second must be positive"):
        ThroughputProfile([1, 2], [1.0, 0.0])
    (tmp_path / "bad.json").write_text('{"token_counts": [1], "steps_per_second": [1.0], "exec": "rm -rf"}')
    with pytest.raises(ValueError, match=r"unknown throughput-profile keys \['exec'\]"):
        ThroughputProfile.load(tmp_path / "bad.json")
