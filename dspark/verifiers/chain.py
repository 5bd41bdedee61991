"""Chain speculative sampling (Leviathan et al. 2023; Chen et al. 2023).

For drafts ``x_1..x_ℓ`` sampled from ``q_1..q_ℓ`` and the target's ``p_1..p_{ℓ+1}``:
accept ``x_k`` with probability ``min(1, p_k(x_k) / q_k(x_k))``; at the first rejection emit a
recovered token from ``norm(max(0, p_k − q_k))``; if all are accepted emit a bonus token from
``p_{ℓ+1}``. Each emitted token is then distributed exactly as ``p`` — the output equals sampling
from the target alone. A deterministic draft (``q`` one-hot) is handled without building one-hots:
``q_k(x_k) = 1`` and the residual is ``p_k`` with ``x_k`` zeroed.

The rule itself (:func:`~dspark.kernels.verify_chain`) is a fused kernel on CUDA and its torch twin
elsewhere; the recovered or bonus token is drawn by inverse CDF with the request's last uniform.
"""

from __future__ import annotations

from dspark import kernels
from dspark.kernels import acceptance_probability, residual_distribution
from dspark.records import DraftProposal, MixedSamplingParams, SamplingParams, VerificationResult
from dspark.samplers import Sampler
from dspark.verifiers.base import Verifier, register_verifier
from dspark.verifiers.greedy import greedy_verify

__all__ = ["ChainVerifier", "acceptance_probability", "residual_distribution"]


@register_verifier("chain")
class ChainVerifier(Verifier):
    """Rejection-sampling verification of a chain of drafts; greedy when temperature is 0."""

    def verify(self, target_logits, proposal: DraftProposal, *, sampler: Sampler, params: SamplingParams | MixedSamplingParams,
               uniforms) -> VerificationResult:
        if params.greedy:
            return greedy_verify(target_logits, proposal)
        p = sampler.probs(target_logits, params)  # [B, γ+1, V]
        num_accepted, tokens = kernels.verify_chain(p, proposal.tokens, proposal.probs, proposal.num_tokens,
                                                    uniforms)
        return VerificationResult(num_accepted=num_accepted, tokens=tokens)
