"""Verification kernels: the Triton kernel (interpreted on CPU) and its torch twin return the same
tokens from the same random numbers, and each implements chain rejection sampling exactly."""


import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dspark.kernels import reference, use_backend, verify_chain, verify_greedy
from dspark.kernels import triton_verify


@pytest.fixture
def small_tiles(monkeypatch):
    """Vocabulary tiles of 8 so that tiny vocabularies still take several loop steps."""
    monkeypatch.setattr(triton_verify, "BLOCK_V", 8)


def dyadic_distributions(g: torch.Generator, shape: tuple, dtype, zero_fraction: float = 0.3) -> torch.Tensor:
    """Rows of integer weights scaled by a power of two so each row sums to exactly 1: every partial
    sum is exact, so the kernel's tiled sums and the twin's cumsum agree to the bit."""
    if 0 in shape:
        return torch.zeros(shape, dtype=dtype)
    weights = torch.randint(1, 8, shape, generator=g) * (torch.rand(shape, generator=g) > zero_fraction)
    weights[..., 0] += 1  # every row has mass
    total = 1 << int(weights.sum(-1).max()).bit_length()
    weights[..., -1] += total - weights.sum(-1)
    return weights.to(dtype) / total


def random_round(seed: int, batch: int, gamma: int, vocab: int, dtype, deterministic: bool):
    g = torch.Generator().manual_seed(seed)
    p = dyadic_distributions(g, (batch, gamma + 1, vocab), dtype)
    q = None if deterministic else dyadic_distributions(g, (batch, gamma, vocab), dtype)
    # drafts: often the target's likely tokens (acceptances), sometimes arbitrary ones
    likely = p[:, :gamma].argmax(-1)
    drafts = torch.where(torch.rand(batch, gamma, generator=g) < 0.6, likely,
                         torch.randint(0, vocab, (batch, gamma), generator=g))
    num_drafts = torch.randint(0, gamma + 1, (batch,), generator=g)
    uniforms = torch.rand(batch, gamma + 1, generator=g, dtype=dtype)
    return p, drafts, q, num_drafts, uniforms


@given(seed=st.integers(0, 2 ** 16), batch=st.integers(1, 5), gamma=st.integers(0, 4), vocab=st.integers(2, 40),
       dtype=st.sampled_from([torch.float32, torch.float64]), deterministic=st.booleans())
def test_chain_kernel_equals_twin(seed, batch, gamma, vocab, dtype, deterministic):
    args = random_round(seed, batch, gamma, vocab, dtype, deterministic)
    triton_verify.BLOCK_V = 8  # several vocabulary tiles (hypothesis forbids function-scoped fixtures)
    try:
        kernel = triton_verify.verify_chain(*args)
    finally:
        triton_verify.BLOCK_V = 1024
    twin = reference.verify_chain(*args)
    assert torch.equal(kernel[0], twin[0]) and torch.equal(kernel[1], twin[1])


@given(seed=st.integers(0, 2 ** 16), batch=st.integers(1, 5), gamma=st.integers(0, 4), vocab=st.integers(2, 40),
       ties=st.booleans())
def test_greedy_kernel_equals_twin(seed, batch, gamma, vocab, ties):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, gamma + 1, vocab, generator=g)
    if ties:  # several maxima per row: both must return the first
        logits = logits.round().clamp(-1, 1)
    target = logits.argmax(-1)
    drafts = torch.where(torch.rand(batch, gamma, generator=g) < 0.7, target[:, :gamma],
                         torch.randint(0, vocab, (batch, gamma), generator=g))
    num_drafts = torch.randint(0, gamma + 1, (batch,), generator=g)
    triton_verify.BLOCK_V = 2
    try:
        kernel = triton_verify.verify_greedy(logits, drafts, num_drafts)
    finally:
        triton_verify.BLOCK_V = 1024
    twin = reference.verify_greedy(logits, drafts, num_drafts)
    assert torch.equal(kernel[0], twin[0]) and torch.equal(kernel[1], twin[1])


@given(rows=st.lists(st.tuples(st.lists(st.booleans(), min_size=5, max_size=5), st.integers(0, 5)), min_size=1,
                    max_size=4))
def test_leading_true_counts_the_accepted_prefix_within_the_verified_drafts(rows):
    accepted = torch.tensor([flags for flags, _ in rows])
    num = torch.tensor([n for _, n in rows])
    expected = []
    for flags, n in rows:  # the definition: walk the first n flags up to the first False
        count = 0
        while count < n and flags[count]:
            count += 1
        expected.append(count)
    assert reference.leading_true(accepted, num).tolist() == expected


def test_greedy_verification_pins_the_rule(kernel_backend):
    logits = torch.tensor([[[0.0, 5.0, 1.0], [3.0, 0.0, 1.0], [0.0, 0.0, 9.0], [1.0, 0.0, 1.0]]])  # argmax 1, 0, 2, 0
    for drafts, ell, accepted in (([1, 0, 2], 3, 3), ([1, 2, 2], 3, 1), ([0, 0, 2], 3, 0), ([1, 0, 2], 2, 2)):
        num, tokens = verify_greedy(logits, torch.tensor([drafts]), torch.tensor([ell]))
        assert num.item() == accepted and tokens[0].tolist() == [1, 0, 2, 0]


# ----------------------------------------------------------- exact output distribution, per implementation

def emitted_joint(p1: torch.Tensor, p2: dict, q1: torch.Tensor | None, draft: int | None) -> torch.Tensor:
    """P(y1, y2) ``[V, V]`` of the first two tokens when one γ=1 round runs through the selected
    implementation and, if the round emitted only y1, the target continues with ``p2[y1]``.

    The implementation is a function of its uniforms; the distribution is integrated exactly: for
    each draft x, the acceptance uniform is evaluated once on each side of a(x) = min(1, p/q) and
    weighted by a(x) and 1 − a(x), and the final uniform at the middle of every inverse-CDF interval
    of the distribution it samples from, weighted by the interval's length.
    """
    vocab = p1.shape[0]
    joint = torch.zeros(vocab, vocab, dtype=torch.float64)
    drafts = range(vocab) if q1 is not None else [draft]
    for x in drafts:
        q_x = 1.0 if q1 is None else float(q1[x])
        if q_x == 0:
            continue
        a = min(1.0, float(p1[x]) / q_x) if p1[x] > 0 else 0.0
        residual = reference.residual_distribution(p1.view(1, -1), None if q1 is None else q1.view(1, -1),
                                                   torch.tensor([x]))[0]
        for accept, weight in ((True, a), (False, 1.0 - a)):
            if weight == 0:
                continue
            u0 = a / 2 if accept else (1 + a) / 2
            # the final uniform samples p2[x] (bonus) or the residual (recovered): cover both CDFs
            for dist in (p2[x], residual):
                cdf = torch.cumsum(dist, 0) / dist.sum()
                lows = torch.cat([cdf.new_zeros(1), cdf[:-1]])
                live = dist > 0
                u1 = ((lows + cdf) / 2)[live]
                probs = torch.stack([p1, p2[x]]).unsqueeze(0).expand(len(u1), -1, -1).contiguous()
                q = None if q1 is None else q1.view(1, 1, -1).expand(len(u1), -1, -1).contiguous()
                uniforms = torch.stack([torch.full_like(u1, u0), u1], 1)
                num, tokens = verify_chain(probs, torch.full((len(u1), 1), x), q, torch.ones(len(u1), dtype=torch.long),
                                           uniforms)
                if bool(num[0]) != accept:
                    raise AssertionError(f"draft {x}: u={u0} gave accepted={bool(num[0])}, a={a}")
                if (num == 1).all():
                    if dist is not p2[x]:
                        continue  # the residual CDF is only sampled after a rejection
                    for y2, w in zip(tokens[:, 1].tolist(), (cdf - lows)[live].tolist()):
                        joint[x, y2] += q_x * weight * w
                elif dist is residual:
                    for y1, w in zip(tokens[:, 0].tolist(), (cdf - lows)[live].tolist()):
                        joint[y1] += q_x * weight * w * p2[y1]
    return joint


@pytest.mark.parametrize("deterministic", [False, True])
def test_one_round_emits_the_target_joint_exactly(kernel_backend, deterministic):
    vocab = 5
    g = torch.Generator().manual_seed(4)

    def dist():
        w = torch.rand(vocab, generator=g, dtype=torch.float64) ** 2 * (torch.rand(vocab, generator=g) > 0.25)
        w[int(torch.randint(vocab, (1,), generator=g))] += 0.1
        return w / w.sum()

    for trial in range(4):
        p1, q1 = dist(), dist()
        p2 = {y: dist() for y in range(vocab)}
        draft = int(torch.multinomial(q1, 1, generator=g)) if deterministic else None
        joint = emitted_joint(p1, p2, None if deterministic else q1, draft)
        target = p1[:, None] * torch.stack([p2[y] for y in range(vocab)])
        assert torch.allclose(joint, target, atol=1e-12, rtol=0), trial


def test_verification_follows_the_rule_with_either_implementation(kernel_backend):
    """The tokens follow u < a(x), then inverse CDF on the residual (or on p for the bonus)."""
    from dspark.samplers import sample_from

    g = torch.Generator().manual_seed(1)
    batch, gamma, vocab = 32, 4, 7
    p = torch.softmax(torch.randn(batch, gamma + 1, vocab, generator=g, dtype=torch.float64) * 2, -1)
    q = torch.softmax(torch.randn(batch, gamma, vocab, generator=g, dtype=torch.float64) * 2, -1)
    drafts = sample_from(q, torch.rand(batch, gamma, generator=g, dtype=torch.float64))
    num_drafts = torch.randint(0, gamma + 1, (batch,), generator=g)
    uniforms = torch.rand(batch, gamma + 1, generator=g, dtype=torch.float64)
    num, tokens = verify_chain(p, drafts, q, num_drafts, uniforms)
    for b in range(batch):
        n = 0
        while n < num_drafts[b] and uniforms[b, n] < reference.acceptance_probability(
                p[b, n, drafts[b, n]].view(1, 1), q[b, n, drafts[b, n]].view(1, 1)).item():
            n += 1
        assert num[b].item() == n and tokens[b, :n].tolist() == drafts[b, :n].tolist()
        dist = p[b, n] if n == num_drafts[b] else reference.residual_distribution(
            p[b, n].view(1, -1), q[b, n].view(1, -1), drafts[b, n].view(1))[0]
        assert tokens[b, n].item() == sample_from(dist.view(1, -1), uniforms[b, gamma].view(1)).item()


def test_edge_rows(kernel_backend):
    """p == q (nothing to reject), disjoint supports (always rejected), and a draft of zero target
    mass: the same decisions from either implementation."""
    p = torch.tensor([[[0.5, 0.25, 0.25, 0.0], [0.0, 0.0, 1.0, 0.0]]] * 3, dtype=torch.float64)
    q = torch.stack([p[0, :1], torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=torch.float64),
                     torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)])
    drafts = torch.tensor([[0], [3], [3]])
    num, tokens = verify_chain(p, drafts, q, torch.ones(3, dtype=torch.long),
                               torch.tensor([[0.999, 0.3], [0.0, 0.6], [0.5, 0.9]], dtype=torch.float64))
    assert num.tolist() == [1, 0, 0]
    assert tokens[0].tolist() == [0, 2]  # accepted, then the bonus from p_2 (one-hot at 2)
    assert tokens[1, 0].item() == 1 and tokens[2, 0].item() == 2  # inverse CDF of the residual (= p here)


@pytest.mark.parametrize("deterministic", [False, True])
def test_tiles_grow_to_keep_their_number_bounded(small_tiles, monkeypatch, deterministic):
    """With at most 2 tiles a row, a 40-token vocabulary takes tiles of 32 (not 5 tiles of 8): the
    finishing program still reduces every tile, and the chain kernel returns the twin's tokens."""
    monkeypatch.setattr(triton_verify, "MAX_TILES", 2)
    assert triton_verify._tiling(40) == (32, 2)
    for seed in range(4):
        args = random_round(seed, 3, 3, 40, torch.float64, deterministic)
        assert all(torch.equal(a, b) for a, b in zip(triton_verify.verify_chain(*args), reference.verify_chain(*args)))


@pytest.mark.parametrize("vocab", [8, 24])
def test_rounding_between_tile_sum_and_scan_picks_a_token_with_weight(small_tiles, vocab):
    """float32 weights ``[2²⁴, 1, …, 1]`` per tile: a scan adds each 1 to 2²⁴ and loses it, a tree
    sum keeps them, so the tile sum exceeds the tile's own running sum. With ``u`` just below 1 the
    threshold falls in that gap: the tile is chosen, yet no entry of its scan passes the
    threshold. The kernel must still return a token of that tile with weight, never ``vocab``."""
    weights = torch.ones(1, 1, vocab)
    weights[0, 0, ::8] = 2.0 ** 24
    uniforms = torch.tensor([[1 - 2.0 ** -24]])
    num, tokens = triton_verify.verify_chain(weights, torch.zeros(1, 0, dtype=torch.long), None,
                                             torch.zeros(1, dtype=torch.long), uniforms)
    token = tokens[0, 0].item()
    assert num.item() == 0 and 0 <= token < vocab and weights[0, 0, token] > 0


def test_rounding_between_tile_scan_and_tree_sum_never_picks_a_token_without_weight(small_tiles):
    """The opposite gap: the mass before the chosen tile, summed as a tree, can round above the
    scan that chose the tile (2²⁴ + 1 + 1 + 2: the scan loses both ones, the tree keeps them).
    Weights per tile of 8: 2²⁴ | 1 | 1 | 2 | token 32 without weight, token 33 with 8. For every
    ``u`` in the last few ulps the kernel must return a token with weight (it once returned 32)."""
    vocab = 40
    weights = torch.zeros(1, 1, vocab)
    weights[0, 0, [0, 8, 16, 24, 33]] = torch.tensor([2.0 ** 24, 1.0, 1.0, 2.0, 8.0])
    for k in range(16):
        uniforms = torch.tensor([[1 - k * 2.0 ** -24]])
        num, tokens = triton_verify.verify_chain(weights, torch.zeros(1, 0, dtype=torch.long), None,
                                                 torch.zeros(1, dtype=torch.long), uniforms)
        token = tokens[0, 0].item()
        assert num.item() == 0 and weights[0, 0, token] > 0, (k, token)


def test_backend_switch_reaches_both_implementations():
    args = random_round(3, 4, 3, 16, torch.float32, False)
    with use_backend("torch"):
        twin = verify_chain(*args)
    with use_backend("triton"):
        kernel = verify_chain(*args)
    assert all(torch.equal(a, b) for a, b in zip(twin, kernel))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("vocab", [40, 5000, 151936])
def test_compiled_kernels_equal_twins_on_gpu(deterministic, vocab):
    """On CUDA, ``auto`` dispatches to the compiled kernels: same tokens as the twins (dyadic
    distributions, so sums are exact in any order), large vocabularies included."""
    from dspark.kernels import backend_for

    assert backend_for("cuda") == "triton"
    for seed in range(3):
        args = [a.cuda() if isinstance(a, torch.Tensor) else a
                for a in random_round(seed, 16, 7, vocab, torch.float32, deterministic)]
        with use_backend("auto"):
            kernel = verify_chain(*args)
            greedy_kernel = verify_greedy(args[0].log(), args[1], args[3])
        with use_backend("torch"):
            twin = verify_chain(*args)
            greedy_twin = verify_greedy(args[0].log(), args[1], args[3])
        assert all(torch.equal(a, b) for a, b in zip(kernel, twin))
        assert all(torch.equal(a, b) for a, b in zip(greedy_kernel, greedy_twin))
