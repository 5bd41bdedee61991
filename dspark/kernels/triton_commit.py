"""Triton kernels that commit a round's results: appending the kept tokens of every request (with
EOS and budget stops) in one launch, and compacting the KV entries of an accepted path.

Twins with the same signatures live in :mod:`dspark.kernels.reference`; pick between them only
through :mod:`dspark.kernels` (its dispatch point).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _commit_tokens_kernel(tokens_ptr, lengths_ptr, prompt_ptr, done_ptr, emitted_ptr, num_ptr, eos_ptr, kept_ptr,
                          max_new_ptr, width, num_eos,
                          K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, HAS_EOS: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    length = tl.load(lengths_ptr + b)
    prompt = tl.load(prompt_ptr + b)
    max_new = tl.load(max_new_ptr + b)
    num = tl.minimum(tl.load(num_ptr + b), max_new - (length - prompt))
    k = tl.arange(0, BLOCK_K)
    emitted = tl.load(emitted_ptr + b * K + k, mask=k < K, other=0)
    hit_eos = num < 0  # False, shaped like a scalar
    if HAS_EOS:
        e = tl.arange(0, BLOCK_E)
        eos = tl.load(eos_ptr + b * num_eos + e, mask=e < num_eos, other=-1)  # this request's stop ids
        is_eos = tl.max((emitted[:, None] == eos[None, :]).to(tl.int32), 1) > 0
        is_eos = is_eos & (k < num)
        first_eos = tl.min(tl.where(is_eos, k, BLOCK_K), 0)
        hit_eos = first_eos < BLOCK_K
        num = tl.where(hit_eos, first_eos + 1, num)
    tl.store(tokens_ptr + b * width + length + k, emitted, mask=(k < num) & (k < K))
    new_length = length + num
    tl.store(lengths_ptr + b, new_length)
    done = (tl.load(done_ptr + b) != 0) | hit_eos | (new_length - prompt >= max_new)
    tl.store(done_ptr + b, done)
    tl.store(kept_ptr + b, num)


def commit_tokens(tokens: torch.Tensor, lengths: torch.Tensor, prompt_lengths: torch.Tensor, done: torch.Tensor,
                  emitted: torch.Tensor, num_emitted: torch.Tensor, eos: torch.Tensor,
                  max_new_tokens: torch.Tensor) -> torch.Tensor:
    """Triton twin of :func:`dspark.kernels.reference.commit_tokens` (same arguments and results)."""
    batch, width = tokens.shape
    if not (tokens.is_contiguous() and lengths.is_contiguous() and done.is_contiguous()):
        raise ValueError("commit_tokens writes in place: tokens, lengths and done must be contiguous")
    kept = torch.empty(batch, dtype=torch.long, device=tokens.device)
    num_eos = eos.shape[1]
    if batch:
        _commit_tokens_kernel[(batch,)](
            tokens, lengths, prompt_lengths.contiguous(), done, emitted.contiguous(), num_emitted.contiguous(),
            eos.contiguous() if num_eos else lengths, kept, max_new_tokens.contiguous(), width, num_eos,
            K=emitted.shape[1], BLOCK_K=triton.next_power_of_2(max(emitted.shape[1], 1)),
            BLOCK_E=triton.next_power_of_2(max(num_eos, 1)), HAS_EOS=num_eos > 0)
    return kept


@triton.jit
def _gather_accepted_kv_kernel(buffer_ptr, lengths_ptr, src_ptr, num_ptr, stride_layer, stride_batch, stride_kv,
                               stride_head, stride_pos, num_heads, head_dim,
                               N: tl.constexpr, BLOCK_D: tl.constexpr):
    plane = tl.program_id(0)  # one (layer, key-or-value, head) plane of one request
    b = tl.program_id(1).to(tl.int64)
    layer = plane // (2 * num_heads)
    kv = (plane // num_heads) % 2
    head = plane % num_heads
    base = (buffer_ptr + layer.to(tl.int64) * stride_layer + b * stride_batch + kv * stride_kv
            + head * stride_head)
    length = tl.load(lengths_ptr + b)
    num = tl.load(num_ptr + b)
    d = tl.arange(0, BLOCK_D)
    # in order: entry i reads offset src[i] ≥ i, which no earlier entry has overwritten
    for i in range(N):
        if i < num:
            src = tl.load(src_ptr + b * N + i)
            values = tl.load(base + (length + src) * stride_pos + d, mask=d < head_dim)
            tl.store(base + (length + i) * stride_pos + d, values, mask=d < head_dim)


def gather_accepted_kv(buffer: torch.Tensor, lengths: torch.Tensor, src_offsets: torch.Tensor,
                       num: torch.Tensor) -> None:
    """Triton twin of :func:`dspark.kernels.reference.gather_accepted_kv` (same arguments, in place)."""
    layers, batch, two, heads, _, head_dim = buffer.shape
    if buffer.stride(-1) != 1:
        raise ValueError("gather_accepted_kv needs the cache buffer's last (head) dimension contiguous")
    if batch and src_offsets.shape[1]:
        _gather_accepted_kv_kernel[(layers * two * heads, batch)](
            buffer, lengths.contiguous(), src_offsets.contiguous(), num.contiguous(), buffer.stride(0),
            buffer.stride(1), buffer.stride(2), buffer.stride(3), buffer.stride(4), heads, head_dim,
            N=src_offsets.shape[1], BLOCK_D=triton.next_power_of_2(head_dim))
