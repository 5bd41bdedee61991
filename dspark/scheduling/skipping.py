"""Whether a round drafts at all: rules a scheduler applies *before* drafting.

A round that does not draft is a plain decoding step, so these rules may read anything of earlier
rounds (what was verified, how long rounds took) without touching losslessness — they never see
the current round's drafts.

* :class:`IdleBackoff` — after a drafted round that verified nothing, skip 1, 2, 4, … rounds;
* :class:`MeasuredFallback` — draft only while drafted rounds are *measured* to emit more tokens
  per second than plain ones at this batch size, probing the losing kind now and then.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from statistics import median


class IdleBackoff:
    """Skip drafting after idle rounds: 1, 2, 4, … rounds (at most ``limit``) after each drafted
    round that verified nothing; back to drafting every round once one verifies something."""

    def __init__(self, limit: int):
        self.limit = limit
        self.reset()

    def reset(self) -> None:
        """Draft the next round."""
        self.skip_next, self.to_skip = 0, 0

    def wants_drafts(self) -> bool:
        """Whether this round drafts (consumes one skipped round otherwise)."""
        if self.to_skip > 0:
            self.to_skip -= 1
            return False
        return True

    def observe(self, widest: int, offered: int = 1) -> None:
        """A drafted round verified at most ``widest`` of the (at most ``offered``) drafts per
        request. A round in which nothing was offered (a drafter that found nothing to propose)
        says nothing about whether verifying pays, and changes nothing."""
        if offered == 0:
            return
        if widest > 0 or self.limit == 0:
            self.skip_next = 0
        else:
            self.skip_next = min(max(1, 2 * self.skip_next), self.limit)
            self.to_skip = self.skip_next


#: a round this many times longer than the median of its kind's window is left out of the rate
OUTLIER = 4.0
#: the slower kind takes over only when it is faster by more than this fraction
MARGIN = 0.05


class MeasuredFallback:
    """Draft only while it is measured to pay: a two-armed choice between drafted and plain rounds.

    Each round yields the tokens it emitted per unfinished request and its wall time (host clock
    between the engine's per-round status reads, which wait for the device). Per batch size and
    kind, the last ``window`` rounds are kept and their rate is ``Σ tokens / Σ seconds``, leaving
    out rounds over ``OUTLIER`` times the median time (a compilation or a stray process must not
    decide). A ratio of sums, not a median of rates, because a drafter's tokens per round are far
    from symmetric: prompt lookup emits one token when it finds nothing, γ + 1 when all match.

    Until each kind has ``MIN_SAMPLES`` rounds it is tried (drafted first); then the faster kind
    runs, and the slower one is probed for one round after 1, 2, 4, … (at most ``probe_limit``)
    rounds of the faster, so a change (longer contexts, another domain) is noticed; the interval
    starts again at 1 when the faster kind changes, which takes a lead of more than ``MARGIN``.
    Measurements persist across batches (same hardware, same batch size). A batch size seen for
    the first time still measures both kinds, but starts from the leader and probe interval of the
    nearest batch size that has one (a prior, overturned by its own rates like any lead): learning
    a new load then costs ``MIN_SAMPLES`` drafted rounds, not a probe after 1, 2, 4, … rounds again.

    A drafted round after plain ones also pays for the drafter catching up on the skipped context
    (the DSpark drafter appends it lazily, the draft model feeds it): probes see drafting slightly
    slower than steady drafting is — a bias towards plain decoding, the safe side.
    """

    MIN_SAMPLES = 2

    def __init__(self, window: int = 6, probe_limit: int = 256):
        if window < self.MIN_SAMPLES:
            raise ValueError(f"the measured fallback's window must be >= {self.MIN_SAMPLES}, got {window}")
        if probe_limit < 1:
            raise ValueError(f"the measured fallback's probe_limit must be >= 1, got {probe_limit}")
        self.window, self.probe_limit = window, probe_limit
        self.arms: dict[int, _Arms] = {}  # per batch size

    def _arms(self, batch_size: int) -> "_Arms":
        if batch_size not in self.arms:
            arms = _Arms(deque(maxlen=self.window), deque(maxlen=self.window))
            settled = [b for b, a in self.arms.items() if a.faster is not None]
            if settled:  # the prior: the nearest batch size by ratio, the smaller on a tie
                nearest = self.arms[min(settled, key=lambda b: (abs(math.log(b / batch_size)), b))]
                arms.faster, arms.interval = nearest.faster, nearest.interval
            self.arms[batch_size] = arms
        return self.arms[batch_size]

    def rates(self, batch_size: int) -> tuple[float | None, float | None]:
        """(drafted, plain) tokens per request-second measured at this batch size (None: too few rounds)."""
        arms = self._arms(batch_size)
        return _rate(arms.drafted, self.MIN_SAMPLES), _rate(arms.plain, self.MIN_SAMPLES)

    def wants_drafts(self, batch_size: int) -> bool:
        """Whether the next round should draft (reads only rounds already timed)."""
        drafted, plain = self.rates(batch_size)
        if drafted is None:
            return True
        if plain is None:
            return False
        arms = self._arms(batch_size)
        faster = drafted > plain if arms.faster is None else _leader(arms.faster, drafted, plain)
        if faster != arms.faster:
            arms.faster, arms.interval, arms.since_probe = faster, 1, 0
        if arms.since_probe >= arms.interval:
            return not faster  # probe the slower kind
        return faster

    def timed(self, batch_size: int, drafted: bool, seconds: float, tokens_per_request: float) -> None:
        """A round ended: whether it drafted, its wall time and the tokens it emitted per unfinished request."""
        if seconds <= 0:
            return
        arms = self._arms(batch_size)
        measuring = min(len(arms.drafted), len(arms.plain)) < self.MIN_SAMPLES  # no lead in force yet
        (arms.drafted if drafted else arms.plain).append((tokens_per_request, seconds))
        if measuring or arms.faster is None:
            return
        if drafted == arms.faster:
            arms.since_probe += 1
        else:  # a probe of the slower kind
            arms.since_probe = 0
            arms.interval = min(2 * arms.interval, self.probe_limit)


def _leader(incumbent: bool, drafted: float, plain: float) -> bool:
    """Whether drafting leads, with hysteresis: the other kind takes over only when it is faster
    by more than ``MARGIN`` (noise in a short window must not flip it back and forth, since every
    flip restarts frequent probing)."""
    if incumbent:
        return not plain > drafted * (1 + MARGIN)
    return drafted > plain * (1 + MARGIN)


def _rate(rounds: deque, min_samples: int) -> float | None:
    """``Σ tokens / Σ seconds`` over (tokens, seconds) rounds, leaving out outliers in time (more than
    ``OUTLIER`` times the median round: a compilation, a stray process)."""
    if len(rounds) < min_samples:
        return None
    typical = median(s for _, s in rounds)
    kept = [(t, s) for t, s in rounds if s <= OUTLIER * typical]
    return sum(t for t, _ in kept) / sum(s for _, s in kept)


@dataclass
class _Arms:
    """Recent (tokens per request, seconds) of drafted and plain rounds at one batch size, and the
    probing schedule."""

    drafted: deque
    plain: deque
    faster: bool | None = None  # whether drafting currently wins (None: still trying both)
    interval: int = 1  # rounds of the faster kind between probes of the slower
    since_probe: int = 0
