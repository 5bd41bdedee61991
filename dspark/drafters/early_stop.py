"""Stopping a request's drafting once its predicted survival falls below ``drafter.min_survival``.

A drafter that drafts left to right and knows, before drawing ``x_k``, a confidence ``c_k`` that
does not depend on ``x_k`` (a function of the drafts before it) can stop where the survival
``a_k = c_1 ⋯ c_k`` — the chance that ``x_1..x_k`` are all accepted — falls below θ. Whether
``x_k`` is offered then depends on the drafts before it only, so verification stays exact. The
drafting runs in chunks of a few steps (one compiled call each) with one host read between chunks;
each request offers its drafts up to its last ``k`` with ``a_k ≥ θ``, and the proposal is as wide
as the longest offer.
"""

from __future__ import annotations

from typing import Callable

import torch

from dspark.records import DraftProposal

#: a chunk of draft steps: ``(tokens [B, n], q [B, n, V] or None, confidences [B, n], carry)``
Chunk = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, object]


def top_probability(logits: torch.Tensor) -> torch.Tensor:
    """A left-to-right drafter's confidence in its next draft ``[B]``: the largest entry of the
    softmax of its logits ``[B, V]`` (before the sampler's processing). Not the drawn token's
    probability: a confidence that depends on ``x_k`` would let the choice to verify ``x_k``
    depend on its value, and the accepted tokens would no longer follow the target."""
    return torch.softmax(logits.float(), -1).amax(-1)


def check_min_survival(value) -> float:
    """``drafter.min_survival``, checked: a number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"drafter.min_survival must be a number in [0, 1] (0 = always draft γ tokens), got {value!r}")
    return float(value)


def draft_while_likely(first: Callable[[int], Chunk], more: Callable[[object, int, int], Chunk], *, gamma: int,
                       check_every: int, min_survival: float, done: torch.Tensor) -> tuple[DraftProposal, int]:
    """Draft ``check_every`` steps at a time while some unfinished request's survival stays at or
    above ``min_survival``.

    Args:
        first: ``first(stop)`` drafts ``x_1..x_stop``; more: ``more(carry, start, stop)`` drafts
            ``x_{start+1}..x_stop`` from the previous chunk's ``carry``.
        gamma: the most steps; done: ``[B]`` finished requests (they offer nothing).

    Returns:
        the proposal (``num_tokens[b]``: request b's offer) and the number of steps drafted.
    """
    stop = min(check_every, gamma)
    tokens, q, p, carry = first(stop)
    chunks = [(tokens, q, p)]
    survival = p.double().cumprod(1)  # [B, k]
    while stop < gamma and bool((survival[:, -1] >= min_survival)[~done].any()):
        start, stop = stop, min(stop + check_every, gamma)
        tokens, q, p, carry = more(carry, start, stop)
        chunks.append((tokens, q, p))
        survival = torch.cat([survival, survival[:, -1:] * p.double().cumprod(1)], 1)
    offered = torch.where(done, 0, (survival >= min_survival).long().cumprod(1).sum(1))  # [B]
    width = int(offered.max())
    tokens, q, p = (None if chunks[0][i] is None else torch.cat([c[i] for c in chunks], 1)[:, :width]
                    for i in range(3))
    return DraftProposal(tokens=tokens, num_tokens=offered, probs=q, confidence=p), stop
