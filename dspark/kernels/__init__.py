"""Kernels of the verification hot path, each a Triton kernel beside a plain-torch twin.

Import ops from here: each call goes through :func:`~dspark.kernels.dispatch.implementation`,
the only place that chooses an implementation (Triton on CUDA, the twin elsewhere; see
:mod:`dspark.kernels.dispatch`). Shapes and semantics are documented on the twins in
:mod:`dspark.kernels.reference`.
"""

from __future__ import annotations

import torch

from dspark.kernels.dispatch import BACKENDS, backend_for, get_backend, implementation, use_backend
from dspark.kernels.reference import acceptance_probability, accepts, leading_true, residual_distribution


def verify_chain(target_probs: torch.Tensor, draft_tokens: torch.Tensor, draft_probs: torch.Tensor | None,
                 num_drafts: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Chain rejection sampling → ``(num_accepted [B], tokens [B, γ+1])``; see
    :func:`dspark.kernels.reference.verify_chain`."""
    return implementation("verify_chain", target_probs.device)(target_probs, draft_tokens, draft_probs, num_drafts,
                                                               uniforms)


def verify_greedy(target_logits: torch.Tensor, draft_tokens: torch.Tensor,
                  num_drafts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy verification → ``(num_accepted [B], target argmax [B, γ+1])``; see
    :func:`dspark.kernels.reference.verify_greedy`."""
    return implementation("verify_greedy", target_logits.device)(target_logits, draft_tokens, num_drafts)


def commit_tokens(tokens: torch.Tensor, lengths: torch.Tensor, prompt_lengths: torch.Tensor, done: torch.Tensor,
                  emitted: torch.Tensor, num_emitted: torch.Tensor, eos: torch.Tensor,
                  max_new_tokens: torch.Tensor | int) -> torch.Tensor:
    """Append kept tokens and advance lengths for the whole batch in place → kept ``[B]``; see
    :func:`dspark.kernels.reference.commit_tokens` (``eos``: each request's stop ids ``[B, E]``
    padded with −1, or ``[E]`` for all; ``max_new_tokens``: each request's budget ``[B]``, or one
    for all)."""
    if not isinstance(max_new_tokens, torch.Tensor):
        max_new_tokens = torch.full_like(lengths, max_new_tokens)
    if eos.dim() == 1:
        eos = eos.expand(lengths.shape[0], -1).contiguous()
    return implementation("commit_tokens", tokens.device)(tokens, lengths, prompt_lengths, done, emitted, num_emitted,
                                                          eos, max_new_tokens)


def gather_accepted_kv(buffer: torch.Tensor, lengths: torch.Tensor, src_offsets: torch.Tensor,
                       num: torch.Tensor) -> None:
    """Compact the accepted path's KV entries after the committed prefix, in place; see
    :func:`dspark.kernels.reference.gather_accepted_kv`."""
    implementation("gather_accepted_kv", buffer.device)(buffer, lengths, src_offsets, num)


__all__ = ["BACKENDS", "acceptance_probability", "accepts", "backend_for", "commit_tokens", "gather_accepted_kv",
           "get_backend", "implementation", "leading_true", "residual_distribution", "use_backend", "verify_chain",
           "verify_greedy"]
