"""No drafter: plain autoregressive decoding through the same engine (the baseline)."""

from __future__ import annotations

import torch

from dspark.drafters.base import Drafter, register_drafter
from dspark.records import DecodingState, DraftProposal


@register_drafter("none")
class NoDrafter(Drafter):
    """Proposes nothing (γ = 0): every round is one target forward and one sampled token."""

    min_gamma = 0

    def __init__(self, config, *, target, sampler, draft_model=None):
        if config.num_speculative_tokens != 0:
            raise ValueError(f"drafter 'none' proposes no tokens; num_speculative_tokens must be 0, "
                             f"got {config.num_speculative_tokens}")
        super().__init__(config, target=target, sampler=sampler, draft_model=draft_model)

    def start(self, state, target_output, max_len) -> None:
        batch = state.batch_size
        self._empty = DraftProposal(tokens=state.tokens.new_zeros(batch, 0), num_tokens=state.tokens.new_zeros(batch))

    def admit(self, rows, state, target_output) -> None:
        """Nothing per request to reset."""

    def use_rows(self, rows, state) -> None:
        self._empty = DraftProposal(tokens=state.tokens.new_zeros(rows, 0), num_tokens=state.tokens.new_zeros(rows))

    def propose(self, state: DecodingState, uniforms: torch.Tensor) -> DraftProposal:
        return self._empty
