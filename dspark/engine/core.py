"""The engine's loop: prefill, then speculative rounds until every request is done.

One round, for a batch of ``B`` requests (vocabulary of anchor / draft / accepted / recovered /
bonus tokens in :mod:`dspark.records`):

1. **draft** — the drafter proposes ``x_1..x_γ`` after each anchor;
2. **schedule** — choose how many drafts to verify per request (the scheduler; it may also
   skip drafting for a round, which is then a plain decoding step);
3. **verify forward** — one target forward over ``[anchor, x_1..x_ℓ]`` per request;
4. **verify** — the verifier keeps ``n_b`` drafts and picks the recovered or bonus token;
5. **accept** — append the ``n_b + 1`` tokens, stopping at EOS or ``max_new_tokens``;
6. **roll back** — the target cache keeps the anchor and the accepted drafts; the drafter
   drops its rejected state.

All loop state lives on the model's device; the host reads one small tensor per round (which
requests are done, the longest cache, the tokens emitted so far, and anything the scheduler asks
for) — the only synchronisation in the loop (a scheduler that does not know the verify width in
advance adds one more). The time between two reads is the round's wall time, which the scheduler
may use to decide whether later rounds draft.
"""

from __future__ import annotations

import logging
import time
from itertools import islice
from dataclasses import replace
from typing import Callable, Sequence

import torch

from dspark.cache import CacheConfig, KVCache, StaticKVCache
from dspark.drafters import Drafter
from dspark.engine.batch import (Batch, Request, Scores, check_some_token_allowed, draw_uniforms, per_request,
                                 request_stop_ids)
from dspark.engine.config import EngineConfig
from dspark.engine.prefill import Admission
from dspark.engine.stopping import Stopper, TokenStream
from dspark.models.compiled import compile_forward
from dspark.models.graphs import GraphedForward
from dspark.prefix_cache import HiddenHistory
from dspark.records import DecodingState, DraftProposal, SamplingParams
from dspark.samplers import Sampler
from dspark.samplers.penalties import PenaltyHistory
from dspark.scheduling.prefix import survival
from dspark.scheduling.schedulers import FixedScheduler, Scheduler
from dspark.stats import GenerationStats, RoundCounters
from dspark.structured import GrammarRows, constrain, with_forced
from dspark.verifiers import Verifier

log = logging.getLogger(__name__)


class Engine(Admission):
    """Runs batched speculative (or plain, with the ``none`` drafter) decoding.

    Args:
        target: the target model (a dspark model: ``forward(input_ids, cache, num_new, …)``).
        drafter, verifier, sampler: the round's components.
        scheduler: how many drafts each request verifies (default: all of them,
            :class:`~dspark.scheduling.FixedScheduler`); any other scheduler makes the verify forward
            as wide as the longest scheduled prefix, at the cost of one more host read per round.
        cache_class: the :class:`~dspark.cache.KVCache` subclass for the target (default: static).
        cache_config, engine_config: the ``cache`` and ``engine`` config sections.
        eos_token_ids: tokens that end a request (may be empty).
    """

    def __init__(self, target, drafter: Drafter, verifier: Verifier, sampler: Sampler, *,
                 scheduler: Scheduler | None = None, cache_class=None, cache_config: CacheConfig | None = None,
                 engine_config: EngineConfig | None = None, eos_token_ids: list[int] | tuple[int, ...] = ()):
        self.target = target
        self.drafter = drafter
        self.verifier = verifier
        self.sampler = sampler
        self.scheduler = scheduler or FixedScheduler()
        #: callables ``hook(proposal, result, active)`` run after every round with the scheduled
        #: proposal, the verification result (before EOS / budget truncation) and the ``[B]`` mask of
        #: requests that took part — e.g. ``dspark calibrate`` records confidences and acceptances
        self.round_hooks: list = []
        self.cache_config = cache_config or CacheConfig()
        self.cache_class = cache_class or StaticKVCache
        self.config = engine_config or EngineConfig()
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        self.device = target.device
        self._cache = None
        self._live: Batch | None = None  # the batch that owns the cache and the drafter's state
        forward = compile_forward(target, target.device) if self.config.compile else target
        if self.config.compile:
            drafter.compile()
            self.scheduler.compile(target.device)
        if self.config.cuda_graphs:
            if torch.device(self.device).type != "cuda" or self.cache_class is not StaticKVCache:
                raise ValueError("engine.cuda_graphs needs a CUDA target (target.device=cuda) with the static "
                                 f"cache; this target is on {self.device} with {self.cache_class.__name__}")
            forward = GraphedForward(forward, drafter.gamma + 1)
            drafter.use_graphs()
        self._round_forward = forward
        refusal = ([] if drafter.can_admit else [f"the {type(drafter).__name__} drafter does not implement admit()"]) + (
            [] if self.cache_class.rows is not KVCache.rows else [f"the {self.cache_class.__name__} cache has no row views"])
        if self.config.batching == "continuous" and refusal:
            raise ValueError(f"engine.batching=continuous cannot run here: {' and '.join(refusal)}; "
                             "use engine.batching=static (or auto)")
        #: whether requests take finished requests' slots between rounds (:attr:`EngineConfig.batching`)
        self.continuous = self.config.batching != "static" and not refusal
        #: whether requests of one prompt admitted together share one prefill (the cache copies rows
        #: and has row views to prefill the others through)
        self.shares_prefill = (self.cache_class.copy_rows is not KVCache.copy_rows
                               and self.cache_class.rows is not KVCache.rows)
        #: whether admissions reuse what a slot's rows hold of its last prompt (continuous batching,
        #: a cache with row views, :attr:`EngineConfig.prefix_caching`)
        self.caches_prefixes = self.continuous and self.config.prefix_caching
        if self.config.prefill_chunk and not self.caches_prefixes:
            raise ValueError("engine.prefill_chunk needs prefix caching with continuous batching (each chunk is "
                             "reused by the next): set engine.prefix_caching=true" + (
                                 "" if self.continuous else f" — and continuous batching cannot run here "
                                 f"({' and '.join(refusal) or 'engine.batching=static'})") + ", or engine.prefill_chunk=0")
        # compiled or graphed rounds read the whole cache: static shapes
        self._static_shapes = self.config.compile or self.config.cuda_graphs
        #: whether rounds run over the slots up to the last unfinished request alone
        #: (:attr:`EngineConfig.trim_idle_slots`)
        self.trims_idle_slots = (self.config.trim_idle_slots and not self.config.cuda_graphs and drafter.can_use_rows
                                 and self.cache_class.head is not KVCache.head)

    # ------------------------------------------------------------------ sizing
    def cache_len_needed(self, max_prompt_len: int, max_new_tokens: int) -> int:
        """Positions per request a batch needs: prompt + budget + one round of lookahead (γ + 1)."""
        return max_prompt_len + max_new_tokens + self.drafter.gamma + 1

    def check_fits(self, prompt_lengths: list[int], max_new_tokens: int | list[int]) -> None:
        """Raise ``ValueError`` (before any compute) if a request cannot fit in the cache or the model
        (``max_new_tokens``: one budget for all, or one per request)."""
        capacity = self.cache_config.max_len
        max_positions = getattr(self.target, "max_position_embeddings", None)
        budgets = per_request(max_new_tokens, len(prompt_lengths))
        for i, (length, max_new_tokens) in enumerate(zip(prompt_lengths, budgets)):
            if capacity is not None and length > capacity:
                raise ValueError(f"prompt {i} has {length} tokens, longer than the KV cache (cache.max_len={capacity})")
            if capacity is not None and self.cache_len_needed(length, max_new_tokens) > capacity:
                raise ValueError(
                    f"prompt {i} ({length} tokens) + max_new_tokens ({max_new_tokens}) + one round of lookahead "
                    f"({self.drafter.gamma + 1}) needs {self.cache_len_needed(length, max_new_tokens)} cache positions, "
                    f"more than cache.max_len={capacity}"
                )
            if max_positions is not None and length + max_new_tokens > max_positions:
                raise ValueError(
                    f"prompt {i} ({length} tokens) + max_new_tokens ({max_new_tokens}) exceeds the target's "
                    f"max_position_embeddings ({max_positions})"
                )

    def _get_cache(self, batch_size: int, max_len: int):
        """Reuse the cache when it is big enough for this batch; allocate otherwise (not per step)."""
        if self.cache_config.max_len is not None:
            max_len = self.cache_config.max_len
        elif self._static_shapes:  # rounds read the whole cache: few distinct sizes, few recompilations
            max_len = _round_up(max_len, COMPILED_CACHE_BUCKET)
        cache = self._cache
        if cache is None or cache.batch_size != batch_size or cache.max_len < max_len:
            cache = self._cache = self.cache_class.for_model(self.target, batch_size, max_len)
        cache.reset()
        return cache

    # ------------------------------------------------------------------ generation
    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], *, max_new_tokens: int | list[int],
                 params: SamplingParams | Sequence[SamplingParams],
                 seeds: list[int], ignore_eos: bool | Sequence[bool] = False, progress=None,
                 on_tokens: Callable[[int, list[int]], None] | None = None,
                 stop_token_ids: Sequence[int] | Sequence[Sequence[int]] = (),
                 min_new_tokens: int | Sequence[int] = 0,
                 stop_check: Callable[[int, list[int]], int | None] | None = None,
                 logprobs: bool = False, top_logprobs: int = 0,
                 prompt_logprobs: bool = False, prompt_top_logprobs: int = 0,
                 grammars: Sequence | None = None,
                 ) -> tuple[list[list[int]], GenerationStats, "Scores"]:
        """Decode token-id prompts (already validated); return generated ids, stats and the
        log-probabilities asked for (:class:`Scores`): with ``logprobs`` each generated token's
        under the target's own distribution (before the sampler's processing), with
        ``top_logprobs = k`` (and ``logprobs``) the ``k`` likeliest tokens there, with
        ``prompt_logprobs`` each prompt token's given the ones before it (:meth:`_prefill`), and with
        ``prompt_top_logprobs = k`` too the ``k`` likeliest tokens at each prompt position.

        Up to ``engine.max_batch_size`` requests decode together. With continuous batching
        (:attr:`EngineConfig.batching`) a request that ends hands its slot to the next waiting
        one between two rounds; otherwise the prompts decode in static batches of that size, each
        until its last request ends. Either way each request decodes as it would alone.

        ``params``: the sampling settings, one for every request or one per request (requests with
        different settings share the batch: :func:`~dspark.records.batch_params`); so may
        ``ignore_eos``, ``stop_token_ids`` (a list of id lists) and ``min_new_tokens`` be.

        A request ends at its ``max_new_tokens`` (one budget for all, or one per request), at an EOS
        token (unless ``ignore_eos``) or at one of
        ``stop_token_ids``; the token that ends it is part of its output; none of these stop tokens
        is among its first ``min_new_tokens`` (the target's distribution excludes them there, so
        verification stays exact). ``stop_check(i, ids)`` sees each request's emitted ids as
        ``on_tokens`` does (before it) and may end the request after the first ``k`` of them by
        returning ``k`` (:class:`~dspark.stop_strings.StopStrings`).

        ``grammars``: a compiled grammar per request (``None``: unconstrained) that its output
        follows, verified against the constrained target (:mod:`dspark.structured`).

        ``on_tokens(i, ids)``: called after prefill and after every round, for each request ``i``
        (its index in ``prompts``) that emitted tokens, with the ids it emitted (final: the
        concatenation of a request's calls is its output). The ids ride on the round's one host read."""
        count, size = len(prompts), self.config.max_batch_size
        budgets, min_new = per_request(max_new_tokens, count), per_request(min_new_tokens, count)
        params = [params] * count if isinstance(params, SamplingParams) else list(params)
        stops = request_stop_ids(self.eos_token_ids, ignore_eos, stop_token_ids, count)
        for name, values in (("budgets", budgets), ("params", params), ("seeds", seeds), ("min_new_tokens", min_new)):
            if len(values) != count:
                raise ValueError(f"{name} has {len(values)} entries for {count} prompts: give one per prompt")
        scores, prompt_scores = (top_logprobs if logprobs else -1), (prompt_top_logprobs if prompt_logprobs else -1)
        grammars = [None] * count if grammars is None else list(grammars)
        if len(grammars) != count:
            raise ValueError(f"grammars has {len(grammars)} entries for {count} prompts: give one per prompt")
        check_some_token_allowed(stops, min_new, self.target.vocab_size)
        requests = [Request(list(p), b, q, int(s), stop, m, scores, prompt_scores, g)
                    for p, b, q, s, stop, m, g in zip(prompts, budgets, params, seeds, stops, min_new, grammars)]
        options = dict(on_tokens=on_tokens, stop_check=stop_check, logprobs=logprobs, top_logprobs=top_logprobs,
                       prompt_logprobs=prompt_logprobs, prompt_top_logprobs=prompt_top_logprobs)
        started = time.perf_counter()
        chunks = [requests] if self.continuous or count <= size else [requests[i:i + size] for i in range(0, count, size)]
        outputs, parts, scores = [], [], Scores()  # static batches: one after the other
        for first, chunk in zip(range(0, count, size), chunks):
            shift = lambda callback: None if callback is None else (  # noqa: E731
                lambda i, ids, first=first: callback(first + i, ids))
            batch = self.open_batch(min(len(chunk), size), max(self.cache_len_needed(len(r.prompt), r.budget) for r in chunk),
                                    started=started if len(chunks) > 1 else None, **{**options, "on_tokens": shift(on_tokens),
                                                        "stop_check": shift(stop_check)})
            if len(chunk) <= batch.state.batch_size:  # (all admitted at once: no later prompt goes on from an output)
                batch.history = None
            for request in chunk:
                batch.add(request)
            rounds = 0
            while self.step(batch):
                if progress is not None and batch.counters.rounds > rounds:  # (admissions are steps too)
                    progress.update(batch.counters.rounds - rounds)
                    rounds = batch.counters.rounds
            ids, stats, part = self.finish(batch)
            outputs += ids
            parts.append(stats)
            scores.extend(part)
        if not prompt_logprobs:  # (a batch keeps them per request, None where not asked)
            scores.prompt = None
        if not (prompt_logprobs and prompt_top_logprobs):
            scores.prompt_top = None
        return outputs, GenerationStats.merge(parts), scores

    def request(self, prompt: list[int], *, max_new_tokens: int, params: SamplingParams, seed: int,
                ignore_eos: bool = False, stop_token_ids: Sequence[int] = (), min_new_tokens: int = 0,
                logprobs: int | None = None, prompt_logprobs: int | None = None, grammar=None) -> "Request":
        """One request as :meth:`Batch.add` takes it (already validated; its stop ids are the
        engine's EOS tokens unless ``ignore_eos``, then ``stop_token_ids``; ``logprobs``,
        ``prompt_logprobs``, ``grammar``: see :class:`Request`)."""
        stops = request_stop_ids(self.eos_token_ids, [ignore_eos], [list(stop_token_ids)], 1)[0]
        check_some_token_allowed([stops], [min_new_tokens], self.target.vocab_size)
        return Request(list(prompt), int(max_new_tokens), params, int(seed), stops, int(min_new_tokens), logprobs,
                       prompt_logprobs, grammar)

    def open_batch(self, slots: int, max_len: int, *, on_tokens=None, stop_check=None, logprobs: bool = False,
                   top_logprobs: int = 0, prompt_logprobs: bool = False, prompt_top_logprobs: int = 0,
                   started: float | None = None) -> "Batch":
        """A batch of ``slots`` rows, each holding up to ``max_len`` positions (prompt + budget + one
        round of lookahead: :meth:`cache_len_needed`), for requests to join (:meth:`Batch.add`)
        and be decoded by :meth:`step` — the loop under :meth:`generate`, and under
        :class:`~dspark.session.Session` for requests that arrive while others decode. The options
        are :meth:`generate`'s, for every request of the batch."""
        capacity = self.cache_config.max_len
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise ValueError(f"a batch needs slots >= 1 (an integer), got {slots!r}")
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"a batch needs max_len >= 1 (an integer), got {max_len!r}")
        if capacity is not None and max_len > capacity:
            raise ValueError(f"a batch of max_len {max_len} does not fit the KV cache (cache.max_len={capacity})")
        positions = getattr(self.target, "max_position_embeddings", None)
        if positions is not None and max_len > positions + self.drafter.gamma + 1:
            raise ValueError(f"max_len {max_len} is more positions than a request can use: the target has "
                             f"max_position_embeddings {positions}, + {self.drafter.gamma + 1} of lookahead = "
                             f"{positions + self.drafter.gamma + 1} at most")
        device, gamma = self.device, self.drafter.gamma
        zeros = lambda dtype=torch.long: torch.zeros(slots, dtype=dtype, device=device)  # noqa: E731
        state = DecodingState(tokens=torch.zeros(slots, max_len, dtype=torch.long, device=device),
                              prompt_lengths=zeros(), lengths=zeros() + 1, done=~zeros(torch.bool), max_new_tokens=0,
                              params=SamplingParams())  # (an empty slot: done, its anchor token 0)
        buffers = None if not logprobs else (
            torch.zeros(slots, max_len + gamma + 1, dtype=torch.float32, device=device),
            *(() if not top_logprobs else (
                torch.zeros(slots, max_len + gamma + 1, top_logprobs, dtype=torch.float32, device=device),
                torch.zeros(slots, max_len + gamma + 1, top_logprobs, dtype=torch.long, device=device))))
        self.scheduler.reset()
        self._live = batch = Batch(state=state, cache=self._get_cache(slots, max_len), max_len=max_len, lookahead=gamma + 1,
                     stopper=Stopper(slots, self.target.vocab_size, device, buffers and buffers[0],
                                      buffers[1:] if buffers and len(buffers) > 1 else None),
                     counters=RoundCounters(slots, gamma, device, requests=0),
                     stream=None if on_tokens is None and stop_check is None else TokenStream(slots, gamma + 1, on_tokens,
                                                                                                stop_check),
                     logprobs=logprobs, top_logprobs=top_logprobs, prompt_logprobs=prompt_logprobs,
                     prompt_top_logprobs=prompt_top_logprobs, started=started)
        # a slot may keep its request's output for the next prompt too; a drafter that reads target
        # hidden states needs them over the output as well: the rounds keep them
        batch.prefixes.with_outputs = self.caches_prefixes and self.config.reuse_outputs
        if batch.prefixes.with_outputs and self.drafter.hidden_layers:
            batch.history = HiddenHistory(slots, batch.cache.max_len + gamma + 1)
        return batch

    @torch.inference_mode()
    def step(self, batch: "Batch") -> bool:
        """Advance ``batch`` by one step: admit waiting requests into the free slots (at most one
        admission between two rounds), or decode one round. Returns ``False`` when there was
        nothing to do (no request waiting, none unfinished). One batch decodes at a time per engine
        (they share its cache and the drafter's state): a batch opened since — by ``generate``, say —
        ends this one's use (``RuntimeError``)."""
        self._check_owner(batch)
        state, slots, status = batch.state, batch.state.batch_size, batch.status
        free = [b for b in range(slots) if status[b] and b not in batch.prefilling]
        # (a step that left prefill work for later is followed by a round of the requests decoding, if any)
        if (free and batch.waiting or batch.prefilling) and not (batch.chunked and batch.running):
            # admit: waiting requests take the free slots (all of them at first; with prefix caching,
            # those whose last prompts share the most with theirs); prefill their prompts (a long one
            # in chunks over several steps: engine.prefill_chunk), draw their first tokens, give the
            # drafter their context
            admitted, admitting = time.perf_counter(), free[:len(batch.waiting)]
            if self.caches_prefixes and free and batch.waiting:
                admitting = batch.prefixes.assign([batch.requests[i].prompt for i in islice(batch.waiting, len(free))], free,
                                                  lowest=self.trims_idle_slots)
                if self.trims_idle_slots and self.shares_prefill:
                    admitting = self._copy_down(batch, admitting, free)
            pairs = [(b, batch.waiting.popleft()) for b in admitting]
            batch.chunked = False
            if self.config.prefill_chunk:
                pairs, chunks = self._chunks(batch, pairs)
                if chunks:
                    self._prefill_chunks(batch, chunks)
            if pairs:
                self._admit(batch, pairs)
                occupied = [holder >= 0 for holder in batch.holder]  # (the next round's rows at most)
                batch.status = self._status(state, batch.cache.lengths[:self._round_rows(occupied)], None,
                                            batch.stream, batch.stopper)  # their first tokens may end them
                self._note_without_mass(batch)
            batch.round_started = time.perf_counter()
            batch.prefill_time += batch.round_started - admitted
            for b, _ in pairs:
                batch.first_token[batch.holder[b]] = batch.round_started - batch.started
            batch.mark_finished(batch.round_started)
            return True
        if all(status[:slots]):
            return False
        active, state.max_cache_len, emitted_before = [not d for d in status[:slots]], status[slots], status[slots + 1]
        rows = self._round_rows(active)
        # (a slot being prefilled in chunks among the round's rows rides along: its cache reads too)
        state.max_cache_len = max([state.max_cache_len, *(end for b, end in batch.prefilled_to.items() if b < rows)])
        if rows != batch.drafter_rows:
            self.drafter.use_rows(rows, state)
            batch.drafter_rows = rows
        round_state, cache = batch.head(rows, self.config.compile)
        batch.chunked = False
        drafted = self._round(round_state, cache, batch.generators[:rows], active[:rows], batch.stopper, batch.counters,
                              batch.history, batch.grammars)
        summary = self.scheduler.round_summary()
        batch.status = status = self._status(state, cache.lengths, summary, batch.stream, batch.stopper)
        now = time.perf_counter()  # the status read waited for the device: the round is over
        self._note_without_mass(batch)
        if summary is not None:
            self.scheduler.summary_read(status[slots + 3:])
        self.scheduler.timed(rows, drafted, now - batch.round_started, (status[slots + 1] - emitted_before) / sum(active))
        batch.round_started = now
        batch.mark_finished(now)
        return True

    def _check_owner(self, batch: "Batch") -> None:
        if batch is not self._live:
            raise RuntimeError("this batch no longer owns the engine: another was opened on it since (a generate call "
                               "or another session; one batch decodes at a time per engine)")

    @torch.inference_mode()
    def abort(self, batch: "Batch", request: int) -> bool:
        """End ``request`` of ``batch`` now, between two steps (vLLM's ``abort_request``): a waiting
        one, or one whose prompt is being prefilled in chunks, never starts (no tokens); a decoding
        one keeps the tokens it has emitted so far and its slot is freed at once (one host read).
        The other requests decode as they would have: the row rides along done (while a busier
        slot follows it) until a request takes it. Returns whether it was unfinished."""
        self._check_owner(batch)
        batch.check_request(request)
        now = time.perf_counter() - batch.started
        prefilling = [b for b, i in batch.prefilling.items() if i == request]
        if request in batch.waiting or prefilling:  # (its slot, if it has one, keeps the chunks for a next prompt)
            batch.aborted.add(request)
            if prefilling:
                del batch.prefilling[prefilling[0]], batch.prefilled_to[prefilling[0]]
            else:
                batch.waiting.remove(request)
            batch.outputs[request], batch.finished[request] = [], now
            wanted = batch.requests[request].logprobs
            for scores, least in ((batch.scores.tokens, 0), (batch.scores.top, 1)):
                if scores is not None:
                    scores[request] = [] if wanted >= least else None
            return True
        if request not in batch.holder or batch.status[slot := batch.holder.index(request)]:
            return False  # finished already (collected, or ended in the last step)
        batch.aborted.add(request)
        batch.state.done[slot] = True
        batch.status[slot], batch.finished[request] = 1, now
        self._collect(batch, [slot])
        return True

    @torch.inference_mode()
    def collect_finished(self, batch: "Batch") -> list[int]:
        """Read out the requests the last status read shows ended (their ids, log-probabilities,
        counts: one host read when some did) and free their slots; returns their indices."""
        slots = [b for b, request in enumerate(batch.holder) if request >= 0 and batch.status[b]]
        requests = [batch.holder[b] for b in slots]
        self._collect(batch, slots)
        return requests

    @torch.inference_mode()
    def finish(self, batch: "Batch") -> tuple[list[list[int]], GenerationStats, "Scores"]:
        """Collect every request of ``batch`` (call once :meth:`step` returns ``False``): the
        generated ids, the stats and the log-probabilities asked for, in the order the requests
        were added."""
        self._collect(batch, [b for b in range(batch.state.batch_size) if batch.holder[b] >= 0])
        stats = batch.counters.stats(batch.outputs, time.perf_counter() - batch.opened, batch.prefill_time)
        for i, (row, first, end) in enumerate(zip(stats.per_request, batch.first_token, batch.finished)):
            row.update(first_token_s=first, finished_s=end, finish_reason=batch.finish_reason(i))
        return batch.outputs, stats, batch.scores

    def _round_rows(self, active: list[bool]) -> int:
        """The slots a round runs over: all of them, or (:attr:`trims_idle_slots`) the first ones up
        to the last ``active`` one, rounded up to a power of two (fewer distinct batch sizes for
        compiled forwards and the scheduler's cost table)."""
        if not self.trims_idle_slots:
            return len(active)
        last = max((b for b, on in enumerate(active) if on), default=0)
        return min(len(active), 1 << last.bit_length())

    @staticmethod
    def _status(state: DecodingState, cache_lengths: torch.Tensor, summary: torch.Tensor | None,
                stream: "TokenStream | None", stopper: "Stopper") -> list[int]:
        """One host read: ``[done_0 .. done_{B-1}, longest cache, total length, whether a request
        drew from a distribution without mass, *scheduler summary]`` (the longest of
        ``cache_lengths``: the rows the next round runs over, or more). Such a request is ended
        before that token here (:meth:`Stopper.without_mass`; a second read, only then). A stream's
        window is read with it and handed over; a request its stop check ends is marked done, and
        its length cut, here (between rounds, no extra read)."""
        def read() -> list[int]:
            parts = [state.done.long(), cache_lengths.max().view(1), state.lengths.sum().view(1),
                     stopper.mass.isnan().long()]
            if summary is not None:
                parts.append(summary)
            return torch.cat([*parts, *([] if stream is None else [stream.window(state)])]).tolist()

        status, batch = read(), state.batch_size
        if status[batch + 2]:
            stopper.ended_without_mass = stopper.without_mass()
            for b, length in stopper.ended_without_mass:
                state.done[b], state.lengths[b] = True, length
            status = read()
        else:
            stopper.watched()
        if stream is None:
            return status
        size = stream.size(batch)
        for b, length, dropped in stream.emit(status[-size:]):  # a stop string ended request b
            state.done[b], state.lengths[b] = True, length
            status[b], status[batch + 1] = 1, status[batch + 1] - dropped
        return status[:-size]

    def _note_without_mass(self, batch: "Batch") -> None:
        """Record (finish reason ``"error"``) and log the requests the last status read ended for
        drawing from a distribution without mass."""
        for b, _ in batch.stopper.ended_without_mass:
            request = batch.holder[b]
            batch.errors[request] = (
                "the target's distribution had no probability mass (NaN or infinite logits, or every token "
                "forbidden) where the request drew its next token: its grammar allows no token there, its "
                "settings ban every one, or the model's numbers overflowed (float16: try target.dtype=bfloat16 "
                "or float32); it ended before that token")
            log.warning("request %d: %s", request, batch.errors[request])
        batch.stopper.ended_without_mass = []

    def _round(self, state: DecodingState, cache, generators, active: list[bool], stopper: "Stopper",
               counters: RoundCounters, history: HiddenHistory | None = None,
               grammars: GrammarRows | None = None) -> bool:
        """One speculative round over the rows of ``state`` (the batch's, or its first slots':
        :meth:`Batch.head`; finished requests among them ride along with nothing to verify);
        returns whether it drafted. ``history`` keeps the target's hidden states at the positions
        fed (:attr:`EngineConfig.reuse_outputs`); ``grammars`` constrain some requests' outputs
        (:mod:`dspark.structured`)."""
        params, gamma = state.params, self.drafter.gamma
        clock = _PhaseClock(self.config.time_phases, self.device)
        if state.penalties is not None:  # the history the penalties read: committed tokens so far
            state.penalties = PenaltyHistory.of(state.tokens, state.prompt_lengths, state.lengths,
                                                state.penalties.counts.shape[1], in_prompt=state.penalties.in_prompt)
        n_draft = self.drafter.num_uniforms(params)
        uniforms = draw_uniforms(generators, active, n_draft + self.verifier.num_uniforms(gamma, params), self.device)

        # 1. draft: x_1..x_γ after each anchor, unless the scheduler expects none to be verified
        #    (constrained requests' drafts guided by their grammars, where the drafter allows)
        clock.start()
        drafting = not self.drafter.skippable or self.scheduler.wants_drafts(active)
        constrained = [] if grammars is None else grammars.constrained([b for b, a in enumerate(active) if a])
        guide = None
        if drafting and constrained and self.drafter.guidable and self.config.guide_drafts:
            guide = self.drafter.guide = grammars.guide(state, constrained)
        try:
            proposal = self.drafter.propose(state, uniforms[:, :n_draft]) if drafting else DraftProposal(
                tokens=self._no_drafts.tokens[:len(active)], num_tokens=self._no_drafts.num_tokens[:len(active)])
        finally:
            if guide is not None:
                self.drafter.guide = None
                guide.rollback()
        clock.lap(counters, 0)
        # 2. schedule: ℓ_b ≤ γ drafts to verify per unfinished request            [B]
        finished = state.done.clone()
        num_drafted = torch.where(finished, 0, proposal.num_tokens)  # (a finished request may be proposed for)
        verifier_uniforms = uniforms[:, n_draft:]
        if not drafting:  # a plain decoding step: the final token keeps its usual uniform
            num_verify = proposal.num_tokens
            verifier_uniforms = verifier_uniforms[:, gamma:gamma + 1]
            gamma = 0
        else:
            if proposal.gamma < gamma:  # the drafter stopped early: ℓ_b ≤ its proposal's width
                verifier_uniforms = _final_kept(verifier_uniforms, proposal.gamma)
                gamma = proposal.gamma
            num_verify = torch.where(finished, 0, self.scheduler.schedule(proposal, ~finished))
            proposal = replace(proposal, num_tokens=num_verify)
            if not isinstance(self.scheduler, FixedScheduler):  # verify only max ℓ_b + 1 columns
                gamma = self.scheduler.known_width()
                if gamma is None:  # one more host read
                    gamma, offered = torch.stack([num_verify.max(), num_drafted.max()]).tolist()
                    self.scheduler.observe(gamma, offered)
                proposal, verifier_uniforms = _narrow(proposal, verifier_uniforms, gamma)
        # grammars: the constrained requests' masks along their drafts (a token the grammar allows
        # alone is drafted where the drafter proposed another; deterministic drafts are verified up
        # to the first one the grammar forbids, and the verify forward narrows when it can)
        drafters_verified = num_verify  # (the scheduler learns from the drafter's own choices alone)
        if constrained:
            cut = drafting and self.config.cut_stray_drafts and proposal.probs is None
            grammar = grammars.round_masks(state, proposal.tokens, num_verify, constrained,
                                           force=drafting and self.drafter.replaceable_drafts, guide=guide, cut=cut)
            rows = torch.tensor(constrained, device=self.device)
            if grammar.dictated is not None:  # (up to the first draft the grammar dictated)
                drafters_verified = num_verify.index_copy(0, rows, torch.minimum(num_verify[rows], grammar.dictated))
            if grammar.verify is not None:
                num_verify = num_verify.index_copy(0, rows, grammar.verify)
                if grammar.forced is not None:
                    proposal = with_forced(proposal, constrained, grammar.forced)
                proposal = replace(proposal, num_tokens=num_verify)
                if grammar.widest < gamma and len(constrained) == sum(active):  # (every row's count known here)
                    proposal, verifier_uniforms = _narrow(proposal, verifier_uniforms, grammar.widest)
                    gamma = grammar.widest
        clock.lap(counters, 1)
        # 3. verify forward over [anchor, x_1..x_ℓ]                               logits [B, γ+1, V]
        inputs = torch.cat([state.anchor.unsqueeze(1), proposal.tokens], 1)
        num_new = torch.where(finished, 0, num_verify + 1)
        kv_len = cache.max_len if self._static_shapes else min(
            _round_up(state.max_cache_len + gamma + 1, self.config.kv_len_multiple), cache.max_len)
        out = self._round_forward(inputs, cache, num_new, hidden_layers=self.drafter.hidden_layers, kv_len=kv_len)
        # 4. verify: n_b accepted drafts, then the recovered or bonus token       tokens [B, γ+1]
        #    (penalties, grammars: position j's history is the committed tokens and x_1..x_j)
        logits = stopper.suppress(out.logits, state)
        if state.penalties is not None:
            logits = state.penalties.penalize_verify(logits, proposal.tokens, num_verify, params)
        if constrained:
            logits = constrain(logits, constrained, grammar.allowed[:, :logits.shape[1]])
        result = self.verifier.verify(logits, proposal, sampler=self.sampler, params=params, uniforms=verifier_uniforms)
        num_accepted = torch.where(finished, 0, result.num_accepted)
        if drafting:
            self.scheduler.record(drafters_verified, num_accepted if drafters_verified is num_verify
                                  else torch.minimum(num_accepted, drafters_verified))
        clock.lap(counters, 2)
        # 5. accept: append accepted drafts + 1, stop at EOS / max_new_tokens (may emit fewer)
        num_emitted = torch.where(finished, 0, num_accepted + 1)
        tokens = stopper.check_mass(logits, result.tokens, num_emitted, state.lengths)
        emitted = stopper.append(state, tokens, num_emitted, out.logits)
        # 6. roll back: the target cache keeps the anchor and the drafts that were emitted
        cache.rollback(num_new - emitted)
        if history is not None:  # (from where each row's cache stood: the kept positions among them)
            history.write(cache.lengths - emitted, [h[:, :self.drafter.gamma + 1] for h in out.hidden_states])
        kept = replace(result, num_accepted=(emitted - 1).clamp(min=0))
        self.drafter.commit(state, proposal, kept, out)
        predicted = None
        if proposal.confidence is not None:  # tokens the survivals promised for the verified prefixes
            a = survival(proposal.confidence)
            verified = torch.arange(a.shape[1], device=a.device) < num_verify.unsqueeze(1)
            predicted = torch.where(finished, 0.0, 1.0 + (a * verified).sum(-1))
        elif not drafting and self.scheduler.needs_confidence:  # a skipped round promises one token a request
            predicted = float(sum(active))
        counters.update(finished, num_verify, num_accepted, num_drafted, predicted, drafted=drafting,
                        num_kept=kept.num_accepted)
        for hook in self.round_hooks:
            hook(proposal, result, ~finished)
        return drafting


def _narrow(proposal: DraftProposal, uniforms: torch.Tensor, width: int) -> tuple[DraftProposal, torch.Tensor]:
    """The first ``width`` draft positions of a proposal, and the verifier's uniforms for them:
    position k keeps its own draw and the final (recovered / bonus) token keeps the last one, so a
    request's randomness does not depend on how wide the batch's verification is."""
    cut = lambda x: None if x is None else x[:, :width]  # noqa: E731
    narrowed = replace(proposal, tokens=proposal.tokens[:, :width], probs=cut(proposal.probs),
                       confidence=cut(proposal.confidence))
    return narrowed, _final_kept(uniforms, width)


def _final_kept(uniforms: torch.Tensor, width: int) -> torch.Tensor:
    """The verifier's uniforms ``[B, γ+1]`` for ``width`` draft positions: ``[B, width+1]``, the
    final token's draw (the last column) kept; greedy verification draws none (``[B, 0]``)."""
    if uniforms.shape[1] == 0:
        return uniforms
    return torch.cat([uniforms[:, :width], uniforms[:, -1:]], 1)


class _PhaseClock:
    """Adds the host-clock seconds of drafting (phase 0), scheduling (phase 1) and of the verify
    forward + verification (phase 2) to ``counters.phase_seconds`` (no-op unless enabled)."""

    def __init__(self, enabled: bool, device):
        self.enabled = enabled
        self.sync = torch.cuda.synchronize if enabled and torch.device(device).type == "cuda" else (lambda: None)

    def start(self) -> None:
        if self.enabled:
            self.sync()
            self.last = time.perf_counter()

    def lap(self, counters: RoundCounters, phase: int) -> None:
        if self.enabled:
            self.sync()
            now = time.perf_counter()
            counters.phase_seconds[phase] += now - self.last
            self.last = now


COMPILED_CACHE_BUCKET = 256


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
