"""Plain-torch twins of the Triton kernels: the same signatures, the same results, any device.

They are what the CPU runs, and the definition the kernels are tested against. The verification
rule and its vocabulary (accepted / recovered / bonus token) are those of :mod:`dspark.records`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dspark.samplers.base import sample_from


def acceptance_probability(p_draft: torch.Tensor, q_draft: torch.Tensor | None) -> torch.Tensor:
    """``min(1, p(x) / q(x))`` from ``p(x)``, ``q(x)`` ``[B, γ]`` (``q=None``: deterministic draft, q(x)=1).

    ``q(x) = 0`` cannot happen for a sampled draft; it is treated as "accept iff ``p(x) > 0``".
    """
    if q_draft is None:
        return p_draft.clamp(max=1.0)
    ratio = p_draft / q_draft.clamp_min(torch.finfo(q_draft.dtype).tiny)
    return torch.where(p_draft > 0, ratio.clamp(max=1.0), torch.zeros_like(ratio))


def accepts(p_draft: torch.Tensor, q_draft: torch.Tensor | None, uniforms: torch.Tensor) -> torch.Tensor:
    """The acceptance test ``u < min(1, p(x)/q(x))``, evaluated as ``p ≥ q or u·q < p`` (no division,
    so a kernel computes the very same bits). ``[B, γ]`` each; ``q=None`` means ``q(x) = 1``."""
    if q_draft is None:
        return uniforms < p_draft
    return (p_draft >= q_draft) & (p_draft > 0) | (uniforms * q_draft < p_draft)


def residual_distribution(p: torch.Tensor, q: torch.Tensor | None, draft: torch.Tensor) -> torch.Tensor:
    """Unnormalised ``max(0, p − q)`` ``[B, V]`` at one position; ``q=None`` means one-hot at ``draft`` ``[B]``.

    When ``p == q`` exactly the residual is empty; rejection then has probability 0, and ``p`` is
    returned so that sampling stays well-defined.
    """
    if q is None:
        residual = p.scatter(-1, draft.unsqueeze(-1), 0.0)
    else:
        residual = (p - q).clamp_min(0.0)
    empty = residual.sum(-1, keepdim=True) <= 0
    return torch.where(empty, p, residual)


def leading_true(accepted: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
    """``[B, γ]`` bool, ``[B]`` → ``[B]`` length of the all-true prefix within the first ``num_tokens``
    (the whole row's all-true prefix, capped at ``num_tokens``)."""
    return torch.minimum(accepted.cumprod(1, dtype=torch.long).sum(1), num_tokens)


def verify_chain(target_probs: torch.Tensor, draft_tokens: torch.Tensor, draft_probs: torch.Tensor | None,
                 num_drafts: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Chain rejection sampling for a ragged batch, from given random numbers.

    Args:
        target_probs: ``[B, γ+1, V]`` the target's processed distributions ``p_1..p_{γ+1}``.
        draft_tokens: ``[B, γ]`` int64 drafts ``x_1..x_γ``.
        draft_probs: ``[B, γ, V]`` draft distributions ``q``, or ``None`` for deterministic drafts.
        num_drafts: ``[B]`` int64 drafts ``ℓ_b ≤ γ`` to verify per request.
        uniforms: ``[B, γ+1]`` draws in ``[0, 1)``: ``[:, k]`` tests draft ``k``, ``[:, γ]`` samples the
            recovered or bonus token (inverse CDF, as :func:`~dspark.samplers.sample_from`).

    Returns:
        ``num_accepted`` ``[B]`` int64 and ``tokens`` ``[B, γ+1]`` int64: the drafts with the
        recovered or bonus token written at column ``num_accepted[b]`` (and 0 in column γ otherwise).
    """
    # At batch 1 each torch call costs more than its arithmetic (a few µs, more in a round, whose
    # forward has just evicted the caches): the twin keeps to few calls, e.g. no ``.to`` that would
    # not convert and no slice where gather can take the index's rows.
    gamma = draft_tokens.shape[1]
    p = target_probs
    u = uniforms if uniforms.dtype == p.dtype else uniforms.to(p.dtype)
    q = draft_probs if draft_probs is None or draft_probs.dtype == p.dtype else draft_probs.to(p.dtype)
    index = draft_tokens.unsqueeze(-1)  # [B, γ, 1]
    p_draft = p.gather(-1, index).squeeze(-1)  # [B, γ]: p_1..p_γ at x_1..x_γ
    q_draft = None if q is None else q.gather(-1, index).squeeze(-1)
    num_accepted = leading_true(accepts(p_draft, q_draft, u[:, :gamma]), num_drafts)  # [B]

    # the token after the accepted prefix: recovered (a draft was rejected) or bonus
    at = num_accepted.view(-1, 1, 1)
    p_next = p.gather(1, at.expand(-1, 1, p.shape[-1])).squeeze(1)  # [B, V]
    if gamma > 0:
        at_draft = at.clamp(max=gamma - 1)
        draft_next = draft_tokens.gather(1, at_draft.view(-1, 1)).squeeze(1)
        q_next = None if q is None else q.gather(1, at_draft.expand(-1, 1, q.shape[-1])).squeeze(1)
        residual = residual_distribution(p_next, q_next, draft_next)
        p_next = torch.where((num_accepted < num_drafts).unsqueeze(-1), residual, p_next)
    next_token = sample_from(p_next, u[:, gamma])  # [B]

    tokens = F.pad(draft_tokens, (0, 1))  # [B, γ+1], column γ zero
    return num_accepted, tokens.scatter_(1, num_accepted.unsqueeze(1), next_token.unsqueeze(1))


def verify_greedy(target_logits: torch.Tensor, draft_tokens: torch.Tensor,
                  num_drafts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy verification: accept drafts while they equal the target's argmax.

    Args:
        target_logits: ``[B, γ+1, V]``; draft_tokens: ``[B, γ]`` int64; num_drafts: ``[B]`` int64.

    Returns:
        ``num_accepted`` ``[B]`` and the target's argmax ``[B, γ+1]`` (first index on ties), which is
        both the accepted drafts and, at column ``num_accepted[b]``, the next token.
    """
    # max(-1).indices is argmax with the same first-index-on-ties rule, about twice as fast on CPU
    target_tokens = target_logits.max(-1).indices
    return leading_true(draft_tokens == target_tokens[:, :draft_tokens.shape[1]], num_drafts), target_tokens


def commit_tokens(tokens: torch.Tensor, lengths: torch.Tensor, prompt_lengths: torch.Tensor, done: torch.Tensor,
                  emitted: torch.Tensor, num_emitted: torch.Tensor, eos: torch.Tensor,
                  max_new_tokens: torch.Tensor) -> torch.Tensor:
    """Append each request's emitted tokens, stopping at EOS or its token budget, in place.

    Args:
        tokens: ``[B, W]`` int64 token buffer (prompt + generated); written at ``lengths[b] + k``.
        lengths: ``[B]`` int64 committed tokens; advanced by what is kept.
        prompt_lengths: ``[B]`` int64.
        done: ``[B]`` bool; set for requests that hit EOS or the budget.
        emitted: ``[B, K]`` int64, of which the first ``num_emitted[b]`` are real.
        eos: ``[B, E]`` int64 stop ids of each request, padded with −1 (``E`` may be 0).
        max_new_tokens: ``[B]`` int64, each request's generation budget.

    Returns:
        ``[B]`` int64 tokens kept (fewer than emitted after an EOS or when the budget runs out).
        Only kept tokens are written; the buffer past ``lengths`` is left as it was.
    """
    offsets = torch.arange(emitted.shape[1], device=emitted.device)
    budget = max_new_tokens - lengths + prompt_lengths  # [B] tokens each request may still take
    num = torch.minimum(num_emitted, budget)
    if eos.numel():
        is_eos = (emitted.unsqueeze(-1) == eos.unsqueeze(1)).any(-1) & (offsets < num.unsqueeze(1))
        hit_eos = is_eos.any(1)
        num = torch.where(hit_eos, is_eos.int().argmax(1) + 1, num)
        done |= hit_eos
    where = (lengths.unsqueeze(1) + offsets).clamp(max=tokens.shape[1] - 1)
    kept = offsets < num.unsqueeze(1)
    tokens.scatter_(1, where, torch.where(kept, emitted, tokens.gather(1, where)))
    lengths += num
    done |= num >= budget
    return num


def gather_accepted_kv(buffer: torch.Tensor, lengths: torch.Tensor, src_offsets: torch.Tensor,
                       num: torch.Tensor) -> None:
    """Move the KV entries of the accepted path next to the committed prefix, in place.

    After a tree verification forward, request ``b``'s candidate tokens sit at cache positions
    ``lengths[b] + t``; the accepted ones at offsets ``src_offsets[b, i]`` (``i < num[b]``) move to
    ``lengths[b] + i`` so the cache holds one contiguous sequence again (a chain is the identity).

    Args:
        buffer: ``[layers, B, 2, H_kv, S, D]`` a static cache's buffer.
        lengths: ``[B]`` int64 committed positions before the verified tokens.
        src_offsets: ``[B, N]`` int64, strictly increasing in ``i`` with ``src_offsets[b, i] ≥ i``
            (entries past ``num[b]`` are ignored); ``lengths[b] + N ≤ S``.
        num: ``[B]`` int64 accepted entries per request.
    """
    width = src_offsets.shape[1]
    offsets = torch.arange(width, device=buffer.device)
    rows = torch.arange(buffer.shape[1], device=buffer.device).unsqueeze(1)  # [B, 1]
    dst = lengths.unsqueeze(1) + offsets  # [B, N]; all distinct per request
    src = torch.where(offsets < num.unsqueeze(1), lengths.unsqueeze(1) + src_offsets, dst)
    # advanced indices on dims 1 and 4 (separated by slices) come first: [B, N, layers, 2, H_kv, D]
    buffer[:, rows, :, :, dst] = buffer[:, rows, :, :, src]
