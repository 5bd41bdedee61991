"""The small typed records that pass between the components of one decoding round.

Vocabulary (used everywhere in dspark):

* **anchor** — the last committed token of a request. It is not yet in the target's KV cache;
  each round feeds it to the target first.
* **draft tokens** ``x_1..x_ℓ`` — the drafter's proposal for the tokens after the anchor.
* **accepted tokens** — the longest prefix of the drafts that verification keeps.
* **recovered token** — after the first rejected draft ``x_k``, a token sampled from the residual
  ``norm(max(0, p_k − q_k))``; it replaces ``x_k``.
* **bonus token** — when every verified draft is accepted, a token sampled from ``p_{ℓ+1}``.

Every round emits the accepted tokens followed by exactly one recovered-or-bonus token, which
becomes the next anchor. Shapes use ``B`` = batch, ``γ`` = drafts per round (the drafter's
``num_speculative_tokens``), ``V`` = vocabulary, ``H`` = hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Sequence

import torch

if TYPE_CHECKING:
    from dspark.samplers.penalties import PenaltyHistory

MIN_TEMPERATURE = 1e-6
"""The smallest temperature above 0 accepted: logits of a few tens divided by much less overflow
float32. Greedy decoding is ``temperature = 0``."""

#: the largest top_k / no_repeat_ngram_size (int32's; a batch holds them in an integer column)
MAX_INTEGER_SETTING = 2**31 - 1
REPETITION_PENALTY_RANGE = (1e-6, 1e6)
"""The ``repetition_penalty`` values accepted: a logit divided (or multiplied) by one outside
overflows float32, leaving a distribution without mass (NaN, or every token at −∞)."""
#: the biases ``logit_bias`` may add (OpenAI's range)
LOGIT_BIAS_RANGE = (-100.0, 100.0)


@dataclass(frozen=True)
class SamplingParams:
    """How logits become the distribution tokens are drawn from (validated by :meth:`validate`).

    ``temperature == 0`` means greedy (argmax); ``top_k == 0`` and ``top_p == 1`` and
    ``min_p == 0`` disable those filters.

    The penalties (vLLM's and the OpenAI API's meaning; off at their defaults) change the logits
    before all of that, from each request's history: ``repetition_penalty`` ``r`` divides the
    positive logits and multiplies the negative ones of every token in the prompt or the output so
    far (transformers' ``repetition_penalty`` too); ``frequency_penalty`` subtracts ``f`` times the
    number of times a token occurs in the output so far, ``presence_penalty`` subtracts ``p`` once
    if it occurs there at all; ``no_repeat_ngram_size`` ``n`` (transformers') gives probability 0
    to every token that would repeat an n-gram of the prompt or the output
    (:mod:`dspark.samplers.penalties`). ``logit_bias`` (the OpenAI API's: ``(token id, bias)``
    pairs, biases in [-100, 100]) is added to those tokens' logits first.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    no_repeat_ngram_size: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()

    @property
    def greedy(self) -> bool:
        """True when decoding takes the argmax (temperature 0)."""
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """True when a penalty or a logit bias is on: the logits are adjusted before the sampler's
        processing (the penalties from each request's history)."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.no_repeat_ngram_size != 0 or bool(self.logit_bias))

    #: the settings of one request hold for every row: no row is greedy apart from the others
    #: (:class:`MixedSamplingParams` has a ``[B]`` mask here)
    greedy_rows = None

    @property
    def ngram_sizes(self) -> tuple[int, ...]:
        """The ``no_repeat_ngram_size`` values in force (none when 0)."""
        return (self.no_repeat_ngram_size,) if self.no_repeat_ngram_size else ()

    def validate(self) -> "SamplingParams":
        """Raise ``ValueError`` naming the bad parameter and the allowed range; return self."""
        t = self.temperature
        if (isinstance(t, bool) or not isinstance(t, (int, float)) or not (t == 0 or MIN_TEMPERATURE <= t < float("inf"))):
            # below MIN_TEMPERATURE, logits ÷ T overflows float32 (NaN probabilities); ask for greedy instead
            raise ValueError(f"temperature must be a number >= 0 (0 = greedy; otherwise finite and at least "
                             f"{MIN_TEMPERATURE:g}), got {t!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not 0 <= self.top_k <= MAX_INTEGER_SETTING:
            raise ValueError(f"top_k must be an integer in [0, {MAX_INTEGER_SETTING}] (0 = disabled; a k at least the "
                             f"vocabulary size keeps every token), got {self.top_k!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be a number in (0, 1] (1 = disabled), got {self.top_p!r}")
        if isinstance(self.min_p, bool) or not isinstance(self.min_p, (int, float)) or not (0.0 <= self.min_p <= 1.0):
            raise ValueError(f"min_p must be a number in [0, 1] (0 = disabled), got {self.min_p!r}")
        low, high = REPETITION_PENALTY_RANGE
        if (isinstance(self.repetition_penalty, bool) or not isinstance(self.repetition_penalty, (int, float))
                or not low <= self.repetition_penalty <= high):
            raise ValueError(f"repetition_penalty must be a number in [{low:g}, {high:g}] (1 = disabled), "
                             f"got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be a number in [-2, 2] (0 = disabled), got {value!r}")
        if (isinstance(self.no_repeat_ngram_size, bool) or not isinstance(self.no_repeat_ngram_size, int)
                or not 0 <= self.no_repeat_ngram_size <= MAX_INTEGER_SETTING):
            raise ValueError(f"no_repeat_ngram_size must be an integer in [0, {MAX_INTEGER_SETTING}] (0 = disabled), "
                             f"got {self.no_repeat_ngram_size!r}")
        if not isinstance(self.logit_bias, tuple) or not all(
                isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], int) and not isinstance(pair[0], bool)
                and pair[0] >= 0 and isinstance(pair[1], (int, float)) and not isinstance(pair[1], bool)
                and LOGIT_BIAS_RANGE[0] <= pair[1] <= LOGIT_BIAS_RANGE[1] for pair in self.logit_bias):
            raise ValueError("logit_bias must map token ids (integers >= 0) to biases in [-100, 100], as a tuple of "
                             f"(token id, bias) pairs (generate(logit_bias=...) takes a dict), got {self.logit_bias!r}")
        if len({token for token, _ in self.logit_bias}) != len(self.logit_bias):
            raise ValueError(f"logit_bias names a token twice: {self.logit_bias!r}")
        return self


class RowBias(NamedTuple):
    """Logit biases that differ between the requests of a batch: request ``b`` adds ``values[b, i]``
    to token ``index[b, i]``'s logit (rows padded with bias 0 on token 0).

    Attributes:
        index: ``[B, M]`` int64 token ids. values: ``[B, M]`` float64 biases.
    """

    index: torch.Tensor
    values: torch.Tensor


@dataclass(frozen=True, eq=False)
class MixedSamplingParams:
    """The sampling settings of a batch whose requests asked for different ones (vLLM takes one
    :class:`SamplingParams` per request). Built by :func:`batch_params`; the samplers, penalties,
    drafters and verifiers read it where they read a :class:`SamplingParams`.

    A setting that every request shares stays a Python number, exactly as in
    :class:`SamplingParams`; one that differs is a ``[B]`` tensor on the model's device (so at
    least one request has it on), broadcast over each row's logits with :func:`per_row`. (Compiled
    engines hold every setting that is on in a tensor, shared or not: ``batch_params(columns=True)``.) Greedy
    requests may share a batch with sampled ones: they are drawn from a one-hot distribution at the
    argmax (``greedy_rows``), which rejection sampling turns into greedy verification.

    Attributes:
        rows: the requests' own settings, in batch order (equality and hashing go by them: CUDA
            graphs are keyed on the settings).
        temperature: ``float`` or ``[B]`` float64 (1 in the greedy rows).
        top_k: ``int`` or ``[B]`` int64; ``top_k_max``: the largest of the rows rounded up to a power of two.
        top_p: and likewise ``min_p``, ``repetition_penalty``, ``presence_penalty``,
            ``frequency_penalty``: ``float`` or ``[B]`` float64.
        no_repeat_ngram_size: ``int`` or ``[B]`` int64; ``ngram_sizes``: its distinct non-zero values.
        logit_bias: ``(token, bias)`` pairs shared by every request, or a :class:`RowBias`.
        greedy: every request is greedy; ``greedy_rows``: ``[B]`` bool when some are and some are not.
        penalized: some request has a penalty or a logit bias.
    """

    rows: tuple[SamplingParams, ...]
    temperature: float | torch.Tensor
    top_k: int | torch.Tensor
    top_k_max: int
    top_p: float | torch.Tensor
    min_p: float | torch.Tensor
    repetition_penalty: float | torch.Tensor
    presence_penalty: float | torch.Tensor
    frequency_penalty: float | torch.Tensor
    no_repeat_ngram_size: int | torch.Tensor
    logit_bias: tuple[tuple[int, float], ...] | RowBias
    greedy: bool
    greedy_rows: torch.Tensor | None
    penalized: bool
    ngram_sizes: tuple[int, ...]

    def __eq__(self, other) -> bool:
        return isinstance(other, MixedSamplingParams) and self.rows == other.rows

    def __hash__(self) -> int:
        return hash(self.rows)


def batch_params(params: "SamplingParams | Sequence[SamplingParams]", batch_size: int, device=None,
                 columns: bool = False) -> "SamplingParams | MixedSamplingParams":
    """The settings of a batch of ``batch_size`` requests from one :class:`SamplingParams` for all,
    or one per request: the shared one when they all agree, else a :class:`MixedSamplingParams`
    (tensors on ``device``). Every request's settings are validated.

    ``columns``: every setting that is on becomes a ``[B]`` tensor even when the requests agree
    (``engine.compile`` asks for it: compiled code specialises on Python numbers, so a new
    temperature would recompile every compiled function; values held in tensors do not)."""
    rows = (params,) * batch_size if isinstance(params, SamplingParams) else tuple(params)
    if len(rows) != batch_size or not all(isinstance(row, SamplingParams) for row in rows):
        raise ValueError(f"expected one SamplingParams for the batch or one per request ({batch_size}), got {params!r}")
    for row in set(rows):
        row.validate()
    if all(row == rows[0] for row in rows) and not (columns and (not rows[0].greedy or rows[0].penalized)):
        return rows[0]  # (compiled engines: unless a setting is on)

    def column(name: str, dtype=torch.float64, values=None, off=None):
        values = [getattr(row, name) for row in rows] if values is None else values
        shared = all(v == values[0] for v in values) and not (columns and values[0] != off)
        return values[0] if shared else torch.tensor(values, dtype=dtype, device=device)

    greedy = [row.greedy for row in rows]
    if all(row.logit_bias == rows[0].logit_bias for row in rows) and not (columns and rows[0].logit_bias):
        bias = rows[0].logit_bias
    else:
        width = max(len(row.logit_bias) for row in rows)
        pad = lambda pairs: list(pairs) + [(0, 0.0)] * (width - len(pairs))  # noqa: E731
        bias = RowBias(torch.tensor([[t for t, _ in pad(row.logit_bias)] for row in rows], dtype=torch.long, device=device),
                       torch.tensor([[b for _, b in pad(row.logit_bias)] for row in rows], dtype=torch.float64,
                                    device=device))
    largest_k = max(row.top_k for row in rows)
    return MixedSamplingParams(
        rows=rows, temperature=column("temperature", values=[row.temperature or 1.0 for row in rows])
        if not all(greedy) else 0.0,
        # top_k_max rounded up to a power of two: fewer distinct values for compiled code to specialise on
        top_k=column("top_k", torch.long, off=0), top_k_max=1 << (largest_k - 1).bit_length() if largest_k else 0,
        top_p=column("top_p", off=1.0), min_p=column("min_p", off=0.0),
        repetition_penalty=column("repetition_penalty", off=1.0), presence_penalty=column("presence_penalty", off=0.0),
        frequency_penalty=column("frequency_penalty", off=0.0),
        no_repeat_ngram_size=column("no_repeat_ngram_size", torch.long, off=0), logit_bias=bias, greedy=all(greedy),
        greedy_rows=torch.tensor(greedy, device=device) if any(greedy) and not all(greedy) else None,
        penalized=any(row.penalized for row in rows),
        ngram_sizes=tuple(sorted({row.no_repeat_ngram_size for row in rows} - {0})))


def per_row(value, like: torch.Tensor):
    """A setting as it applies to ``like`` ``[B, ..., V]``: a number as it is, a ``[B]`` tensor viewed
    as ``[B, 1, ..., 1]`` (floating settings in ``like``'s dtype)."""
    if not isinstance(value, torch.Tensor):
        return value
    if value.is_floating_point():
        value = value.to(like.dtype)
    return value.view(-1, *([1] * (like.dim() - 1)))


def is_on(value, off) -> bool:
    """Whether a setting does something in some row: a number other than ``off``, or a tensor
    (settings differ between rows only as tensors, so some row is not ``off``)."""
    return isinstance(value, torch.Tensor) or value != off


@dataclass
class DraftProposal:
    """What a drafter proposes for one round.

    Attributes:
        tokens: ``[B, γ]`` int64 draft tokens ``x_1..x_γ``; entries past ``num_tokens[b]`` are padding.
            A drafter that stopped early may return fewer columns (``max ℓ_b`` of them; so do the
            other fields).
        num_tokens: ``[B]`` int64, ``ℓ_b ≤ γ`` drafts that request ``b`` offers (0 for finished requests).
        probs: ``[B, γ, V]`` float draft distributions ``q_k`` the tokens were sampled from, after the
            sampler's processing; ``None`` for deterministic drafters (``q`` is one-hot at ``tokens``).
        confidence: ``[B, γ]`` float predicted acceptance per position, or ``None``.
    """

    tokens: torch.Tensor
    num_tokens: torch.Tensor
    probs: torch.Tensor | None = None
    confidence: torch.Tensor | None = None

    @property
    def gamma(self) -> int:
        """γ, the width of the proposal."""
        return self.tokens.shape[1]


@dataclass
class VerificationResult:
    """What the verifier decided for one round.

    Attributes:
        num_accepted: ``[B]`` int64 accepted drafts ``n_b ≤ ℓ_b``.
        tokens: ``[B, γ+1]`` int64: the accepted drafts in ``[:, :n_b]`` and the recovered or bonus
            token at ``[:, n_b]``; entries after that are padding. A round emits ``n_b + 1`` tokens.
    """

    num_accepted: torch.Tensor
    tokens: torch.Tensor


@dataclass
class ModelOutput:
    """A forward pass of a language model over ``T`` new tokens per request.

    Attributes:
        logits: ``[B, K, V]`` float logits at the requested positions (``K = T`` unless the caller
            asked for a subset with ``logits_positions``).
        hidden_states: one ``[B, T, H]`` tensor per requested layer id (outputs of those decoder
            layers, before the final norm), in the order requested.
    """

    logits: torch.Tensor
    hidden_states: list[torch.Tensor] = field(default_factory=list)


@dataclass
class DecodingState:
    """Per-request state of a batch being decoded; every tensor lives on the model's device.

    Attributes:
        tokens: ``[B, W]`` int64 prompt followed by the generated tokens (right-padded).
        prompt_lengths: ``[B]`` int64 prompt length ``P_b``.
        lengths: ``[B]`` int64 committed tokens ``P_b + generated_b``; the anchor is
            ``tokens[b, lengths[b] - 1]``.
        done: ``[B]`` bool, request finished (EOS or ``max_new_tokens``).
        max_new_tokens: the call's largest generation budget (a Python int; the requests' own
            budgets may be smaller).
        params: the sampling settings of the batch (:func:`batch_params`: one
            :class:`SamplingParams` shared by every request, or a :class:`MixedSamplingParams`).
        max_cache_len: host-side upper bound on the target cache's longest length, refreshed by the
            engine's one synchronisation per round (drafters size their forwards with it).
        penalties: with penalties in ``params``, each request's history as the penalties read it,
            refreshed by the engine before every round
            (:class:`~dspark.samplers.penalties.PenaltyHistory`); else ``None``.
    """

    tokens: torch.Tensor
    prompt_lengths: torch.Tensor
    lengths: torch.Tensor
    done: torch.Tensor
    max_new_tokens: int
    params: "SamplingParams | MixedSamplingParams"
    max_cache_len: int = 0
    penalties: "PenaltyHistory | None" = None

    @property
    def batch_size(self) -> int:
        """B."""
        return self.tokens.shape[0]

    @property
    def anchor(self) -> torch.Tensor:
        """``[B]`` the last committed token of each request."""
        return self.tokens.gather(1, (self.lengths - 1).unsqueeze(1)).squeeze(1)

    @property
    def num_generated(self) -> torch.Tensor:
        """``[B]`` tokens generated so far."""
        return self.lengths - self.prompt_lengths
