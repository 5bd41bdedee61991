"""Commit kernels: appending a round's tokens (EOS and budget stops) and compacting accepted KV
entries — the Triton kernel (interpreted on CPU) equals its torch twin, and both pin the semantics."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from dspark.kernels import commit_tokens, gather_accepted_kv, reference
from dspark.kernels import triton_commit


def commit_case(seed: int, batch: int, width: int, num_eos: int, max_new: int):
    g = torch.Generator().manual_seed(seed)
    vocab = 6  # small, so emitted tokens often hit an EOS id
    prompt_lengths = torch.randint(1, 5, (batch,), generator=g)
    generated = torch.randint(0, max_new, (batch,), generator=g)
    lengths = prompt_lengths + generated
    tokens = torch.randint(0, vocab, (batch, 5 + max_new + width), generator=g)
    done = torch.rand(batch, generator=g) < 0.2
    emitted = torch.randint(0, vocab, (batch, width), generator=g)
    num_emitted = torch.where(done, 0, torch.randint(1, width + 1, (batch,), generator=g))
    # each request's own stop ids, padded with -1 (some requests have fewer, or none)
    eos = torch.stack([torch.randperm(vocab, generator=g)[:num_eos] for _ in range(batch)])
    eos = eos.masked_fill(torch.arange(num_eos) >= torch.randint(0, num_eos + 1, (batch, 1), generator=g), -1)
    budgets = torch.maximum(generated, torch.randint(1, max_new + 1, (batch,), generator=g))  # each request's own
    return tokens, lengths, prompt_lengths, done, emitted, num_emitted, eos, budgets


@given(seed=st.integers(0, 2 ** 16), batch=st.integers(1, 6), width=st.integers(1, 9), num_eos=st.integers(0, 3),
       max_new=st.integers(1, 12))
def test_commit_kernel_equals_twin(seed, batch, width, num_eos, max_new):
    case = commit_case(seed, batch, width, num_eos, max_new)
    kernel_case = [t.clone() if isinstance(t, torch.Tensor) else t for t in case]
    kept_twin = reference.commit_tokens(*case)
    kept_kernel = triton_commit.commit_tokens(*kernel_case)
    assert torch.equal(kept_kernel, kept_twin)
    for twin, kernel in zip(case[:4], kernel_case[:4]):  # tokens, lengths, prompt_lengths, done
        assert torch.equal(kernel, twin)


def test_commit_semantics(kernel_backend):
    tokens = torch.zeros(3, 12, dtype=torch.long)
    lengths, prompt = torch.tensor([2, 3, 4]), torch.tensor([2, 2, 2])
    done = torch.tensor([False, False, False])
    emitted = torch.tensor([[5, 6, 7, 8], [5, 9, 7, 8], [5, 6, 7, 8]])
    kept = commit_tokens(tokens, lengths, prompt, done, emitted, torch.tensor([4, 4, 2]), torch.tensor([9]), 5)
    # request 0: all 4 kept; 1: stops at the EOS (9); 2: 2 emitted, budget 5 − 2 = 3 allows both
    assert kept.tolist() == [4, 2, 2] and lengths.tolist() == [6, 5, 6]
    assert tokens[0, 2:6].tolist() == [5, 6, 7, 8] and tokens[1, 3:5].tolist() == [5, 9]
    assert tokens[1, 5:].tolist() == [0] * 7  # nothing past the kept tokens is written
    assert done.tolist() == [False, True, False]
    kept = commit_tokens(tokens, lengths, prompt, done, emitted, torch.tensor([0, 0, 4]), torch.tensor([9]), 5)
    assert kept.tolist() == [0, 0, 1] and done.tolist() == [False, True, True]  # request 2 reached its budget
    # a budget per request (generated so far: 4, 3, 5): one more token each for requests 0 and 1,
    # which are then done; request 2 takes all four and has one left
    done[:] = False
    kept = commit_tokens(tokens, lengths, prompt, done, emitted, torch.tensor([4, 4, 4]), torch.tensor([9]),
                         torch.tensor([5, 4, 10]))
    assert kept.tolist() == [1, 1, 4] and done.tolist() == [True, True, False]
    # stop ids per request ([B, E], padded with -1): 9 stops request 1 only, 7 request 2 only
    tokens.zero_()
    lengths[:], done[:] = torch.tensor([2, 3, 4]), False
    kept = commit_tokens(tokens, lengths, prompt, done, emitted, torch.tensor([4, 4, 4]),
                         torch.tensor([[-1, -1], [9, -1], [7, 3]]), 10)
    assert kept.tolist() == [4, 2, 3] and done.tolist() == [False, True, True]


def sequential_gather(buffer, lengths, src_offsets, num):
    out = buffer.clone()
    for b in range(buffer.shape[1]):
        for i in range(int(num[b])):
            out[:, b, :, :, lengths[b] + i] = out[:, b, :, :, lengths[b] + src_offsets[b, i]]
    return out


@given(seed=st.integers(0, 2 ** 16), batch=st.integers(1, 4), width=st.integers(1, 6), heads=st.integers(1, 3),
       head_dim=st.sampled_from([1, 4, 6]))
def test_gather_accepted_kv_kernel_equals_twin_and_loop(seed, batch, width, heads, head_dim):
    g = torch.Generator().manual_seed(seed)
    seq = 4 + 2 * width
    buffer = torch.randn(2, batch, 2, heads, seq, head_dim, generator=g)
    lengths = torch.randint(0, seq - 2 * width + 1, (batch,), generator=g)
    # accepted offsets: a sorted subset of the 2·width candidates (a path through a tree), so
    # strictly increasing with offset i ≥ i
    src_offsets = torch.stack([torch.randperm(2 * width, generator=g)[:width].sort().values for _ in range(batch)])
    num = torch.randint(0, width + 1, (batch,), generator=g)
    expected = sequential_gather(buffer, lengths, src_offsets, num)
    twin, kernel = buffer.clone(), buffer.clone()
    reference.gather_accepted_kv(twin, lengths, src_offsets, num)
    triton_commit.gather_accepted_kv(kernel, lengths, src_offsets, num)
    assert torch.equal(twin, expected) and torch.equal(kernel, expected)


def test_gather_of_a_chain_is_the_identity(kernel_backend):
    buffer = torch.randn(1, 2, 2, 1, 8, 4)
    before = buffer.clone()
    gather_accepted_kv(buffer, torch.tensor([1, 3]), torch.arange(3).expand(2, 3).contiguous(), torch.tensor([3, 2]))
    assert torch.equal(buffer, before)
