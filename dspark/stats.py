"""Decoding statistics: the metrics, defined once, and the device-side counters behind them.

Definitions (per ``generate`` call, over all request-rounds, prefill excluded):

* **τ (mean accepted length)** — tokens emitted per target forward: accepted drafts plus the
  one recovered or bonus token. Plain decoding has τ = 1.
* **conditional acceptance at position k** — P(x_k accepted | x_1..x_{k-1} accepted and x_k
  verified): accepted-at-k over reached-k, where a request-round *reaches* k when it verified at
  least k drafts and accepted the first k-1.
* **drafted / verified / accepted tokens** — drafts proposed, drafts the target verified (after
  scheduling), drafts accepted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

#: Every metric ``dspark bench`` reports — (name, definition, what it tells you). The one place they
#: are defined: the bench writes them into every ``bench.md`` and ``bench.json``, and the docs'
#: table (docs/benchmarks.md) is :func:`metrics_markdown` (a test keeps the two equal).
METRICS: tuple[tuple[str, str, str], ...] = (
    ("τ (tokens per target forward)",
     "tokens emitted per request-round: accepted drafts + the one recovered or bonus token (a request that ends inside "
     "a round counts the tokens it kept); plain decoding has τ = 1",
     "how much target work one round saves — an upper bound on the speedup when drafting is free"),
    ("conditional acceptance at position k",
     "P(draft k accepted | drafts 1..k−1 accepted and draft k verified), leaving out the positions past the end of a "
     "request that ended inside the round",
     "where in the block the drafter loses the target; a parallel drafter decays along the block, an "
     "autoregressive one need not"),
    ("drafted / verified / accepted per round",
     "drafts proposed, drafts the target scored (after scheduling), drafts kept, per request-round",
     "τ − 1 = accepted per round; verified − accepted is wasted target work"),
    ("tokens/s",
     "generated tokens ÷ wall time of the whole `generate` call (prefill included), median over repeats with its range",
     "what a user waits for"),
    ("speedup vs none",
     "tokens/s ÷ tokens/s of the `none` pipeline in the same cell",
     "the net effect of speculation, draft cost included"),
    ("vs transformers peer",
     "tokens/s ÷ the matching `transformers` `generate`: plain (for `none`), assisted generation with the same "
     "draft model (for `draft_model`), prompt lookup (for `ngram`), `assistant_early_exit` at the same layer "
     "(for `early_exit`)",
     "whether dspark's engine is faster than the reference implementation"),
    ("draft / schedule / verify / other ms per round",
     "wall time of the rounds split into the drafter's `propose`, the scheduler's choice, the target's verify "
     "forward + verification, and the rest (accepting tokens, rollback, the drafter's commit, the one host sync); "
     "on CUDA, from one extra pass per cell that synchronises at each phase (the tokens/s passes do not)",
     "where a round's time goes"),
)


def metrics_markdown() -> str:
    """:data:`METRICS` as a Markdown table (name in bold, definition, what it tells you)."""
    rows = [f"| **{name}** | {definition.replace('|', chr(92) + '|')} | {meaning} |"
            for name, definition, meaning in METRICS]
    return "\n".join(["| metric | definition | what it tells you |", "|---|---|---|", *rows]) + "\n"


def conditional_acceptance(reached: list[int], accepted: list[int]) -> list[float | None]:
    """Acceptance rate per draft position from its counts (``None`` where a position was never reached)."""
    return [a / r if r else None for a, r in zip(accepted, reached)]


def mean_accepted_length(accepted_tokens: int, target_forwards: int) -> float:
    """τ: (accepted drafts + one emitted token per forward) / forwards; 0 with no forwards."""
    return (accepted_tokens + target_forwards) / target_forwards if target_forwards else 0.0


def position_counts(num_verified: torch.Tensor, num_accepted: torch.Tensor, gamma: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position (reached, accepted) counts ``[γ]`` of one round, from ``ℓ_b`` and ``n_b`` ``[B]``."""
    k = torch.arange(gamma, device=num_verified.device)
    reached = (k < num_verified.unsqueeze(1)) & (k <= num_accepted.unsqueeze(1))
    accepted = k < num_accepted.unsqueeze(1)
    return reached.sum(0), accepted.sum(0)


@dataclass
class GenerationStats:
    """Counters of one ``generate`` call (aggregated over its requests; see the module docstring).

    Attributes:
        rounds: decoding rounds (target verification forwards of the batch), prefill excluded.
        target_forwards: request-rounds, i.e. target forwards summed over requests.
        generated_tokens: tokens generated, over all requests.
        drafted_tokens / verified_tokens / accepted_tokens: over all request-rounds.
        mean_accepted_length: τ.
        acceptance_by_position: conditional acceptance per draft position (``None``: never reached).
        reached_by_position / accepted_by_position_counts: the counts behind it.
        wall_time_s, prefill_time_s: seconds; tokens_per_second: generated tokens / wall time.
        draft_time_s / schedule_time_s / verify_time_s / other_time_s: the decoding time (wall minus
            prefill) split into drafting, scheduling (the scheduler's choice and its host read),
            target forward + verification, and the rest (accepting, rollback, bookkeeping, the
            per-round sync) — only with ``engine.time_phases``; else 0.
        predicted_tokens / predicted_tau: with a drafter that returns confidences, the tokens the
            survivals predicted for the verified prefixes (``Σ (1 + Σ_{j≤ℓ} a_j)``) and per request-round —
            compare with τ to see how well the confidences are calibrated; ``None`` without confidences.
        per_request: the counters per request (generated, target_forwards, drafted, verified,
            accepted) and, from the engine, ``first_token_s`` / ``finished_s``: seconds from the
            start of the ``generate`` call until the host had the request's first token / saw it
            end (read at the round's status read: round granularity). With more requests than
            slots, later requests wait for a slot: their time to first token includes the wait.
    """

    rounds: int = 0
    target_forwards: int = 0
    generated_tokens: int = 0
    drafted_tokens: int = 0
    verified_tokens: int = 0
    accepted_tokens: int = 0
    mean_accepted_length: float = 0.0
    acceptance_by_position: list[float | None] = field(default_factory=list)
    reached_by_position: list[int] = field(default_factory=list)
    accepted_by_position_counts: list[int] = field(default_factory=list)
    wall_time_s: float = 0.0
    prefill_time_s: float = 0.0
    tokens_per_second: float = 0.0
    draft_time_s: float = 0.0
    schedule_time_s: float = 0.0
    verify_time_s: float = 0.0
    other_time_s: float = 0.0
    predicted_tokens: float = 0.0
    predicted_tau: float | None = None
    per_request: list[dict] = field(default_factory=list)

    def summary(self) -> str:
        """One line for logs and the CLI."""
        acc = ", ".join("-" if a is None else f"{a:.2f}" for a in self.acceptance_by_position)
        return (f"{self.generated_tokens} tokens in {self.wall_time_s:.2f}s ({self.tokens_per_second:.1f} tok/s), "
                f"{self.rounds} rounds, tau={self.mean_accepted_length:.2f}"
                + (f", acceptance by position [{acc}]" if acc else ""))

    @staticmethod
    def merge(parts: list["GenerationStats"]) -> "GenerationStats":
        """Combine the stats of consecutive batches of one call."""
        if len(parts) == 1:
            return parts[0]
        total = GenerationStats()
        for name in ("rounds", "target_forwards", "generated_tokens", "drafted_tokens", "verified_tokens",
                     "accepted_tokens", "wall_time_s", "prefill_time_s", "draft_time_s", "schedule_time_s",
                     "verify_time_s", "other_time_s", "predicted_tokens"):
            setattr(total, name, sum(getattr(p, name) for p in parts))
        if any(p.predicted_tau is not None for p in parts):
            total.predicted_tau = total.predicted_tokens / max(total.target_forwards, 1)
        total.per_request = [r for p in parts for r in p.per_request]
        total.mean_accepted_length = mean_accepted_length(total.accepted_tokens, total.target_forwards)
        total.reached_by_position = [sum(c) for c in zip(*(p.reached_by_position for p in parts))]
        total.accepted_by_position_counts = [sum(c) for c in zip(*(p.accepted_by_position_counts for p in parts))]
        total.acceptance_by_position = conditional_acceptance(total.reached_by_position, total.accepted_by_position_counts)
        total.tokens_per_second = total.generated_tokens / max(total.wall_time_s, 1e-9)
        return total


class RoundCounters:
    """Device-side counters updated every round and read once at the end (no host sync)."""

    def __init__(self, batch: int, gamma: int, device, requests: int | None = None):
        self.gamma = gamma
        self.rounds = 0
        self.per_slot = torch.zeros(4, batch, dtype=torch.long, device=device)  # forwards, drafted, verified, accepted
        #: each request's counts once its slot is retired (``requests``: how many there are so far,
        #: when slots take new requests as others finish — continuous batching, :meth:`grow` as more
        #: come; default: slot ``b`` is request ``b``)
        self.per_request = torch.zeros(4, batch if requests is None else requests, dtype=torch.long, device=device)
        self._slots_are_requests = requests is None
        self.reached = torch.zeros(gamma, dtype=torch.long, device=device)
        self.accepted_at = torch.zeros(gamma, dtype=torch.long, device=device)
        self.phase_seconds = [0.0, 0.0, 0.0]  # draft, schedule, verify (host clock; engine.time_phases)
        self.predicted: torch.Tensor | None = None  # Σ predicted tokens of drafted rounds (with confidences)
        self.predicted_on_host: float | None = None  # Σ of rounds counted on the host (skipped rounds)

    def update(self, finished: torch.Tensor, num_verified: torch.Tensor, num_accepted: torch.Tensor,
               num_drafted: torch.Tensor, predicted: torch.Tensor | float | None = None, drafted: bool = True,
               num_kept: torch.Tensor | None = None) -> None:
        """Count one round: ``finished`` ``[B]`` bool (requests that were already done), and ``ℓ_b``,
        ``n_b``, drafts proposed ``[B]`` (zero for finished requests); ``predicted`` ``[B]`` the tokens
        the confidences predicted (0 for finished requests), when the drafter returns confidences,
        or their sum as a float when the host knows it (a skipped round: one token per unfinished
        request); ``drafted``: whether the round drafted at all; ``num_kept`` ``[B]``: the accepted
        drafts the request kept (fewer than ``n_b`` when its budget or a stop token ended it inside
        the round; default ``n_b``) — what τ and the accepted tokens count. Acceptance by position
        leaves out the positions past such an end (accepted, but not needed: neither the
        drafter's success nor its failure), so its accepted counts sum to the kept drafts."""
        self.rounds += 1
        if isinstance(predicted, float):
            self.predicted_on_host = (self.predicted_on_host or 0.0) + predicted
        elif predicted is not None:
            total = predicted.double().sum()
            self.predicted = total if self.predicted is None else self.predicted + total
        kept = num_accepted if num_kept is None else num_kept
        self.per_slot[:, :finished.shape[0]] += torch.stack([~finished, torch.where(finished, 0, num_drafted),
                                                             num_verified, kept])  # (a round over the first slots)
        if self.gamma and drafted:  # a round without drafts reaches no position
            counted = num_verified if num_kept is None else torch.where(kept < num_accepted, kept, num_verified)
            reached, accepted = position_counts(counted, kept, self.gamma)
            self.reached += reached
            self.accepted_at += accepted

    def grow(self, requests: int) -> None:
        """Room for the counts of ``requests`` requests (more join the call). The room doubles
        when it runs out (a session may take requests for a long time); columns past the
        requests stay zero."""
        if requests > self.per_request.shape[1]:
            room = max(requests, 2 * self.per_request.shape[1])
            self.per_request = torch.cat([self.per_request, self.per_request.new_zeros(
                4, room - self.per_request.shape[1])], 1)

    def retire(self, slots: torch.Tensor, requests: torch.Tensor) -> None:
        """Move the counts of ``slots`` ``[k]`` to ``requests`` ``[k]`` (the requests that held them)
        and zero the slots for the requests that take them next (no host sync)."""
        self.per_request.index_add_(1, requests, self.per_slot[:, slots])
        self.per_slot[:, slots] = 0

    def stats(self, generated: list[list[int]], wall: float, prefill: float) -> GenerationStats:
        """Read the counters (one device-to-host copy) into a :class:`GenerationStats`. Given
        ``requests``, every slot must have been retired (:meth:`retire`) into its request by then;
        without, slot ``b`` counts for request ``b``."""
        per_request = self.per_request + self.per_slot if self._slots_are_requests else self.per_request
        batch, gamma = per_request.shape[1], self.gamma
        counts = torch.cat([per_request.flatten(), self.reached, self.accepted_at])
        if self.predicted is not None:  # one read for everything (counts are exact in float64)
            *flat, predicted = torch.cat([counts.double(), self.predicted.view(1)]).tolist()
            flat = [int(v) for v in flat]
        else:
            flat, predicted = counts.tolist(), None
        if self.predicted_on_host is not None:
            predicted = (predicted or 0.0) + self.predicted_on_host
        forwards, drafted, verified, accepted = (flat[i * batch:(i + 1) * batch] for i in range(4))
        reached, accepted_at = flat[4 * batch: 4 * batch + gamma], flat[4 * batch + gamma:]
        total_generated = sum(len(g) for g in generated)
        draft, schedule, verify = self.phase_seconds
        return GenerationStats(
            rounds=self.rounds, target_forwards=sum(forwards), generated_tokens=total_generated,
            drafted_tokens=sum(drafted), verified_tokens=sum(verified), accepted_tokens=sum(accepted),
            mean_accepted_length=mean_accepted_length(sum(accepted), sum(forwards)),
            acceptance_by_position=conditional_acceptance(reached, accepted_at),
            reached_by_position=reached, accepted_by_position_counts=accepted_at,
            wall_time_s=wall, prefill_time_s=prefill, tokens_per_second=total_generated / max(wall, 1e-9),
            draft_time_s=draft, schedule_time_s=schedule, verify_time_s=verify,
            other_time_s=max(0.0, wall - prefill - draft - schedule - verify) if draft or verify else 0.0,
            predicted_tokens=predicted or 0.0,
            predicted_tau=None if predicted is None else predicted / max(sum(forwards), 1),
            per_request=[dict(generated=len(g), target_forwards=f, drafted=d, verified=v, accepted=a)
                         for g, f, d, v, a in zip(generated, forwards, drafted, verified, accepted)],
        )
