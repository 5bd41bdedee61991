"""The default sampler: temperature → top-k → top-p → softmax → min-p, in that order."""

from __future__ import annotations

import torch

from dspark.records import MixedSamplingParams, SamplingParams, is_on, per_row
from dspark.samplers.base import Sampler, register_sampler


@register_sampler("default")
class DefaultSampler(Sampler):
    """Temperature, then top-k (ties at the k-th logit kept), then top-p (the smallest set of most
    likely tokens whose mass reaches ``top_p``), softmax, then min-p (drop tokens below
    ``min_p × max prob``) and renormalise — the order ``transformers`` applies them. Settings that
    differ between requests (:class:`~dspark.records.MixedSamplingParams`) apply row by row, each
    row exactly as it would alone."""

    def probs(self, logits: torch.Tensor, params: SamplingParams | MixedSamplingParams) -> torch.Tensor:
        logits = logits if logits.dtype == torch.float64 else logits.float()
        if params.greedy:
            return _one_hot_argmax(logits)
        raw, vocab = logits, logits.shape[-1]
        logits = logits / per_row(params.temperature, logits)
        if isinstance(params.top_k, torch.Tensor):  # a k per row: the k-th of the largest k_max
            k = per_row(params.top_k, logits)
            largest = min(params.top_k_max, vocab)
            kth = logits.topk(largest, dim=-1).values.gather(-1, (k.clamp(1, largest) - 1).expand(*logits.shape[:-1], 1))
            logits = logits.masked_fill((k > 0) & (k < vocab) & (logits < kth), float("-inf"))
        elif 0 < params.top_k < vocab:
            kth = logits.topk(params.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if is_on(params.top_p, 1.0):
            top_p = per_row(params.top_p, logits)
            sorted_logits, order = logits.sort(-1, descending=True)
            sorted_probs = sorted_logits.softmax(-1)
            mass_before = sorted_probs.cumsum(-1) - sorted_probs
            drop_sorted = mass_before >= top_p  # never drops the first (mass_before == 0)
            if isinstance(top_p, torch.Tensor):  # rows with top_p = 1 keep every token, rounding aside
                drop_sorted &= top_p < 1.0
            logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
        probs = logits.softmax(-1)
        if is_on(params.min_p, 0.0):
            min_p = per_row(params.min_p, logits)
            kept = probs * (probs >= min_p * probs.amax(-1, keepdim=True))
            kept = kept / kept.sum(-1, keepdim=True)
            probs = torch.where(min_p > 0.0, kept, probs) if isinstance(min_p, torch.Tensor) else kept
        if params.greedy_rows is not None:  # greedy requests among sampled ones: one-hot at the argmax
            probs = torch.where(per_row(params.greedy_rows, probs), _one_hot_argmax(raw), probs)
        return probs


def _one_hot_argmax(logits: torch.Tensor) -> torch.Tensor:
    """``[..., V]`` one-hot at the argmax (the first on ties)."""
    return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
