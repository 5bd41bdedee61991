"""The sampler interface: the one place where logits become the distribution tokens are drawn from."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from dspark.records import MixedSamplingParams, SamplingParams
from dspark.registry import Registry


@dataclass
class SamplerConfig:
    """Config section ``sampler``: ``name`` of a registered sampler (``default``), or ``_target_``,
    the dotted path of a user's :class:`Sampler` subclass (wins over ``name``)."""

    name: str = "default"
    _target_: str | None = None


def sample_from(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: the token ``i`` with ``cdf[i-1] ≤ u·total < cdf[i]``.

    Args:
        probs: ``[..., V]`` non-negative weights (need not sum to 1; each row must have mass).
        uniforms: ``[...]`` draws in ``[0, 1)``, one per row.

    Returns:
        ``[...]`` int64 tokens. A token of zero weight is never returned.
    """
    cdf = probs.cumsum(-1)
    total = cdf[..., -1:].contiguous()
    if uniforms.dtype != cdf.dtype:
        uniforms = uniforms.to(cdf.dtype)
    token = torch.searchsorted(cdf, uniforms.unsqueeze(-1) * total, right=True)
    # u·total may round up to total: clamp to the last token that has weight
    last = torch.searchsorted(cdf, total, right=False)
    return torch.minimum(token, last).squeeze(-1)


class Sampler(ABC):
    """Turns logits into processed probabilities (temperature, top-k, top-p, min-p) and samples.

    The drafter and the verifier both call the same sampler, so the draft distribution ``q`` and
    the target distribution ``p`` see identical processing: that is what makes speculative
    sampling equal to sampling from the target alone with the same settings.
    """

    config_class = SamplerConfig

    def __init__(self, config: SamplerConfig | None = None):
        self.config = config or SamplerConfig()

    @abstractmethod
    def probs(self, logits: torch.Tensor, params: SamplingParams | MixedSamplingParams) -> torch.Tensor:
        """``[B, ..., V]`` logits → ``[B, ..., V]`` processed probabilities (float32, float64 if the logits are).

        With ``params.greedy`` the result is one-hot at the argmax. ``params`` may differ between
        the requests (:class:`~dspark.records.MixedSamplingParams`: a setting is then a ``[B]``
        tensor, :func:`~dspark.records.per_row` broadcasts it; the rows of ``greedy_rows`` must
        come out one-hot at their argmax).
        """

    def greedy(self, logits: torch.Tensor) -> torch.Tensor:
        """``[..., V]`` → ``[...]`` argmax tokens (the first on ties, like ``transformers``)."""
        return logits.argmax(-1)

    def sample(self, probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        """Draw one token per row of ``probs`` ``[..., V]`` with ``uniforms`` ``[...]`` in ``[0, 1)``."""
        return sample_from(probs, uniforms)

    def draw(self, logits: torch.Tensor, params: SamplingParams,
             uniforms: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A drafter's token per row of ``logits`` ``[..., V]``: the argmax when greedy (``q`` is then
        one-hot and returned as ``None``; ``uniforms`` is not read), else a draw with ``uniforms``
        ``[...]`` from ``q`` = :meth:`probs`. Returns ``(tokens [...], q [..., V] or None)``."""
        if params.greedy:
            return self.greedy(logits), None
        q = self.probs(logits, params)
        return self.sample(q, uniforms), q


SAMPLERS: Registry = Registry("sampler", Sampler)
register_sampler = SAMPLERS.register
