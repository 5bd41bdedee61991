"""Greedy verification: accept drafts while they equal the target's argmax."""

from __future__ import annotations

import torch

from dspark.records import DraftProposal, SamplingParams, VerificationResult
from dspark.samplers import Sampler
from dspark.verifiers.base import Verifier, register_verifier


def leading_true(accepted: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
    """``[B, γ]`` bool, ``[B]`` → ``[B]`` length of the all-true prefix within the first ``num_tokens``."""
    in_range = torch.arange(accepted.shape[1], device=accepted.device) < num_tokens.unsqueeze(1)
    return (accepted & in_range).long().cumprod(1).sum(1)


def greedy_verify(target_logits: torch.Tensor, proposal: DraftProposal, sampler: Sampler) -> VerificationResult:
    """The target's argmax ``[B, γ+1]`` is both the accepted drafts (where equal) and the next token."""
    target_tokens = sampler.greedy(target_logits)  # [B, γ+1]
    num_accepted = leading_true(proposal.tokens == target_tokens[:, :-1], proposal.num_tokens)
    return VerificationResult(num_accepted=num_accepted, tokens=target_tokens)


@register_verifier("greedy")
class GreedyVerifier(Verifier):
    """Deterministic: accept ``x_k`` iff it is the target's argmax; the next token is the argmax.

    Exact for greedy decoding only; with ``temperature > 0`` use ``chain``.
    """

    def num_uniforms(self, gamma: int, params: SamplingParams) -> int:
        return 0

    def verify(self, target_logits, proposal, *, sampler, params, uniforms) -> VerificationResult:
        if not params.greedy:
            raise ValueError("the greedy verifier only supports temperature 0; use verifier.name=chain for sampling")
        return greedy_verify(target_logits, proposal, sampler)
