"""The default sampler: temperature → top-k → top-p → softmax → min-p, in that order."""

from __future__ import annotations

import torch

from dspark.records import MixedSamplingParams, SamplingParams, is_on, per_row
from dspark.samplers.base import Sampler, register_sampler


@register_sampler("default")
class DefaultSampler(Sampler):
    """Temperature, then top-k (ties at the k-th logit kept), then top-p (the smallest set of most
    likely tokens whose mass reaches ``top_p``, ties at the cut kept: :func:`top_p_threshold`),
    softmax, then min-p (drop tokens below
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
            probs = logits.softmax(-1)
            keep = probs >= top_p_threshold(probs, top_p)
            if isinstance(top_p, torch.Tensor):  # rows with top_p = 1 keep every token, rounding aside
                keep |= top_p >= 1.0
            logits = logits.masked_fill(~keep, float("-inf"))
        probs = logits.softmax(-1)
        if is_on(params.min_p, 0.0):
            min_p = per_row(params.min_p, logits)
            kept = probs * (probs >= min_p * probs.amax(-1, keepdim=True))
            kept = kept / kept.sum(-1, keepdim=True)
            probs = torch.where(min_p > 0.0, kept, probs) if isinstance(min_p, torch.Tensor) else kept
        if params.greedy_rows is not None:  # greedy requests among sampled ones: one-hot at the argmax
            probs = torch.where(per_row(params.greedy_rows, probs), _one_hot_argmax(raw), probs)
        return probs


#: where a top-p cut is looked for first: the likeliest tokens, the whole vocabulary only for the
#: rows whose cut lies further down (on the CPU, where a full sort costs far more than a partial one)
TOP_P_CANDIDATES = 256


def top_p_threshold(probs: torch.Tensor, top_p) -> torch.Tensor:
    """``[..., 1]`` the least probability a token of ``probs`` ``[..., V]`` may have and stay in the
    top-p set: the set keeps ``p_i ≥ t``, ``t`` the least value whose strictly likelier tokens
    weigh less than ``top_p`` (a number, or ``[B, 1, ..., 1]``). Tokens tied at the cut stay or go
    together, so the set does not depend on how a sort orders ties (nor on the batch).

    On the CPU the cut is found among the :data:`TOP_P_CANDIDATES` likeliest tokens (a partial
    sort), and only rows whose cut lies beyond them sort the whole vocabulary."""

    def cut(values: torch.Tensor, top_p) -> tuple[torch.Tensor, torch.Tensor]:  # values [..., k], descending
        before = values.cumsum(-1) - values  # mass of the tokens ahead of each
        count = (before < top_p).sum(-1, keepdim=True)  # ≥ 1 (nothing is ahead of the first)
        return values.gather(-1, count - 1), count

    candidates = min(TOP_P_CANDIDATES, probs.shape[-1])
    if probs.device.type != "cpu" or candidates == probs.shape[-1]:
        return cut(probs.sort(-1, descending=True).values, top_p)[0]
    threshold, count = cut(probs.topk(candidates, -1).values, top_p)
    beyond = count == candidates  # every candidate is in the set: the cut may lie further down
    if torch.compiler.is_compiling():  # compiled steps keep static shapes: every row sorted when one must be
        if beyond.any():
            threshold = torch.where(beyond, cut(probs.sort(-1, descending=True).values, top_p)[0], threshold)
        return threshold
    rows = beyond.flatten().nonzero().squeeze(1)  # (a host read, on the CPU only)
    if len(rows):  # sort just those rows whole
        row_top_p = top_p if not isinstance(top_p, torch.Tensor) else (
            top_p.expand(threshold.shape).reshape(-1, 1)[rows])
        full = probs.reshape(-1, probs.shape[-1])[rows].sort(-1, descending=True).values
        threshold = threshold.reshape(-1, 1).index_copy(0, rows, cut(full, row_top_p)[0]).view(threshold.shape)
    return threshold


def _one_hot_argmax(logits: torch.Tensor) -> torch.Tensor:
    """``[..., V]`` one-hot at the argmax (the first on ties)."""
    return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
