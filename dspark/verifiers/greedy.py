"""Greedy verification: accept drafts while they equal the target's argmax."""

from __future__ import annotations

import torch

from dspark import kernels
from dspark.kernels import leading_true
from dspark.records import DraftProposal, VerificationResult
from dspark.verifiers.base import Verifier, register_verifier

__all__ = ["GreedyVerifier", "greedy_verify", "leading_true"]


def greedy_verify(target_logits: torch.Tensor, proposal: DraftProposal) -> VerificationResult:
    """The target's argmax ``[B, γ+1]`` (first index on ties) is both the accepted drafts (where
    equal) and the next token; :func:`~dspark.kernels.verify_greedy` on CUDA or its twin."""
    num_accepted, target_tokens = kernels.verify_greedy(target_logits, proposal.tokens, proposal.num_tokens)
    return VerificationResult(num_accepted=num_accepted, tokens=target_tokens)


@register_verifier("greedy")
class GreedyVerifier(Verifier):
    """Deterministic: accept ``x_k`` iff it is the target's argmax; the next token is the argmax.

    Exact for greedy decoding only; with ``temperature > 0`` use ``chain``.
    """

    def num_uniforms(self, gamma, params) -> int:
        return 0

    def verify(self, target_logits, proposal, *, sampler, params, uniforms) -> VerificationResult:
        if not params.greedy:
            raise ValueError("the greedy verifier only supports temperature 0; use verifier.name=chain for sampling")
        return greedy_verify(target_logits, proposal)
