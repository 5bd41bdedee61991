"""The default sampler: temperature → top-k → top-p → softmax → min-p, in that order."""

from __future__ import annotations

import torch

from dspark.records import SamplingParams
from dspark.samplers.base import Sampler, register_sampler


@register_sampler("default")
class DefaultSampler(Sampler):
    """Temperature, then top-k (ties at the k-th logit kept), then top-p (the smallest set of most
    likely tokens whose mass reaches ``top_p``), softmax, then min-p (drop tokens below
    ``min_p × max prob``) and renormalise — the order ``transformers`` applies them."""

    def probs(self, logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        logits = logits if logits.dtype == torch.float64 else logits.float()
        if params.greedy:
            return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        logits = logits / params.temperature
        vocab = logits.shape[-1]
        if 0 < params.top_k < vocab:
            kth = logits.topk(params.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if params.top_p < 1.0:
            sorted_logits, order = logits.sort(-1, descending=True)
            sorted_probs = sorted_logits.softmax(-1)
            mass_before = sorted_probs.cumsum(-1) - sorted_probs
            drop_sorted = mass_before >= params.top_p  # never drops the first (mass_before == 0)
            logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
        probs = logits.softmax(-1)
        if params.min_p > 0.0:
            keep = probs >= params.min_p * probs.amax(-1, keepdim=True)
            probs = probs * keep
            probs = probs / probs.sum(-1, keepdim=True)
        return probs
