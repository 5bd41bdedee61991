"""Schedulers: the round's *schedule* step — how many of each request's drafts the target verifies.

Config section ``scheduler: {name: fixed | threshold | dspark | adaptive, ...}``. ``fixed`` verifies
every draft (plain speculative decoding); ``threshold`` and ``dspark`` read the drafter's
confidences (``DraftProposal.confidence``), so they need a drafter with a confidence head
(``dspark``); ``adaptive`` is ``dspark`` with acceptance estimated from earlier rounds, for any drafter.
Every scheduler is lossless: its choice for draft j never depends on draft j itself (see
:mod:`dspark.scheduling.prefix`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace

import torch

from dspark.models.compiled import compile_forward
from dspark.records import DraftProposal
from dspark.registry import Registry
from dspark.scheduling.prefix import survival, threshold_lengths, throughput_lengths, top_k_lengths
from dspark.scheduling.profile import ThroughputProfile, interpolate_sps, profile_target
from dspark.scheduling.skipping import IdleBackoff, MeasuredFallback
from dspark.stats import position_counts


@dataclass
class SchedulerConfig:
    """Config section ``scheduler``: ``name`` of a registered scheduler (``fixed`` by default), or
    ``_target_``, the dotted path of a user's :class:`Scheduler` subclass (wins over ``name``)."""

    name: str = "fixed"
    _target_: str | None = None


class Scheduler(ABC):
    """Chooses ``ℓ_b`` ``[B]`` drafts to verify per request from a proposal.

    Args:
        config: the ``scheduler`` section; target: the target model (for profiling);
        model_name: its name or path (recorded in, and checked against, cost tables).
    """

    config_class = SchedulerConfig
    needs_confidence = False  # whether the proposal must carry confidences

    def __init__(self, config: SchedulerConfig | None = None, *, target=None, model_name: str = ""):
        self.config = config or self.config_class()
        self.target, self.model_name = target, model_name

    @abstractmethod
    def schedule(self, proposal: DraftProposal, active: torch.Tensor) -> torch.Tensor:
        """``[B]`` int64 drafts to verify, ``0 ≤ ℓ_b ≤ proposal.num_tokens[b]``, 0 where not ``active``."""

    def reset(self) -> None:
        """A new batch starts decoding (forget per-batch state)."""

    def forget(self) -> None:
        """Forget what earlier rounds taught (measured round times, estimated acceptance), as after
        :meth:`~dspark.session.Session.warm_up`, whose rounds of dummy requests — compiling as
        they go — must not count."""

    def compile(self, device) -> None:
        """Compile what :meth:`schedule` computes on ``device`` every round (called once when
        ``engine.compile`` is set); schedulers with little to compute keep it eager."""

    def wants_drafts(self, active: list[bool]) -> bool:
        """Whether this round drafts at all, decided before drafting from earlier rounds and the
        batch's load only (``active``: which of the batch's requests are unfinished). A round
        without drafts is a plain decoding step: lossless whatever the reason."""
        return True

    def observe(self, widest: int, offered: int) -> None:
        """After a drafted round was scheduled: the longest prefix verified and the most drafts
        any request offered (host ints)."""

    def record(self, num_verified: torch.Tensor, num_accepted: torch.Tensor) -> None:
        """After a drafted round was verified: ``ℓ_b`` and ``n_b`` ``[B]`` (device tensors, no sync)."""

    def timed(self, batch_size: int, drafted: bool, seconds: float, tokens_per_request: float) -> None:
        """After every round: whether it drafted, its wall time (host clock between the engine's status
        reads) and the tokens it emitted per request that was unfinished when it started."""

    def known_width(self) -> int | None:
        """The verify width (most drafts any request verifies) of the round just scheduled, when the
        scheduler knows it without reading the device; ``None``: the engine reads ``max ℓ_b``
        (one more host read per round) and reports it through :meth:`observe`."""
        return None

    def round_summary(self) -> torch.Tensor | None:
        """A small int64 device tensor to read with the engine's per-round status read (no extra
        synchronisation), handed back to :meth:`summary_read`; ``None``: nothing to read."""
        return None

    def summary_read(self, values: list[int]) -> None:
        """The host values of the last :meth:`round_summary`, after the round."""


SCHEDULERS: Registry = Registry("scheduler", Scheduler)
register_scheduler = SCHEDULERS.register


@register_scheduler("fixed")
class FixedScheduler(Scheduler):
    """Verify every offered draft."""

    def schedule(self, proposal: DraftProposal, active: torch.Tensor) -> torch.Tensor:
        return torch.where(active, proposal.num_tokens, 0)


@dataclass
class ThresholdConfig(SchedulerConfig):
    """``threshold``: verify the longest prefix whose survival stays high enough.

    Attributes:
        threshold: verify drafts 1..j while their survival ``a_{b,j} = Π_{i≤j} c_{b,i}`` is ≥ this, in [0, 1].
    """

    name: str = "threshold"
    threshold: float = 0.5

    def __post_init__(self):
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"scheduler.threshold must be in [0, 1], got {self.threshold}")


@register_scheduler("threshold")
class ThresholdScheduler(Scheduler):
    """Static confidence threshold on the survival of each prefix (per request, load-blind)."""

    config_class = ThresholdConfig
    needs_confidence = True

    def schedule(self, proposal: DraftProposal, active: torch.Tensor) -> torch.Tensor:
        lengths = threshold_lengths(survival(proposal.confidence), proposal.num_tokens, self.config.threshold)
        return torch.where(active, lengths, 0)


def prefix_lengths(confidence: torch.Tensor, num_tokens: torch.Tensor, active: torch.Tensor, counts: torch.Tensor,
                   values: torch.Tensor, *, padded: bool, early_stop: bool = True) -> torch.Tensor:
    """:func:`~dspark.scheduling.throughput_lengths` on the survivals of ``confidence`` ``[R, γ]``,
    costed by a throughput table (``counts``, ``values``: float64 ``[N]``, see
    :meth:`ThroughputProfile.table`) → ``[R]``. A function of tensors only, so that
    ``engine.compile`` compiles the whole choice into one call."""
    sps = lambda tokens: interpolate_sps(tokens, counts, values)  # noqa: E731
    return throughput_lengths(survival(confidence), num_tokens, active, sps, early_stop=early_stop, padded=padded)


@dataclass
class DSparkSchedulerConfig(SchedulerConfig):
    """``dspark``: the hardware-aware prefix scheduler (DSpark, Algorithm 1).

    Attributes:
        profile: a cost table written by ``dspark profile`` (JSON); ``null`` measures the target
            when the first round needs it.
        profile_tokens: the token counts measured when profiling here.
        cost: ``padded`` — the verify forward is ``[B, 1 + max ℓ]`` (dspark's engine), so drafts are
            admitted by whole depths; ``tokens`` — it costs ``B + Σ ℓ`` tokens (a ragged engine,
            as in the paper), drafts admitted one by one. See :func:`~dspark.scheduling.throughput_lengths`.
        idle_backoff: after a round in which no draft was worth verifying, skip drafting for
            1, 2, 4, … rounds (at most this many) before drafting again, so that under heavy load
            decoding falls back to plain steps instead of paying for drafts nobody verifies; 0
            drafts every round.
        measured_fallback: time every round and draft only while drafted rounds emit more tokens
            per second than plain ones at this batch size, probing the slower kind now and then
            (:class:`~dspark.scheduling.skipping.MeasuredFallback`): what the cost table leaves out
            (the drafter's own forward, per-round overhead) is then paid only where it pays off.
            Decisions then depend on wall time, so sampled outputs for a seed are exact in
            distribution but not reproducible run to run; ``false`` for reproducible runs.
        fallback_window: recent rounds of each kind whose rate (tokens over seconds, outliers in
            time left out) is compared.
        fallback_probe_limit: most rounds of the faster kind between probes of the slower.
    """

    name: str = "dspark"
    profile: str | None = None
    profile_tokens: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 128])
    cost: str = "padded"
    idle_backoff: int = 16
    measured_fallback: bool = True
    fallback_window: int = 6
    fallback_probe_limit: int = 256

    def __post_init__(self):
        if self.cost not in ("padded", "tokens"):
            raise ValueError(f"scheduler.cost must be 'padded' or 'tokens', got {self.cost!r}")
        if self.idle_backoff < 0:
            raise ValueError(f"scheduler.idle_backoff must be >= 0 (0 = always draft), got {self.idle_backoff}")
        if self.fallback_window < MeasuredFallback.MIN_SAMPLES:
            raise ValueError(f"scheduler.fallback_window must be >= {MeasuredFallback.MIN_SAMPLES}, "
                             f"got {self.fallback_window}")
        if self.fallback_probe_limit < 1:
            raise ValueError(f"scheduler.fallback_probe_limit must be >= 1, got {self.fallback_probe_limit}")


@register_scheduler("dspark")
class DSparkScheduler(Scheduler):
    """Admit drafts across the batch in order of survival while the expected throughput
    ``τ · SPS(B)`` rises; stop at the first that does not (the early stop keeps it lossless).
    Before drafting, skip the round (a plain step) when no draft could pay at this load, after
    idle rounds, or while drafting is measured not to pay (:mod:`dspark.scheduling.skipping`)."""

    config_class = DSparkSchedulerConfig
    needs_confidence = True

    def __init__(self, config: DSparkSchedulerConfig | None = None, *, target=None, model_name: str = ""):
        super().__init__(config, target=target, model_name=model_name)
        self.backoff = IdleBackoff(self.config.idle_backoff)
        self.fallback = (MeasuredFallback(self.config.fallback_window, self.config.fallback_probe_limit)
                         if self.config.measured_fallback else None)
        self.profile: ThroughputProfile | None = None
        self._can_pay: dict[tuple[int, int], bool] = {}
        self._lengths = prefix_lengths  # compiled by compile()
        if self.config.profile is not None:
            self.profile = ThroughputProfile.load(self.config.profile)
            if target is not None:
                self.profile.check_matches(model_name, str(target.dtype).removeprefix("torch."))

    def cost_table(self) -> ThroughputProfile:
        """The cost table: loaded from ``profile``, or measured on the target at first use."""
        if self.profile is None:
            self.profile = profile_target(self.target, tuple(self.config.profile_tokens), model_name=self.model_name)
        return self.profile

    def schedule(self, proposal: DraftProposal, active: torch.Tensor) -> torch.Tensor:
        return self.lengths(proposal, active)

    def lengths(self, proposal: DraftProposal, active: torch.Tensor, *, early_stop: bool = True) -> torch.Tensor:
        """:func:`prefix_lengths` of the proposal's confidences under this scheduler's cost table."""
        counts, values = self.cost_table().table(proposal.tokens.device)
        return self._lengths(proposal.confidence, proposal.num_tokens, active, counts, values,
                             padded=self.config.cost == "padded", early_stop=early_stop)

    def compile(self, device) -> None:
        # ~0.3 ms of small eager ops a round at batch 1 on a 2-core CPU, ~0.08 ms compiled
        self._lengths = compile_forward(prefix_lengths, device)

    def reset(self) -> None:
        self.backoff.reset()

    def forget(self) -> None:
        self.reset()
        if self.fallback is not None:
            self.fallback.arms.clear()

    def wants_drafts(self, active: list[bool]) -> bool:
        if self.profile is not None and not self.any_draft_can_pay(len(active), sum(active)):
            return False
        if self.fallback is not None and not self.fallback.wants_drafts(len(active)):
            return False
        return self.backoff.wants_drafts()

    def any_draft_can_pay(self, batch_size: int, num_active: int) -> bool:
        """Whether the first admission could raise Θ even if every confidence were 1: otherwise no
        draft is ever verified at this load, and drafting is skipped without looking.

        Padded: depth 1 brings at most ``num_active`` tokens for ``batch_size`` more in the forward,
        ``2·R_a·SPS(2R) > R_a·SPS(R)``; per token: ``(R_a + 1)·SPS(R_a + 1) > R_a·SPS(R_a)``."""
        if num_active == 0:
            return False
        key = (batch_size, num_active if self.config.cost == "tokens" else 0)
        if key not in self._can_pay:  # the table is fixed once loaded: one lookup per load
            self._can_pay[key] = self._first_admission_can_pay(batch_size, num_active)
        return self._can_pay[key]

    def _first_admission_can_pay(self, batch_size: int, num_active: int) -> bool:
        if self.config.cost == "padded":
            now, then, gain = float(batch_size), 2.0 * batch_size, 2.0
        else:
            now, then, gain = float(num_active), num_active + 1.0, (num_active + 1.0) / num_active
        sps = self.cost_table().sps(torch.tensor([now, then], dtype=torch.float64)).tolist()
        return gain * sps[1] > sps[0]

    def observe(self, widest: int, offered: int) -> None:
        self.backoff.observe(widest, offered)

    def timed(self, batch_size: int, drafted: bool, seconds: float, tokens_per_request: float) -> None:
        if self.fallback is not None:
            self.fallback.timed(batch_size, drafted, seconds, tokens_per_request)


@dataclass
class AsyncDSparkSchedulerConfig(DSparkSchedulerConfig):
    """``dspark_async``: the asynchronous variant of the ``dspark`` scheduler (same keys)."""

    name: str = "dspark_async"


@register_scheduler("dspark_async")
class AsyncDSparkScheduler(DSparkScheduler):
    """The paper's asynchronous variant (DSpark, §5.2): the round's *capacity* — the verify width
    (padded cost) or the number of drafts verified (per-token cost) — comes from the previous
    drafted round's confidences, by a search over the whole admission path (no early stop); this
    round's drafts only fill it, most likely first (:func:`~dspark.scheduling.top_k_lengths`).

    The capacity is computed on the device when a round is scheduled and read with the engine's
    status read at the end of that round, so the next round knows its verify width before drafting
    — no second host read per round, and a width fixed in advance (what zero-overhead scheduling
    and graph replay want). The global search would be lossy on the round it looks at (see
    :func:`~dspark.scheduling.throughput_lengths`); applied to a later round it is not, because
    the capacity is fixed before that round's drafts exist and filling by rank never lets a draft
    decide whether it is itself verified. A batch's first drafted round, with no capacity yet,
    uses the synchronous rule. A capacity of 0 counts as an idle round for the backoff.
    """

    config_class = AsyncDSparkSchedulerConfig

    def __init__(self, config: AsyncDSparkSchedulerConfig | None = None, *, target=None, model_name: str = ""):
        super().__init__(config, target=target, model_name=model_name)
        self.reset()

    def reset(self) -> None:
        super().reset()
        self.capacity: int | None = None  # from the last drafted round (host int)
        self._width: int | None = None  # the verify width of the round being scheduled
        self._next: torch.Tensor | None = None  # the capacity found from this round (device scalar)

    def schedule(self, proposal: DraftProposal, active: torch.Tensor) -> torch.Tensor:
        padded = self.config.cost == "padded"
        search = self.lengths(proposal, active, early_stop=False)  # lossy for this round: used for the next one only
        self._next = search.max() if padded else search.sum()
        if self.capacity is None:
            self._width = None
            return super().schedule(proposal, active)
        self._width = min(self.capacity, proposal.gamma)
        if padded:  # every offered draft up to the depth is paid for
            return torch.where(active, proposal.num_tokens.clamp(max=self._width), 0)
        return top_k_lengths(survival(proposal.confidence), proposal.num_tokens, active, self.capacity)

    def known_width(self) -> int | None:
        return self._width

    def round_summary(self) -> torch.Tensor | None:
        found, self._next = self._next, None
        return None if found is None else found.view(1).long()

    def summary_read(self, values: list[int]) -> None:
        if self._width is not None:  # a synchronous round already told the backoff what it verified
            self.backoff.observe(values[0])
        self.capacity = values[0]


@dataclass
class AdaptiveSchedulerConfig(DSparkSchedulerConfig):
    """``adaptive``: the hardware-aware scheduler for drafters without a confidence head.

    Attributes:
        decay: weight of the past in the running per-position acceptance counts (per round).
        prior: acceptance assumed at a position with no data (one pseudo-observation).
    """

    name: str = "adaptive"
    decay: float = 0.95
    prior: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"scheduler.decay must be in [0, 1), got {self.decay}")
        if not 0.0 < self.prior < 1.0:
            raise ValueError(f"scheduler.prior must be in (0, 1), got {self.prior}")


@register_scheduler("adaptive")
class AdaptiveScheduler(DSparkScheduler):
    """The ``dspark`` scheduler (cost, load bound, idle backoff) with confidences estimated from
    earlier rounds instead of read from the drafter: ``c_j`` is the running conditional
    acceptance at position j (decayed counts), the same for every request. The choice then does
    not depend on this round's drafts at all, so it is trivially lossless — and any drafter
    (``ngram``, ``draft_model``, ``eagle3``) becomes load-aware. While position 1 has less than one
    (decayed) observation, every offered request verifies at least one draft: the estimate must
    be able to learn that it was too low."""

    config_class = AdaptiveSchedulerConfig
    needs_confidence = False

    def __init__(self, config: AdaptiveSchedulerConfig | None = None, *, target=None, model_name: str = ""):
        super().__init__(config, target=target, model_name=model_name)
        self.reached: torch.Tensor | None = None  # [γ] decayed counts, float64
        self.accepted: torch.Tensor | None = None

    def forget(self) -> None:
        super().forget()
        self.reached = self.accepted = None

    def acceptance(self, gamma: int, device) -> torch.Tensor:
        """``[γ]`` the estimated conditional acceptance per position, ``(accepted + prior) / (reached + 1)``.
        The counts are kept at the widest proposal seen: a drafter that stops early offers narrower
        proposals in some rounds, and the positions they share keep what was learnt."""
        if self.reached is None:
            self.reached = torch.zeros(gamma, dtype=torch.float64, device=device)
            self.accepted = torch.zeros_like(self.reached)
        elif self.reached.shape[0] < gamma:
            more = self.reached.new_zeros(gamma - self.reached.shape[0])
            self.reached, self.accepted = torch.cat([self.reached, more]), torch.cat([self.accepted, more])
        return ((self.accepted + self.config.prior) / (self.reached + 1.0))[:gamma]

    def schedule(self, proposal: DraftProposal, active: torch.Tensor) -> torch.Tensor:
        confidence = self.acceptance(proposal.gamma, proposal.tokens.device).expand(proposal.tokens.shape[0], -1)
        lengths = super().schedule(replace(proposal, confidence=confidence), active)
        # explore: with less than one (decayed) observation of position 1, verify it anyway —
        # otherwise an estimate too low to verify anything could never learn it was wrong
        stale = self.reached[0] < 1.0
        return torch.where(stale & active & (proposal.num_tokens > 0), lengths.clamp(min=1), lengths)

    def record(self, num_verified: torch.Tensor, num_accepted: torch.Tensor) -> None:
        if self.reached is None:
            return
        reached, accepted = position_counts(num_verified, num_accepted, self.reached.shape[0])
        self.reached = self.config.decay * self.reached + reached
        self.accepted = self.config.decay * self.accepted + accepted
