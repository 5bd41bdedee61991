"""A batch being decoded and its requests: :class:`Request` (what one asks for), :class:`Batch`
(its slots, the state on the device, what is known of each request), :class:`Scores` (the
log-probabilities asked for), and the per-request settings' helpers."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field, replace

import torch

from dspark.engine.stopping import Stopper, TokenStream
from dspark.prefix_cache import HiddenHistory, SlotPrefixes
from dspark.records import DecodingState, SamplingParams, batch_params
from dspark.samplers.penalties import PenaltyHistory
from dspark.stats import RoundCounters
from dspark.structured import GrammarRows


@dataclass
class Scores:
    """The log-probabilities an :meth:`Engine.generate` call was asked for (``None`` otherwise),
    all under the target's own distribution (its log-softmax), one list per request.

    Attributes:
        tokens: each generated token's. top: at each generated position, the ``k`` likeliest tokens
            as ``(token id, log-probability)`` pairs, likeliest first. prompt: each prompt token's
            given the ones before it (``None`` for the first). prompt_top: at each prompt position,
            the ``k`` likeliest tokens there (``None`` for the first).
    """

    tokens: list[list[float]] | None = None
    top: list[list[list[tuple[int, float]]]] | None = None
    prompt: list[list[float | None]] | None = None
    prompt_top: list[list[list[tuple[int, float]] | None]] | None = None

    def extend(self, other: "Scores") -> None:
        """Append the requests of ``other`` (the next static batch of the same call)."""
        for name in ("tokens", "top", "prompt", "prompt_top"):
            if getattr(other, name) is not None:
                setattr(self, name, (getattr(self, name) or []) + getattr(other, name))


@dataclass
class Request:
    """One request of a batch (:meth:`Engine.request`): its prompt and what it asks for
    (``stop_ids``: EOS unless it ignores it, then its stop tokens; ``logprobs``: −1 none, ``k ≥ 0``
    its tokens' log-probabilities and the ``k`` likeliest tokens at each position, ``None`` the
    batch's setting; ``prompt_logprobs`` likewise for its prompt's tokens; ``grammar``: a compiled
    grammar its output follows, :mod:`dspark.structured`)."""

    prompt: list[int]
    budget: int
    params: SamplingParams
    seed: int
    stop_ids: tuple[int, ...]
    min_new: int
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    grammar: object | None = None

    def released(self) -> "Request":
        """The same request without its prompt (a finished one whose output was read)."""
        return replace(self, prompt=[])


@dataclass
class Batch:
    """A batch being decoded (:meth:`Engine.open_batch`): its state on the device, which request
    each slot (row) holds (``holder``, −1: none) with that request's generator and settings, the
    requests added so far (in order; ``waiting``: those not admitted yet, in order) and what is
    known of them (``outputs``, ``scores``, ``first_token`` / ``finished``: seconds since
    ``started``; ``None`` until known), and what each slot's rows still hold of the last prompt
    prefilled into them (``prefixes``: :class:`~dspark.prefix_cache.SlotPrefixes`)."""

    state: DecodingState
    cache: object
    max_len: int
    lookahead: int
    stopper: "Stopper"
    counters: RoundCounters
    stream: "TokenStream | None"
    logprobs: bool
    top_logprobs: int
    prompt_logprobs: bool
    started: float | None  # request timings count from here (default: when the batch opened)
    prompt_top_logprobs: int = 0
    requests: list = field(default_factory=list)
    waiting: deque = field(default_factory=deque)
    outputs: list = field(default_factory=list)
    scores: Scores = field(init=False)
    first_token: list = field(default_factory=list)
    finished: list = field(default_factory=list)
    aborted: set = field(default_factory=set)
    errors: dict = field(default_factory=dict)  # request → why it ended for lack of a distribution (finish reason "error")
    prefill_time: float = 0.0
    round_started: float = 0.0
    drafter_started: bool = False
    drafter_rows: int = 0  # the slots the drafter serves rounds over (Drafter.use_rows)
    prefilling: dict = field(default_factory=dict)  # slot → the request whose prompt goes in in chunks
    prefilled_to: dict = field(default_factory=dict)  # slot → the positions its chunks hold so far
    chunked: bool = False  # whether the last step prefilled a chunk
    counted: set = field(default_factory=set)  # requests whose prompts the prefix-cache figures hold already
    history: HiddenHistory | None = None  # the target's hidden states over outputs (EngineConfig.reuse_outputs)
    grammars: GrammarRows | None = None  # the constrained requests' matchers (made at the first such admission)

    def __post_init__(self):
        slots = self.state.batch_size
        self.holder, self.generators, self.slot_params = [-1] * slots, [None] * slots, [None] * slots
        self.param_rows: list = []  # every slot's settings as the state's params hold them
        self.heads: dict[int, tuple[DecodingState, object]] = {}  # (head, since the last admission)
        self.status = [1] * slots  # the last status read (every slot free)
        self.opened = time.perf_counter()  # the batch's wall time counts from here
        self.started = self.opened if self.started is None else self.started
        self.prefixes = SlotPrefixes(slots)  # what each slot's rows hold of its last prompt
        self.scores = Scores(tokens=[] if self.logprobs else None, top=[] if self.logprobs and self.top_logprobs else None,
                             prompt=[], prompt_top=[])  # (prompt scores: per request, None where not asked)

    def add(self, request: Request) -> int:
        """Queue a request (it joins at the next :meth:`Engine.step` that finds a slot free);
        returns its index in the batch."""
        if len(request.prompt) + request.budget + self.lookahead > self.max_len:
            raise ValueError(f"prompt ({len(request.prompt)} tokens) + max_new_tokens ({request.budget}) + one round of "
                             f"lookahead ({self.lookahead}) needs {len(request.prompt) + request.budget + self.lookahead} "
                             f"positions, more than the batch's {self.max_len} per request")
        if request.prompt_logprobs is None:
            request = replace(request, prompt_logprobs=self.prompt_top_logprobs if self.prompt_logprobs else -1)
        if request.logprobs is None:
            request = replace(request, logprobs=self.top_logprobs if self.logprobs else -1)
        elif request.logprobs >= 0 and not self.logprobs:
            raise ValueError("this batch records no log-probabilities: open it with logprobs=True (and top_logprobs=K "
                             "for the likeliest tokens) for requests to ask for them")
        elif request.logprobs > self.top_logprobs:
            raise ValueError(f"top_logprobs={request.logprobs} is more than this batch records ({self.top_logprobs}: "
                             "open it with a larger top_logprobs)")
        self.requests.append(request)
        self.waiting.append(len(self.requests) - 1)
        for results in (self.outputs, self.first_token, self.finished, *(
                r for r in (self.scores.tokens, self.scores.top, self.scores.prompt, self.scores.prompt_top)
                if r is not None)):
            results.append(None)
        self.counters.grow(len(self.requests))
        return len(self.requests) - 1

    def head(self, rows: int, columns: bool) -> tuple[DecodingState, object]:
        """The state and the target cache of the first ``rows`` slots, for a round over them alone:
        views (the round's writes land in the batch's own tensors) with those rows' sampling
        settings (``columns``: :func:`~dspark.records.batch_params`'s). The state's per-round fields
        (``max_cache_len``, ``penalties``' prompt flags) are the batch's at the time of the call."""
        state = self.state
        if rows == state.batch_size:
            return state, self.cache
        if rows not in self.heads:
            params = batch_params(self.param_rows[:rows], rows, state.tokens.device, columns=columns)
            self.heads[rows] = (DecodingState(tokens=state.tokens[:rows], prompt_lengths=state.prompt_lengths[:rows],
                                              lengths=state.lengths[:rows], done=state.done[:rows],
                                              max_new_tokens=0, params=params), self.cache.head(rows))
        head, cache = self.heads[rows]
        head.max_new_tokens, head.max_cache_len = state.max_new_tokens, state.max_cache_len
        penalties = state.penalties
        head.penalties = None if penalties is None else PenaltyHistory(
            penalties.counts[:rows], penalties.in_prompt[:rows], penalties.tokens[:rows], penalties.lengths[:rows])
        return head, cache

    @property
    def running(self) -> int:
        """Requests in a slot and not finished yet (as the last status read shows)."""
        return sum(1 for b, request in enumerate(self.holder) if request >= 0 and not self.status[b])

    @property
    def unfinished(self) -> int:
        """Requests added and not finished yet (waiting ones, and those being prefilled in chunks,
        included)."""
        return len(self.waiting) + len(self.prefilling) + self.running

    def check_request(self, request, where: str = "batch", none: str = "none added yet") -> None:
        """``ValueError`` naming ``request`` unless it is the id of a request added to this batch
        (``where`` / ``none``: how the caller names the batch and its having no requests). Ids are
        ints: True and 1.0 equal 1, and are refused."""
        if isinstance(request, bool) or not isinstance(request, int) or not 0 <= request < len(self.requests):
            known = f"ids 0..{len(self.requests) - 1}" if self.requests else none
            raise ValueError(f"no request {request!r} in this {where} ({known})")

    def finish_reason(self, request: int) -> str:
        """Why a finished request ended: ``"abort"`` (:meth:`Engine.abort`), ``"error"`` (its next
        token's distribution had no mass: :attr:`errors` says why), ``"stop"`` (EOS, one of its
        stop tokens, or its stop check: a stop string) or ``"length"`` (its budget)."""
        ids = self.outputs[request]
        if request in self.aborted:
            return "abort"
        if request in self.errors:
            return "error"
        if (self.stream is not None and request in self.stream.stopped) or (
                ids and ids[-1] in self.requests[request].stop_ids):
            return "stop"
        return "length"

    def mark_finished(self, now: float) -> None:
        """Note ``now`` for each request the last status read shows done for the first time."""
        for b, request in enumerate(self.holder):
            if request >= 0 and self.status[b] and self.finished[request] is None:
                self.finished[request] = now - self.started


def per_request(value, batch: int) -> list:
    """A setting given once for all requests (a number or bool: a budget, ``min_new_tokens``,
    ``ignore_eos``) or as a list, one per request."""
    return list(value) if isinstance(value, (list, tuple)) else [value] * batch


def request_stop_ids(eos_token_ids: tuple[int, ...], ignore_eos, stop_token_ids, batch: int) -> list[tuple[int, ...]]:
    """Each request's stop ids — EOS unless it ignores it, then its stop tokens
    (``stop_token_ids``: one id list for all, or one per request)."""
    listed = bool(stop_token_ids) and isinstance(stop_token_ids[0], (list, tuple))
    if listed and len(stop_token_ids) != batch:
        raise ValueError(f"stop_token_ids has {len(stop_token_ids)} lists for {batch} prompts: give one per prompt")
    ignore_eos = per_request(ignore_eos, batch)
    if len(ignore_eos) != batch:
        raise ValueError(f"ignore_eos has {len(ignore_eos)} entries for {batch} prompts: give one per prompt")
    return [(() if ignore else eos_token_ids) + tuple(int(t) for t in (stop_token_ids[b] if listed else stop_token_ids))
            for b, ignore in enumerate(ignore_eos)]


def check_some_token_allowed(stops: list[tuple[int, ...]], min_new: list[int], vocab_size: int) -> None:
    """Refuse a request whose stop ids (EOS included) cover the whole vocabulary while
    ``min_new_tokens`` holds them back: its first token would have no token to be."""
    for i, (ids, held) in enumerate(zip(stops, min_new)):
        if held and len({t for t in ids if 0 <= t < vocab_size}) >= vocab_size:
            raise ValueError(f"{f'request {i}: ' if len(stops) > 1 else ''}its stop tokens (EOS included) are the whole vocabulary of {vocab_size} "
                             f"tokens, so min_new_tokens={held} leaves no token to generate; stop on fewer tokens "
                             "or set min_new_tokens=0")


def draw_uniforms(generators: list[torch.Generator], active: list[bool], count: int, device) -> torch.Tensor:
    """``[B, count]`` uniforms in [0, 1); each active request draws from its own generator, finished
    requests draw nothing (their rows are zeros), so a request's stream never depends on the batch."""
    uniforms = torch.zeros(len(generators), count, device=device)
    for b, generator in enumerate(generators):
        if active[b] and count:
            uniforms[b].uniform_(generator=generator)
    return uniforms
