"""Chain speculative sampling (Leviathan et al. 2023; Chen et al. 2023).

For drafts ``x_1..x_ℓ`` sampled from ``q_1..q_ℓ`` and the target's ``p_1..p_{ℓ+1}``:
accept ``x_k`` with probability ``min(1, p_k(x_k) / q_k(x_k))``; at the first rejection emit a
recovered token from ``norm(max(0, p_k − q_k))``; if all are accepted emit a bonus token from
``p_{ℓ+1}``. Each emitted token is then distributed exactly as ``p`` — the output equals sampling
from the target alone. A deterministic draft (``q`` one-hot) is handled without building one-hots:
``q_k(x_k) = 1`` and the residual is ``p_k`` with ``x_k`` zeroed.
"""

from __future__ import annotations

import torch

from dspark.records import DraftProposal, SamplingParams, VerificationResult
from dspark.samplers import Sampler
from dspark.verifiers.base import Verifier, register_verifier
from dspark.verifiers.greedy import greedy_verify, leading_true


def acceptance_probability(p_draft: torch.Tensor, q_draft: torch.Tensor | None) -> torch.Tensor:
    """``min(1, p(x) / q(x))`` from ``p(x)``, ``q(x)`` ``[B, γ]`` (``q=None``: deterministic draft, q(x)=1).

    ``q(x) = 0`` cannot happen for a sampled draft; it is treated as "accept iff ``p(x) > 0``".
    """
    if q_draft is None:
        return p_draft.clamp(max=1.0)
    ratio = p_draft / q_draft.clamp_min(torch.finfo(q_draft.dtype).tiny)
    return torch.where(p_draft > 0, ratio.clamp(max=1.0), torch.zeros_like(ratio))


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


@register_verifier("chain")
class ChainVerifier(Verifier):
    """Rejection-sampling verification of a chain of drafts; greedy when temperature is 0."""

    def verify(self, target_logits, proposal: DraftProposal, *, sampler: Sampler, params: SamplingParams,
               uniforms: torch.Tensor) -> VerificationResult:
        if params.greedy:
            return greedy_verify(target_logits, proposal, sampler)
        gamma = proposal.gamma
        p = sampler.probs(target_logits, params)  # [B, γ+1, V]
        drafts = proposal.tokens  # [B, γ]
        q = proposal.probs  # [B, γ, V] or None
        p_draft = p[:, :gamma].gather(-1, drafts.unsqueeze(-1)).squeeze(-1)  # [B, γ]
        q_draft = None if q is None else q.gather(-1, drafts.unsqueeze(-1)).squeeze(-1).to(p.dtype)
        accept = uniforms[:, :gamma].to(p.dtype) < acceptance_probability(p_draft, q_draft)
        num_accepted = leading_true(accept, proposal.num_tokens)  # [B]

        # the token after the accepted prefix: recovered (a draft was rejected) or bonus
        at = num_accepted.view(-1, 1, 1)
        p_next = p.gather(1, at.expand(-1, 1, p.shape[-1])).squeeze(1)  # [B, V]
        rejected = num_accepted < proposal.num_tokens
        if gamma > 0:
            at_draft = at.clamp(max=gamma - 1)
            draft_next = drafts.gather(1, at_draft.view(-1, 1)).squeeze(1)
            q_next = None if q is None else q.gather(1, at_draft.expand(-1, 1, q.shape[-1])).squeeze(1).to(p.dtype)
            residual = residual_distribution(p_next, q_next, draft_next)
            p_next = torch.where(rejected.unsqueeze(-1), residual, p_next)
        next_token = sampler.sample(p_next, uniforms[:, gamma])  # [B]

        tokens = torch.cat([drafts, drafts.new_zeros(drafts.shape[0], 1)], 1)
        tokens.scatter_(1, num_accepted.unsqueeze(1), next_token.unsqueeze(1))
        return VerificationResult(num_accepted=num_accepted, tokens=tokens)
