"""How many drafts of each request to verify: the math of the prefix schedulers, on tensors.

Vocabulary: ``c_{r,j}`` is the drafter's confidence that draft j of request r is accepted given
that drafts 1..j−1 were; the *survival* ``a_{r,j} = Π_{i≤j} c_{r,i}`` is the probability that
the first j drafts are all accepted, so verifying ``ℓ_r`` drafts is expected to yield
``1 + Σ_{j≤ℓ_r} a_{r,j}`` tokens (the 1 is the recovered or bonus token).

Losslessness needs the decision to verify draft j to be *non-anticipating*: it may depend on
``x_{r,1..j−1}`` (through ``c_{r,j}``) but not on ``x_{r,j}``. Both schedulers here only admit
draft j after looking at survivals no later than ``a_{r,j}`` — never at ``a_{r,j+1}``, the first
quantity that depends on ``x_{r,j}``.
"""

from __future__ import annotations

from typing import Callable

import torch


def survival(confidence: torch.Tensor) -> torch.Tensor:
    """``a_{r,j} = Π_{i≤j} c_{r,i}``: ``[R, γ]`` confidences → ``[R, γ]`` survivals (float64)."""
    return confidence.double().clamp(0.0, 1.0).cumprod(-1)


def threshold_lengths(survivals: torch.Tensor, num_tokens: torch.Tensor, threshold: float) -> torch.Tensor:
    """``ℓ_r`` = the longest prefix whose survival stays ≥ ``threshold`` (capped at ``num_tokens``)
    ``[R]``. ``a`` is non-increasing in j, so this is a count."""
    positions = torch.arange(survivals.shape[1], device=survivals.device)
    offered = positions < num_tokens.unsqueeze(1)
    return ((survivals >= threshold) & offered).long().cumprod(-1).sum(-1)


def throughput_lengths(survivals: torch.Tensor, num_tokens: torch.Tensor, active: torch.Tensor,
                       steps_per_second: Callable[[torch.Tensor], torch.Tensor], *,
                       early_stop: bool = True, padded: bool = False) -> torch.Tensor:
    """The hardware-aware prefix scheduler (DSpark, Algorithm 1): ``ℓ_r`` ``[R]``.

    All offered drafts ``(r, j)`` with ``a_{r,j} > 0`` are admitted in descending order of
    survival (ties: request, then position, so ``(r, j−1)`` precedes ``(r, j)``). After k
    admissions the verify forward holds ``B_k = R_active + k`` tokens and is expected to yield
    ``τ_k = R_active + Σ a`` tokens; throughput ``Θ_k = τ_k · SPS(B_k)``. Admission stops at the
    first candidate that does not raise Θ (``early_stop``; this is what keeps the choice
    non-anticipating). With ``early_stop=False`` it returns the best point of the whole path —
    a *lossy* global search, kept only to demonstrate the bias (see the tests).

    With ``padded`` the cost is that of a padded verify forward, in which every row of the batch
    takes part with as many tokens as the longest verified prefix: ``R · (1 + D)`` tokens for
    depth ``D``. Once a depth is paid for, every draft up to it is free, so admission goes by
    whole depths: depth ``D`` adds every still-valid ``(r, D)`` (``τ`` grows by ``Σ_r a_{r,D}``)
    and admission stops at the first depth that does not raise ``Θ_D = τ_D · SPS(R · (1 + D))``.
    The decision to verify depth ``D`` reads survivals up to ``a_{·,D}`` only — non-anticipating
    as well (other requests' drafts are independent of this request's).

    Args:
        survivals: ``[R, γ]`` ``a_{r,j}``; num_tokens: ``[R]`` drafts offered; active: ``[R]`` bool.
        steps_per_second: ``SPS(B)`` for a tensor of token counts (any shape).
        padded: cost a padded ``[R, 1 + max ℓ]`` forward instead of ``R_active + Σ ℓ`` tokens.
    """
    num_requests, gamma = survivals.shape
    device = survivals.device
    offered = (torch.arange(gamma, device=device) < num_tokens.unsqueeze(1)) & active.unsqueeze(1)
    candidate = offered & (survivals > 0)
    base = active.sum().to(survivals.dtype)
    if padded:
        return _padded_depth_lengths(survivals, candidate, base, steps_per_second, early_stop)
    score = torch.where(candidate, survivals, torch.full_like(survivals, -1.0)).flatten()
    order = torch.sort(score, descending=True, stable=True).indices  # row-major ties: request, position
    admitted_a = score[order].clamp(min=0.0)  # [R·γ]
    valid = candidate.flatten()[order]
    steps = torch.arange(1, order.numel() + 1, device=device, dtype=survivals.dtype)
    tau = base + admitted_a.cumsum(0)
    theta = torch.cat([(base * steps_per_second(base.view(1))).to(survivals.dtype),
                       tau * steps_per_second(base + steps).to(survivals.dtype)])  # Θ_0 .. Θ_N
    chosen = torch.arange(order.numel(), device=device) < _admitted(theta, valid, early_stop)
    requests = order // gamma
    return torch.zeros(num_requests, dtype=torch.long, device=device).index_add_(0, requests, chosen.long())


def top_k_lengths(survivals: torch.Tensor, num_tokens: torch.Tensor, active: torch.Tensor, k: int) -> torch.Tensor:
    """``ℓ_r`` ``[R]`` when the batch verifies its ``k`` most likely drafts: offered drafts with
    ``a_{r,j} > 0`` in descending order of survival (ties: request, then position), the first ``k``.

    Non-anticipating when ``k`` is fixed before this round's drafts exist (the asynchronous
    scheduler takes it from an earlier round): draft ``(r, j)`` is admitted iff fewer than ``k``
    candidates rank above it, and those are other requests' drafts or ``(r, i < j)`` — never
    ``(r, j+1)``, whose survival ``a_{r,j+1} ≤ a_{r,j}`` ranks below it. Admitted drafts form prefixes.

    Args:
        survivals: ``[R, γ]``; num_tokens: ``[R]`` drafts offered; active: ``[R]`` bool; k: ≥ 0.
    """
    num_requests, gamma = survivals.shape
    device = survivals.device
    offered = (torch.arange(gamma, device=device) < num_tokens.unsqueeze(1)) & active.unsqueeze(1)
    candidate = offered & (survivals > 0)
    score = torch.where(candidate, survivals, torch.full_like(survivals, -1.0)).flatten()
    order = torch.sort(score, descending=True, stable=True).indices  # row-major ties: request, position
    chosen = (torch.arange(order.numel(), device=device) < k) & candidate.flatten()[order]
    return torch.zeros(num_requests, dtype=torch.long, device=device).index_add_(0, order // gamma, chosen.long())


def _admitted(theta: torch.Tensor, valid: torch.Tensor, early_stop: bool) -> torch.Tensor:
    """How many steps of an admission path ``Θ_0..Θ_N`` (``valid`` ``[N]``) to take: up to the first
    that does not raise Θ (``early_stop``), or to the path's first best point (lossy)."""
    if early_stop:
        return ((theta[1:] > theta[:-1]) & valid).long().cumprod(0).sum()
    best = torch.where(torch.cat([torch.ones(1, dtype=torch.bool, device=theta.device), valid]), theta,
                       torch.full_like(theta, -float("inf")))
    return best.argmax()


def _padded_depth_lengths(survivals: torch.Tensor, candidate: torch.Tensor, base: torch.Tensor,
                          steps_per_second: Callable[[torch.Tensor], torch.Tensor], early_stop: bool) -> torch.Tensor:
    """``throughput_lengths`` for a padded verify forward: admit whole depths (see there)."""
    num_requests, gamma = survivals.shape
    device, dtype = survivals.device, survivals.dtype
    gains = torch.where(candidate, survivals, torch.zeros_like(survivals)).sum(0)  # [γ] Σ_r a_{r,D}
    tau = torch.cat([base.view(1), base + gains.cumsum(0)])  # τ_0 .. τ_γ
    tokens = num_requests * torch.arange(1, gamma + 2, device=device, dtype=dtype)  # R · (1 + D)
    theta = tau * steps_per_second(tokens).to(dtype)
    depth = _admitted(theta, candidate.any(0), early_stop)
    return candidate.long().cumprod(1).sum(1).clamp(max=depth)
