"""Triton kernels for verification: fused chain rejection sampling, and greedy verification.

Twins with the same signatures live in :mod:`dspark.kernels.reference`; pick between them only
through :mod:`dspark.kernels` (its dispatch point). One program per request walks the γ
acceptance tests, then samples the recovered or bonus token in two passes over the vocabulary
(the residual's mass, then the inverse CDF), so no ``[B, V]`` intermediate is ever written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: vocabulary tile of one loop step (a module setting so tests can force several tiles on tiny vocabularies)
BLOCK_V = 1024


def _block(n: int, scale: int = 1) -> int:
    return min(BLOCK_V * scale, triton.next_power_of_2(max(n, 1)))


@triton.jit
def _target_and_residual(p_row, q_row, offs, m, x_next, HAS_Q: tl.constexpr, GAMMA: tl.constexpr):
    """One vocabulary tile of ``p`` and of the residual ``max(0, p − q)`` (``p`` with the draft
    zeroed for a deterministic draft)."""
    pv = tl.load(p_row + offs, mask=m, other=0.0)
    if HAS_Q:
        qv = tl.load(q_row + offs, mask=m & (GAMMA > 0), other=0.0)
        r = tl.maximum(pv - qv, 0.0)
    else:
        r = tl.where(offs == x_next, 0.0, pv)
    return pv, r


@triton.jit
def _verify_chain_kernel(p_ptr, q_ptr, draft_ptr, num_ptr, u_ptr, out_tokens_ptr, out_num_ptr,
                         vocab, tiny,
                         GAMMA: tl.constexpr, HAS_Q: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    n_drafts = tl.load(num_ptr + b)
    g = tl.arange(0, BLOCK_G)
    in_gamma = g < GAMMA
    p_row0 = p_ptr + b * (GAMMA + 1) * vocab
    drafts = tl.load(draft_ptr + b * GAMMA + g, mask=in_gamma, other=0)
    p_x = tl.load(p_row0 + g * vocab + drafts, mask=in_gamma, other=0.0)
    u = tl.load(u_ptr + b * (GAMMA + 1) + g, mask=g < GAMMA + 1, other=0.0)
    if HAS_Q:
        q_x = tl.load(q_ptr + b * GAMMA * vocab + g * vocab + drafts, mask=in_gamma, other=1.0)
        accept = ((p_x >= q_x) & (p_x > 0)) | (u * q_x < p_x)
    else:
        accept = u < p_x
    accept = accept & in_gamma & (g < n_drafts)
    # accepted drafts = index of the first position that is not accepted (γ if all are)
    num_acc = tl.min(tl.where(accept | (g >= GAMMA), GAMMA, g), 0).to(tl.int64)
    rejected = num_acc < n_drafts
    u_last = tl.sum(tl.where(g == GAMMA, u, 0.0), 0)

    p_row = p_row0 + num_acc * vocab
    at_draft = tl.minimum(num_acc, GAMMA - 1)
    x_next = tl.sum(tl.where(g == at_draft, drafts, 0), 0)
    q_row = q_ptr + b * GAMMA * vocab + at_draft * vocab
    # pass 1: mass of p and of the residual max(0, p − q) (p with x zeroed for a deterministic draft)
    sum_p = tl.sum(tl.zeros([BLOCK], dtype=p_x.dtype), 0)
    sum_r = sum_p
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < vocab
        pv, r = _target_and_residual(p_row, q_row, offs, m, x_next, HAS_Q, GAMMA)
        sum_p += tl.sum(pv, 0)
        sum_r += tl.sum(r, 0)
    use_residual = rejected & (sum_r > 0)
    threshold = u_last * tl.where(use_residual, sum_r, sum_p)
    # pass 2: the first token whose cumulative weight exceeds u·total (else the last with weight)
    running = sum_p * 0
    token = (num_acc * 0 - 1).to(tl.int64)
    last = (num_acc * 0).to(tl.int64)
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < vocab
        pv, r = _target_and_residual(p_row, q_row, offs, m, x_next, HAS_Q, GAMMA)
        w = tl.where(use_residual, r, pv)
        cdf = running + tl.cumsum(w, 0)
        first = tl.min(tl.where((cdf > threshold) & m, offs, vocab), 0).to(tl.int64)
        token = tl.where((token < 0) & (first < vocab), first, token)
        last = tl.maximum(last, tl.max(tl.where((w > 0) & m, offs, 0), 0).to(tl.int64))
        running += tl.sum(w, 0)
    token = tl.where(token < 0, last, token)

    row = tl.where(g == num_acc, token, tl.where(in_gamma, drafts, 0))
    tl.store(out_tokens_ptr + b * (GAMMA + 1) + g, row, mask=g < GAMMA + 1)
    tl.store(out_num_ptr + b, num_acc)


def verify_chain(target_probs: torch.Tensor, draft_tokens: torch.Tensor, draft_probs: torch.Tensor | None,
                 num_drafts: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`dspark.kernels.reference.verify_chain` (same arguments and results)."""
    batch, width, vocab = target_probs.shape
    gamma = width - 1
    p = target_probs.contiguous()
    q = None if draft_probs is None else draft_probs.to(p.dtype).contiguous()
    drafts = draft_tokens.contiguous()
    u = uniforms[:, : gamma + 1].to(p.dtype).contiguous()
    num_accepted = torch.empty(batch, dtype=torch.long, device=p.device)
    tokens = torch.empty(batch, gamma + 1, dtype=torch.long, device=p.device)
    if batch:
        _verify_chain_kernel[(batch,)](
            p, q if q is not None else p, drafts, num_drafts.contiguous(), u, tokens, num_accepted,
            vocab, torch.finfo(p.dtype).tiny,
            GAMMA=gamma, HAS_Q=q is not None, BLOCK_G=triton.next_power_of_2(gamma + 1), BLOCK=_block(vocab))
    return num_accepted, tokens


@triton.jit
def _argmax_rows_kernel(x_ptr, out_ptr, vocab, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * vocab
    offs = tl.arange(0, BLOCK)
    v = tl.load(x_row + offs, mask=offs < vocab, other=float("-inf"))
    best = tl.max(v, 0)
    best_index = tl.min(tl.where(v == best, offs, vocab), 0).to(tl.int64)
    for start in range(BLOCK, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        v = tl.load(x_row + offs, mask=offs < vocab, other=float("-inf"))
        block_max = tl.max(v, 0)
        block_index = tl.min(tl.where(v == block_max, offs, vocab), 0).to(tl.int64)
        better = block_max > best  # strict: the first maximum wins, as in torch.argmax
        best_index = tl.where(better, block_index, best_index)
        best = tl.maximum(best, block_max)
    tl.store(out_ptr + row, best_index)


@triton.jit
def _leading_matches_kernel(draft_ptr, target_ptr, num_ptr, out_num_ptr, GAMMA: tl.constexpr, BLOCK_G: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, BLOCK_G)
    in_gamma = g < GAMMA
    drafts = tl.load(draft_ptr + b * GAMMA + g, mask=in_gamma, other=-1)
    target = tl.load(target_ptr + b * (GAMMA + 1) + g, mask=in_gamma, other=-2)
    accept = (drafts == target) & in_gamma & (g < tl.load(num_ptr + b))
    tl.store(out_num_ptr + b, tl.min(tl.where(accept | (g >= GAMMA), GAMMA, g), 0).to(tl.int64))


def verify_greedy(target_logits: torch.Tensor, draft_tokens: torch.Tensor,
                  num_drafts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`dspark.kernels.reference.verify_greedy` (same arguments and results)."""
    batch, width, vocab = target_logits.shape
    logits = target_logits.contiguous()
    target_tokens = torch.empty(batch, width, dtype=torch.long, device=logits.device)
    num_accepted = torch.empty(batch, dtype=torch.long, device=logits.device)
    if batch:
        _argmax_rows_kernel[(batch * width,)](logits, target_tokens, vocab, BLOCK=_block(vocab, 4))
        _leading_matches_kernel[(batch,)](draft_tokens.contiguous(), target_tokens, num_drafts.contiguous(),
                                          num_accepted, GAMMA=width - 1, BLOCK_G=triton.next_power_of_2(width))
    return num_accepted, target_tokens
