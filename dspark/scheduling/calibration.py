"""Calibrating a drafter's confidences: Sequential Temperature Scaling (STS, DSpark §3.2.1),
sequential Platt scaling, and the metrics they are judged by.

The scheduler needs the *absolute* survival ``a_k = Π_{i≤k} c_i`` (the probability that drafts
1..k are all accepted), not just a ranking, and neural confidences are over-confident. STS fits
one temperature per position, left to right: ``c_k ← σ(logit(c_k) / T_k)``, with ``T_k`` found by
a 1-D grid search minimising the expected calibration error of ``a_k`` against the event "drafts
1..k all accepted", the temperatures of earlier positions held fixed. Temperature scaling is
monotone, so the ranking (AUROC) of each position's confidence is unchanged.

STS fixes ``c = ½`` in place, so it cannot move confidences that sit on the wrong side of one half
— an EAGLE-3 head's top probability is mostly below ½ where its greedy drafts are accepted 60–90%
of the time. Sequential Platt scaling adds a shift per position, ``c_k ← σ(logit(c_k) / T_k + b_k)``
(still monotone: AUROC unchanged), fitted left to right by maximum likelihood of the survival
event ``a_k = a_{k−1} · c_k`` (L-BFGS over ``(log 1/T_k, b_k)``, earlier positions held fixed).

Data: per request-round, the confidences ``c`` ``[N, γ]`` and the number of drafts accepted
``n`` ``[N]`` out of ``verified`` ``[N]``. Survival event k is observed when ``verified ≥ k``
(or ``n ≥ k``), with label ``n ≥ k``.
"""

from __future__ import annotations

import torch


def apply_temperatures(confidence: torch.Tensor, temperatures: torch.Tensor,
                       biases: torch.Tensor | None = None) -> torch.Tensor:
    """``σ(logit(c_k) / T_k + b_k)`` for ``c`` ``[..., γ]``, ``T`` and ``b`` ``[γ]`` (``b`` = 0 when
    ``None``: STS), float64."""
    c = confidence.double().clamp(1e-12, 1 - 1e-12)
    z = torch.logit(c) / temperatures.double()
    return torch.sigmoid(z if biases is None else z + biases.double())


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE with ``bins`` equal-width bins: ``Σ_b (n_b / N) · |mean(p) − mean(y)|`` over non-empty bins."""
    p, y = probs.double().flatten(), labels.double().flatten()
    if p.numel() == 0:
        return float("nan")
    which = (p * bins).long().clamp(0, bins - 1)
    count = torch.zeros(bins, dtype=torch.float64).index_add_(0, which, torch.ones_like(p))
    gap = torch.zeros(bins, dtype=torch.float64).index_add_(0, which, p - y).abs()
    return float(gap.sum() / p.numel()) if count.sum() else float("nan")


def brier_score(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean squared error of the probabilities."""
    return float(((probs.double() - labels.double()) ** 2).mean())


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (probability that a random positive outranks a random negative,
    ties counting one half); ``nan`` when one class is absent."""
    s, y = scores.double().flatten(), labels.bool().flatten()
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    order = torch.argsort(s)
    ranks = torch.empty_like(s)
    ranks[order] = torch.arange(1, s.numel() + 1, dtype=torch.float64)
    # average the ranks of tied scores
    unique, inverse = torch.unique(s, return_inverse=True)
    mean_rank = torch.zeros(unique.numel(), dtype=torch.float64).index_add_(0, inverse, ranks)
    mean_rank /= torch.bincount(inverse, minlength=unique.numel()).double()
    rank_sum = mean_rank[inverse][y].sum()
    return float((rank_sum - pos * (pos + 1) / 2) / (pos * neg))


def survival_events(accepted: torch.Tensor, verified: torch.Tensor, gamma: int):
    """Which survival events were observed ``[N, γ]`` and their labels ``[N, γ]``. Event k is
    "drafts 1..k all accepted": known when draft k was verified, and known to be false past a
    rejection (``accepted < verified``); unknown past an all-accepted verification."""
    k = torch.arange(1, gamma + 1)
    labels = accepted.unsqueeze(1) >= k
    observed = (k <= verified.unsqueeze(1)) | (accepted < verified).unsqueeze(1)
    return observed, labels


def _check_confidence(confidence: torch.Tensor) -> None:
    if confidence.dim() != 2:
        raise ValueError(f"confidence must be [N, γ], got shape {tuple(confidence.shape)}")
    if ((confidence < 0) | (confidence > 1)).any():
        raise ValueError("confidences must lie in [0, 1]")


def fit_sts(confidence: torch.Tensor, accepted: torch.Tensor, verified: torch.Tensor, *,
            grid: torch.Tensor | None = None, bins: int = 15) -> torch.Tensor:
    """Sequential Temperature Scaling: temperatures ``[γ]``, position by position.

    Args:
        confidence: ``[N, γ]`` raw ``c_k`` per request-round; accepted: ``[N]`` drafts accepted;
        verified: ``[N]`` drafts verified. grid: candidate temperatures (default 0.25 … 8, log-spaced).
    """
    _check_confidence(confidence)
    gamma = confidence.shape[1]
    grid = grid if grid is not None else torch.logspace(-2, 3, 101, base=2.0, dtype=torch.float64)
    observed, labels = survival_events(accepted, verified, gamma)
    temperatures = torch.ones(gamma, dtype=torch.float64)
    prefix = torch.ones(confidence.shape[0], dtype=torch.float64)  # calibrated a_{k-1}
    for k in range(gamma):
        seen = observed[:, k]
        best, best_ece = 1.0, float("inf")
        for t in grid.tolist():
            a_k = prefix * apply_temperatures(confidence[:, k], torch.tensor([t]))
            error = expected_calibration_error(a_k[seen], labels[seen, k], bins)
            if error < best_ece - 1e-12:
                best, best_ece = t, error
        temperatures[k] = best
        prefix = prefix * apply_temperatures(confidence[:, k], torch.tensor([best]))
    return temperatures


def fit_platt(confidence: torch.Tensor, accepted: torch.Tensor, verified: torch.Tensor, *,
              max_iter: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequential Platt scaling: temperatures ``[γ]`` and shifts ``[γ]``, position by position, each
    maximising the likelihood of the observed survival events ``a_k = a_{k−1} · σ(logit(c_k)/T_k + b_k)``
    given the calibrated ``a_{k−1}`` (with a small ridge on ``log 1/T_k`` and ``b_k``, so that the
    fit stays finite where every event has one outcome). A position with no observed event keeps
    ``T = 1, b = 0``.

    Args:
        confidence, accepted, verified: as for :func:`fit_sts`. max_iter: L-BFGS iterations per position.
    """
    _check_confidence(confidence)
    gamma = confidence.shape[1]
    observed, labels = survival_events(accepted, verified, gamma)
    z = torch.logit(confidence.double().clamp(1e-12, 1 - 1e-12))  # [N, γ]
    temperatures, biases = torch.ones(gamma, dtype=torch.float64), torch.zeros(gamma, dtype=torch.float64)
    prefix = torch.ones(confidence.shape[0], dtype=torch.float64)  # calibrated a_{k-1}
    eps, ridge = 1e-12, 1e-4
    for k in range(gamma):
        seen = observed[:, k]
        if seen.any():
            y, z_k, before = labels[seen, k].double(), z[seen, k], prefix[seen]
            log_inverse_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
            shift = torch.zeros((), dtype=torch.float64, requires_grad=True)
            optimiser = torch.optim.LBFGS([log_inverse_t, shift], max_iter=max_iter, line_search_fn="strong_wolfe")

            def negative_log_likelihood():
                optimiser.zero_grad()
                a_k = (before * torch.sigmoid(z_k * log_inverse_t.exp() + shift)).clamp(eps, 1 - eps)
                loss = -(y * a_k.log() + (1 - y) * (1 - a_k).log()).mean()
                loss = loss + ridge * (log_inverse_t ** 2 + shift ** 2)  # finite when one class is absent
                loss.backward()
                return loss

            optimiser.step(negative_log_likelihood)
            temperatures[k], biases[k] = float((-log_inverse_t).exp().detach()), float(shift.detach())
        prefix = prefix * torch.sigmoid(z[:, k] / temperatures[k] + biases[k])
    return temperatures, biases


def calibration_report(confidence: torch.Tensor, accepted: torch.Tensor, verified: torch.Tensor,
                       temperatures: torch.Tensor | None = None, biases: torch.Tensor | None = None,
                       bins: int = 15) -> list[dict]:
    """Per position k: ECE and Brier of the survival ``a_k``, and AUROC of ``c_k`` on its
    conditional event (draft k accepted given 1..k−1 were), with ``temperatures`` (and ``biases``)
    applied if given."""
    gamma = confidence.shape[1]
    c = apply_temperatures(confidence, temperatures, biases) if temperatures is not None else confidence.double()
    a = c.cumprod(-1)
    observed, labels = survival_events(accepted, verified, gamma)
    rows = []
    for k in range(gamma):
        seen = observed[:, k]
        conditional = seen & (accepted >= k)  # reached position k
        rows.append({"position": k + 1, "events": int(seen.sum()),
                     "ece": expected_calibration_error(a[seen, k], labels[seen, k], bins),
                     "brier": brier_score(a[seen, k], labels[seen, k]) if seen.any() else float("nan"),
                     "auroc": auroc(c[conditional, k], labels[conditional, k])})
    return rows
