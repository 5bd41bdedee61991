"""The verifier interface: decide which drafts the target keeps, and the token that follows them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from dspark.records import DraftProposal, MixedSamplingParams, SamplingParams, VerificationResult
from dspark.registry import Registry
from dspark.samplers import Sampler


@dataclass
class VerifierConfig:
    """Config section ``verifier``: ``name`` of a registered verifier (``chain`` or ``greedy``), or
    ``_target_``, the dotted path of a user's :class:`Verifier` subclass (wins over ``name``)."""

    name: str = "chain"
    _target_: str | None = None


class Verifier(ABC):
    """Accepts the longest acceptable prefix of a proposal and emits one recovered or bonus token.

    The vocabulary (accepted / recovered / bonus token) is defined in :mod:`dspark.records`.
    """

    config_class = VerifierConfig

    def __init__(self, config: VerifierConfig | None = None):
        self.config = config or VerifierConfig()

    def num_uniforms(self, gamma: int, params: SamplingParams | MixedSamplingParams) -> int:
        """How many uniform draws per request one round consumes (0 for deterministic verification)."""
        return 0 if params.greedy else gamma + 1

    @abstractmethod
    def verify(self, target_logits: torch.Tensor, proposal: DraftProposal, *, sampler: Sampler,
               params: SamplingParams | MixedSamplingParams, uniforms: torch.Tensor) -> VerificationResult:
        """Verify a proposal against the target.

        Args:
            target_logits: ``[B, γ+1, V]`` target logits after the anchor and after each draft
                (position ``k`` scores the token that follows ``x_1..x_k``).
            proposal: the drafts; only the first ``proposal.num_tokens[b]`` of row ``b`` are verified.
            sampler: turns logits into the processed distribution ``p`` (the drafter used it for ``q``).
            params: the batch's sampling settings (one per request in a :class:`MixedSamplingParams`).
            uniforms: ``[B, num_uniforms(γ, params)]`` draws in ``[0, 1)`` from each request's generator.
        """


VERIFIERS: Registry = Registry("verifier", Verifier)
register_verifier = VERIFIERS.register
