"""Exactness of chain speculative sampling, computed in float64 from the implementation's own
acceptance probabilities and residual distributions, and the glue that turns them into tokens."""

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dspark.records import DraftProposal, SamplingParams
from dspark.samplers import DefaultSampler, sample_from
from dspark.verifiers import ChainVerifier, GreedyVerifier, acceptance_probability, residual_distribution


def output_distribution(p: torch.Tensor, q: torch.Tensor | None, draft: int | None = None) -> torch.Tensor:
    """P(emitted token = y) for one position: draft x ~ q (or fixed ``draft``), accept with a(x),
    else draw from the normalised residual — all from the implementation's functions."""
    vocab = p.shape[-1]
    out = torch.zeros(vocab, dtype=torch.float64)
    drafts = range(vocab) if q is not None else [draft]
    for x in drafts:
        weight = q[x] if q is not None else 1.0
        if weight == 0:
            continue
        x_t = torch.tensor([x])
        q_x = None if q is None else q[x].view(1, 1)
        a = acceptance_probability(p[x].view(1, 1), q_x)[0, 0]
        residual = residual_distribution(p.view(1, -1), None if q is None else q.view(1, -1), x_t)[0]
        out[x] += weight * a
        out += weight * (1 - a) * residual / residual.sum()
    return out


distribution = st.lists(st.sampled_from([0.0, 0.0, 0.01, 0.1, 0.3, 1.0, 2.0, 5.0]), min_size=2, max_size=6)


def normalise(weights, vocab):
    t = torch.tensor((weights + [0.0] * vocab)[:vocab], dtype=torch.float64)
    if t.sum() == 0:
        t[0] = 1.0
    return t / t.sum()


@given(p_w=distribution, q_w=distribution, vocab=st.integers(2, 6))
def test_emitted_token_is_distributed_as_p(p_w, q_w, vocab):
    p, q = normalise(p_w, vocab), normalise(q_w, vocab)
    assert torch.allclose(output_distribution(p, q), p, atol=1e-9, rtol=0)


@given(p_w=distribution, vocab=st.integers(2, 6), draft=st.integers(0, 5))
def test_deterministic_draft_emits_p(p_w, vocab, draft):
    p = normalise(p_w, vocab)
    assert torch.allclose(output_distribution(p, None, draft % vocab), p, atol=1e-9, rtol=0)


@pytest.mark.parametrize("case", ["equal", "disjoint", "one_hot_q", "one_hot_p"])
def test_edge_cases(case):
    p = torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=torch.float64)
    q = {"equal": p.clone(), "disjoint": torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64),
         "one_hot_q": torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64),
         "one_hot_p": torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)}[case]
    if case == "one_hot_p":
        p = torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    assert torch.allclose(output_distribution(p, q), p, atol=1e-12, rtol=0)


def chain_joint(p_table, q_table, gamma: int, vocab: int, deterministic: bool) -> dict:
    """Exact joint over the first γ+1 tokens: one verification round, then (for tokens the round
    did not emit) the target's own distribution. ``p_table[prefix]``/``q_table[prefix]`` give the
    next-token distributions after a prefix tuple."""
    joint: dict[tuple, float] = {}

    def complete(prefix, mass):
        if len(prefix) == gamma + 1:
            joint[prefix] = joint.get(prefix, 0.0) + mass
            return
        for y in range(vocab):
            if p_table[prefix][y] > 0:
                complete(prefix + (y,), mass * float(p_table[prefix][y]))

    for drafts in itertools.product(range(vocab), repeat=gamma):
        q_mass = 1.0
        for k in range(gamma):
            q_k = q_table[drafts[:k]]
            q_mass *= float(q_k[drafts[k]]) if not deterministic else float(drafts[k] == int(q_k.argmax()))
        if q_mass == 0:
            continue
        survive = q_mass
        for k in range(gamma + 1):
            prefix = drafts[:k]
            p_k = p_table[prefix]
            if k == gamma:  # all accepted: bonus from p_{γ+1}
                for y in range(vocab):
                    if p_k[y] > 0:
                        complete(prefix + (y,), survive * float(p_k[y]))
                break
            q_k = None if deterministic else q_table[prefix]
            x = torch.tensor([drafts[k]])
            a = float(acceptance_probability(p_k[drafts[k]].view(1, 1), None if q_k is None else q_k[drafts[k]].view(1, 1)))
            residual = residual_distribution(p_k.view(1, -1), None if q_k is None else q_k.view(1, -1), x)[0]
            residual = residual / residual.sum()
            for y in range(vocab):
                if residual[y] > 0:
                    complete(prefix + (y,), survive * (1 - a) * float(residual[y]))
            survive *= a
    return joint


@pytest.mark.parametrize("deterministic", [False, True])
def test_joint_of_a_gamma_3_chain_equals_target(deterministic):
    vocab, gamma = 3, 3
    g = torch.Generator().manual_seed(0)
    prefixes = [t for n in range(gamma + 1) for t in itertools.product(range(vocab), repeat=n)]

    def random_dist():
        w = torch.rand(vocab, generator=g, dtype=torch.float64) ** 3
        w[torch.randint(vocab, (1,), generator=g)] *= torch.randint(0, 2, (1,), generator=g).item()  # some zeros
        return w / w.sum() if w.sum() > 0 else torch.full((vocab,), 1 / vocab, dtype=torch.float64)

    p_table = {t: random_dist() for t in prefixes}
    q_table = {t: random_dist() for t in prefixes}
    joint = chain_joint(p_table, q_table, gamma, vocab, deterministic)
    for seq in itertools.product(range(vocab), repeat=gamma + 1):
        target = 1.0
        for k in range(gamma + 1):
            target *= float(p_table[seq[:k]][seq[k]])
        assert abs(joint.get(seq, 0.0) - target) < 1e-9


def test_verify_uses_acceptance_and_residual_as_defined(kernel_backend):
    """The tokens ChainVerifier.verify returns follow the rule u < a(x), then inverse-CDF on the
    residual (or on p for the bonus) with the last uniform — with the torch twin and with the
    Triton kernel (interpreted on CPU)."""
    sampler = DefaultSampler()
    params = SamplingParams(temperature=1.0)
    g = torch.Generator().manual_seed(1)
    batch, gamma, vocab = 64, 4, 7
    logits = torch.randn(batch, gamma + 1, vocab, generator=g, dtype=torch.float64) * 2
    q = torch.softmax(torch.randn(batch, gamma, vocab, generator=g, dtype=torch.float64) * 2, -1)
    drafts = sample_from(q, torch.rand(batch, gamma, generator=g, dtype=torch.float64))
    num_tokens = torch.randint(0, gamma + 1, (batch,), generator=g)
    uniforms = torch.rand(batch, gamma + 1, generator=g, dtype=torch.float64)
    result = ChainVerifier().verify(logits, DraftProposal(drafts, num_tokens, q), sampler=sampler, params=params,
                                    uniforms=uniforms)
    p = torch.softmax(logits, -1)
    for b in range(batch):
        n = 0
        while n < num_tokens[b] and uniforms[b, n] < acceptance_probability(p[b, n, drafts[b, n]].view(1, 1), q[b, n, drafts[b, n]].view(1, 1)).item():
            n += 1
        assert result.num_accepted[b].item() == n
        assert result.tokens[b, :n].tolist() == drafts[b, :n].tolist()
        if n < num_tokens[b]:
            dist = residual_distribution(p[b, n].view(1, -1), q[b, n].view(1, -1), drafts[b, n].view(1))[0]
        else:
            dist = p[b, n]
        assert result.tokens[b, n].item() == sample_from(dist.view(1, -1), uniforms[b, gamma].view(1)).item()


def test_greedy_verification_accepts_argmax_prefix(kernel_backend):
    logits = torch.tensor([[[0.0, 5.0, 1.0], [3.0, 0.0, 1.0], [0.0, 0.0, 9.0], [1.0, 0.0, 0.0]]])  # argmax 1, 0, 2, 0
    for drafts, ell, accepted, tokens in (([1, 0, 2], 3, 3, [1, 0, 2, 0]), ([1, 2, 2], 3, 1, [1, 0]),
                                         ([0, 0, 2], 3, 0, [1]), ([1, 0, 2], 2, 2, [1, 0, 2])):
        proposal = DraftProposal(torch.tensor([drafts]), torch.tensor([ell]))
        for verifier in (GreedyVerifier(), ChainVerifier()):
            out = verifier.verify(logits, proposal, sampler=DefaultSampler(), params=SamplingParams(),
                                  uniforms=torch.zeros(1, 0))
            assert out.num_accepted.item() == accepted
            assert out.tokens[0, : accepted + 1].tolist() == tokens
