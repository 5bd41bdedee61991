"""Prompt lookup: propose the tokens that followed the last occurrence of the current suffix."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dspark.drafters.base import Drafter, DrafterConfig, register_drafter
from dspark.records import DecodingState, DraftProposal


@dataclass
class NgramConfig(DrafterConfig):
    """Config of the ``ngram`` drafter.

    Attributes:
        num_speculative_tokens: γ, tokens proposed after a match.
        min_n, max_n: n-gram sizes tried, longest first.
        periodic: when fewer than γ tokens follow the match (it ends within the last γ tokens), go on
            as if the text repeats with that period (``a b c a b`` → ``c a b c``…), proposing γ
            tokens; otherwise only the tokens that follow it.
    """

    name: str = "ngram"
    num_speculative_tokens: int = 4
    min_n: int = 1
    max_n: int = 3
    periodic: bool = False


@register_drafter("ngram")
class NgramDrafter(Drafter):
    """Prompt-lookup decoding over each request's own context (prompt + generated tokens).

    For the longest ``n`` in ``[min_n, max_n]`` whose last ``n`` tokens occurred earlier in the
    context, propose the (up to γ) tokens that followed the most recent earlier occurrence.
    Deterministic (``q`` is one-hot). Vectorised over the batch on the device: for growing ``n``
    the match mask at every window end is refined by one shifted comparison, ``[B, W]`` bool
    each, reading the token buffer in place.
    """

    config_class = NgramConfig
    skippable = True  # stateless: it reads the token buffer each round
    replaceable_drafts = True

    def __init__(self, config: NgramConfig, *, target, sampler, draft_model=None):
        super().__init__(config, target=target, sampler=sampler, draft_model=draft_model)
        if not 1 <= config.min_n <= config.max_n:
            raise ValueError(f"ngram drafter needs 1 <= min_n <= max_n, got min_n={config.min_n}, max_n={config.max_n}")

    def admit(self, rows, state, target_output) -> None:
        """Nothing per request to reset: the token buffer is all it reads."""

    def use_rows(self, rows, state) -> None:
        """Nothing per request to narrow: each round's state is all it reads."""

    def propose(self, state: DecodingState, uniforms: torch.Tensor) -> DraftProposal:
        tokens, lengths = state.tokens, state.lengths  # [B, W], [B]
        batch, width = tokens.shape
        device = tokens.device
        ends = torch.arange(width, device=device)  # candidate window ends e (last token of an earlier n-gram)
        # an earlier occurrence must end before the suffix's own last token, with a successor in context
        usable = ends.unsqueeze(0) < (lengths - 1).unsqueeze(1)  # [B, W]

        best_end = torch.full((batch,), -1, dtype=torch.long, device=device)
        match = usable
        for n in range(1, min(self.config.max_n, width) + 1):  # (no n-gram longer than the buffer matches)
            # suffix token n from the end, compared with the token n-1 before each window end
            suffix_token = tokens.gather(1, (lengths - n).clamp(min=0).unsqueeze(1))  # [B, 1]
            # same[:, e] = (tokens[:, e - (n-1)] == suffix_token), False where e < n-1
            same = F.pad(tokens[:, : width - n + 1] == suffix_token, (n - 1, 0), value=False)
            match = match & same & (lengths >= n + 1).unsqueeze(1)
            if n >= self.config.min_n:
                # most recent matching end for this n; longer n overrides shorter
                latest = torch.where(match, ends, -1).amax(1)
                best_end = torch.where(latest >= 0, latest, best_end)

        found = best_end >= 0
        start = best_end + 1  # first proposed token
        offsets = torch.arange(self.gamma, device=device)
        if self.config.periodic:  # the text from the match on repeats with period lengths − start
            period = (lengths - start).clamp(min=1).unsqueeze(1)
            positions = (start.unsqueeze(1) + offsets % period).clamp(max=width - 1)
            num_tokens = torch.where(found, self.gamma, 0)
        else:
            positions = (start.unsqueeze(1) + offsets).clamp(max=width - 1)
            num_tokens = torch.where(found, torch.clamp(lengths - start, max=self.gamma), 0)
        drafts = tokens.gather(1, positions)
        return DraftProposal(tokens=drafts, num_tokens=num_tokens)
