"""The decoding engine: prefill, then speculative rounds until every request is done.

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

import time
from collections import deque
from itertools import islice
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch

from dspark import kernels
from dspark.cache import CacheConfig, KVCache, StaticKVCache
from dspark.drafters import Drafter
from dspark.models.compiled import compile_forward
from dspark.models.graphs import GraphedForward
from dspark.prefix_cache import HiddenHistory, ResidentPrompt, SlotPrefixes, common_prefix, valid_scores, with_prefixes
from dspark.records import DecodingState, DraftProposal, SamplingParams, batch_params
from dspark.samplers import Sampler
from dspark.samplers.penalties import PenaltyHistory
from dspark.scheduling.prefix import survival
from dspark.scheduling.schedulers import FixedScheduler, Scheduler
from dspark.stats import GenerationStats, RoundCounters
from dspark.structured import GrammarRows, constrain, with_forced
from dspark.verifiers import Verifier


BATCHING = ("auto", "continuous", "static")


@dataclass
class EngineConfig:
    """Config section ``engine``.

    Attributes:
        max_batch_size: requests decoded together (slots of the batch).
        batching: how a call with more requests than slots goes. ``continuous``: a request that
            ends hands its slot to the next waiting one between two rounds (its prompt is
            prefilled into that row of the cache; vLLM's continuous batching), so the batch stays
            full; ``static``: batches of ``max_batch_size`` one after the other, each until its
            last request ends; ``auto`` (default): continuous when the drafter
            (:meth:`~dspark.drafters.Drafter.admit`) and the cache (:meth:`~dspark.cache.KVCache.rows`)
            support it — every built-in drafter with a native target does — else static.
        kv_len_multiple: attention reads the cache up to the longest request rounded up to this
            multiple (fewer distinct shapes for compiled kernels; 1 = exact).
        progress: show a progress bar over rounds.
        compile: ``torch.compile`` the target's round forward (static shapes: attention reads the
            whole cache, one graph per batch size). Pays off for small models whose step time is
            dominated by per-operation overhead; the first round of each shape compiles (seconds
            to a minute). The drafter's own forwards are compiled too; on CPU with inductor's C++
            wrapper (:func:`~dspark.models.compiled.compile_forward`). The sampling settings reach
            them as tensors, so a new temperature (or top-p, penalty, ...) reuses the graphs;
            turning a setting on that was off compiles once more.
        time_phases: split each round's time into draft / schedule / verify / other (host clock; on
            CUDA this adds synchronisations, so keep it for measurements).
        cuda_graphs: replay the target's round forward from CUDA graphs captured per batch size and
            width bucket (:class:`~dspark.models.graphs.GraphedForward`; CUDA targets with the static
            cache only), and the drafter's own forwards where it supports it (``dspark``,
            ``eagle3``, ``draft_model``: :meth:`~dspark.drafters.base.Drafter.use_graphs`). Composes
            with ``compile``.
        prefix_caching: continuous batching: a request takes the free slot whose last prompt shares
            the most first tokens with its own, and prefills only the rest (:mod:`dspark.prefix_cache`;
            vLLM's automatic prefix caching, one prompt per slot). Each slot keeps the target's
            hidden states over its last prompt for the drafter (prompt × the drafter's target
            layers × hidden size). With ``reuse_outputs``, its last request's output counts too.
        reuse_outputs: with prefix caching, a slot holds its last request's prompt and output, so
            that a conversation's next turn (the last prompt, the reply, a new message) prefills the
            new message alone (SGLang's radix cache keeps outputs likewise). For a drafter that reads
            the target's hidden states (``dspark``, ``eagle3``) the rounds keep those over the
            positions they feed: a buffer of slots × max_len × the drafter's target layers × hidden
            size (:class:`~dspark.prefix_cache.HiddenHistory`), written once a round; ``false``: a
            slot holds its last prompt alone, and no such buffer.
        guide_drafts: structured outputs: a drafter that drafts left to right through
            :meth:`~dspark.drafters.Drafter.draw` (``dspark``, ``eagle3``, ``draft_model``) masks
            a constrained request's logits with its grammar before each draft step, as the target's
            are masked when it verifies (:class:`~dspark.structured.DraftGuide`): its drafts are
            what the constrained target can accept, at a host read per draft step and, with
            ``compile``, one call per draft step in such rounds (not one for all of them).
            ``false``: the drafters draft as without grammars (the verification masks them alike:
            exact either way).
        trim_idle_slots: a round runs over the batch's first slots up to its last unfinished
            request (their number rounded up to a power of two), not over all ``max_batch_size``
            of them: a server whose slots are mostly free decodes as fast as a smaller batch
            (vLLM's scheduler batches the running requests alone). Requests take the lowest free
            slots that serve them as well (:meth:`~dspark.prefix_cache.SlotPrefixes.assign`); a
            prompt found in a higher slot is copied down to a lower free one.
            Needs a drafter with :meth:`~dspark.drafters.Drafter.use_rows` (every built-in one)
            and a cache with :meth:`~dspark.cache.KVCache.head`; not with ``cuda_graphs``.
        prefill_chunk: chunked prefill (0: off): a step prefills at most this many new prompt
            positions, over all the prompts it admits (beyond what their slots hold already). A
            prompt whose rest does not fit goes in over several steps, requests that find the
            step's positions spent wait for the next (first come, first served), and the requests
            decoding meanwhile run a round between two such steps: a long prompt, or a burst of
            them, no longer stalls them for its whole prefill (vLLM's chunked prefill with its
            ``max_num_batched_tokens``; here a step prefills or decodes, and each chunk goes into
            the slot as a prompt of its own that the next one reuses — :mod:`dspark.prefix_cache`
            — so it needs ``prefix_caching`` and continuous batching). The tokens are those of a
            whole prefill.
    """

    max_batch_size: int = 64
    batching: str = "auto"
    kv_len_multiple: int = 16
    progress: bool = False
    compile: bool = False
    time_phases: bool = False
    cuda_graphs: bool = False
    prefix_caching: bool = True
    reuse_outputs: bool = True
    guide_drafts: bool = True
    trim_idle_slots: bool = True
    prefill_chunk: int = 0

    def __post_init__(self):
        if self.max_batch_size < 1:
            raise ValueError(f"engine.max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.batching not in BATCHING:
            raise ValueError(f"engine.batching must be one of {', '.join(BATCHING)}, got {self.batching!r}")
        if self.kv_len_multiple < 1:
            raise ValueError(f"engine.kv_len_multiple must be >= 1, got {self.kv_len_multiple}")
        if isinstance(self.prefill_chunk, bool) or self.prefill_chunk < 0:
            raise ValueError(f"engine.prefill_chunk must be 0 (off) or a number of prompt positions >= 1, got "
                             f"{self.prefill_chunk!r}")


class Engine:
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
        budgets = _per_request(max_new_tokens, len(prompt_lengths))
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
        budgets, min_new = _per_request(max_new_tokens, count), _per_request(min_new_tokens, count)
        params = [params] * count if isinstance(params, SamplingParams) else list(params)
        stops = _stop_ids(self.eos_token_ids, ignore_eos, stop_token_ids, count)
        for name, values in (("budgets", budgets), ("params", params), ("seeds", seeds), ("min_new_tokens", min_new)):
            if len(values) != count:
                raise ValueError(f"{name} has {len(values)} entries for {count} prompts: give one per prompt")
        scores, prompt_scores = (top_logprobs if logprobs else -1), (prompt_top_logprobs if prompt_logprobs else -1)
        grammars = [None] * count if grammars is None else list(grammars)
        if len(grammars) != count:
            raise ValueError(f"grammars has {len(grammars)} entries for {count} prompts: give one per prompt")
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
        stops = _stop_ids(self.eos_token_ids, [ignore_eos], [list(stop_token_ids)], 1)[0]
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
                     stopper=_Stopper(slots, self.target.vocab_size, device, buffers and buffers[0],
                                      buffers[1:] if buffers and len(buffers) > 1 else None),
                     counters=RoundCounters(slots, gamma, device, requests=0),
                     stream=None if on_tokens is None and stop_check is None else _TokenStream(slots, gamma + 1, on_tokens,
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
                                            batch.stream)  # their first tokens may end them
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
        batch.status = status = self._status(state, cache.lengths, summary, batch.stream)
        now = time.perf_counter()  # the status read waited for the device: the round is over
        if summary is not None:
            self.scheduler.summary_read(status[slots + 2:])
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
        if isinstance(request, bool) or not isinstance(request, int) or not 0 <= request < len(batch.requests):
            raise ValueError(f"no request {request!r} in this batch (ids 0..{len(batch.requests) - 1})")
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

    def _copy_down(self, batch: "Batch", admitting: list[int], free: list[int]) -> list[int]:
        """Rounds run over the slots up to the last busy one (:attr:`trims_idle_slots`): a request
        that would take a free slot for what it holds of its prompt, above a free slot left empty
        by this admission, takes the lowest such slot instead, the reusable positions' cache rows
        copied down to it (:meth:`~dspark.cache.KVCache.copy_rows`) with what the slot kept of its
        prompt — the same prefill saved, rounds no wider for it. (``admitting``: the slots the
        first waiting requests take, in order.)"""
        spare = sorted(set(free) - set(admitting))
        moved = []
        for b, i in zip(admitting, batch.waiting):
            request = batch.requests[i]
            reusable = batch.prefixes.reusable(b, request.prompt, request.prompt_logprobs)
            if not spare or spare[0] > b or not reusable:
                moved.append(b)
                continue
            lower = spare.pop(0)
            self._collect(batch, [lower] if batch.holder[lower] >= 0 else [])  # (before its rows change)
            batch.cache.copy_rows(torch.tensor([b], device=self.device), torch.tensor([lower], device=self.device),
                                  reusable)
            batch.prefixes.copy(b, lower)
            spare = sorted([*spare, b])
            moved.append(lower)
        return moved

    def _admit(self, batch: "Batch", pairs: list[tuple[int, int]]) -> None:
        """Requests take slots (``pairs``: slot, request): their prompts go into the target cache's
        rows (a forward over them alone, from the positions a slot's last prompt already holds:
        :mod:`dspark.prefix_cache`), their first tokens are drawn from its last logits, and the
        drafter starts them (:meth:`Drafter.start` for a whole batch, or the batch's first requests
        with the other slots empty; :meth:`Drafter.admit` for some of its slots later). The
        requests that held those slots are collected first. (A request prefilled in chunks had its
        prompt counted in the prefix-cache figures when it took its slot: :meth:`_chunks`.)"""
        state, device, slots = batch.state, self.device, batch.state.batch_size
        free, taken = (list(x) for x in zip(*sorted(pairs)))
        self._collect(batch, [b for b in free if batch.holder[b] >= 0])
        requests = [batch.requests[i] for i in taken]
        counted = [i in batch.counted for i in taken]  # (chunked: counted already)
        batch.counted.difference_update(taken)
        longest = max(len(r.prompt) for r in requests)
        rows = torch.tensor(free, device=device)
        width = state.tokens.shape[1]
        tokens = torch.tensor([r.prompt + [0] * (width - len(r.prompt)) for r in requests], dtype=torch.long)
        prompt_lengths = torch.tensor([len(r.prompt) for r in requests], dtype=torch.long, device=device)
        state.tokens[rows], state.prompt_lengths[rows], state.lengths[rows] = tokens.to(device), prompt_lengths, prompt_lengths
        state.done[rows] = False
        state.max_new_tokens = max(state.max_new_tokens, *(r.budget for r in requests))
        for b, i, request in zip(free, taken, requests):
            batch.holder[b], batch.slot_params[b] = i, request.params
            batch.generators[b] = torch.Generator(device=device).manual_seed(request.seed)
        batch.param_rows = [p or requests[0].params for p in batch.slot_params]
        state.params = params = batch_params(batch.param_rows, slots, device, columns=self.config.compile)
        batch.heads = {}  # (the rounds' views of the state carry the settings of their rows)
        batch.stopper.admit(rows, free, requests)
        if batch.stream is not None:
            batch.stream.admit(free, taken, [len(r.prompt) for r in requests])

        # prefill: the prompts go into their cache rows; their last logits give the first tokens.
        # Requests of one prompt (n choices of one request, say) share one prefill: the first one's
        # cache rows are copied, its logits and hidden states serve the others. A prompt that starts
        # as its slot's last one, or as another one admitted now, is prefilled from where they part.
        whole = len(free) == slots
        first: dict[tuple, int] = {}
        source = [first.setdefault(tuple(r.prompt), k) for k, r in enumerate(requests)]
        share = self.shares_prefill and len(first) < len(requests)
        prefilled = list(first.values()) if share else list(range(len(free)))  # (indices into free, ascending)
        asked = max(r.prompt_logprobs for r in requests)  # (−1: none asks for its prompt's scores)
        starts, resident = [0] * len(prefilled), [None] * len(prefilled)
        if self.caches_prefixes:
            starts = [batch.prefixes.reusable(free[k], requests[k].prompt, requests[k].prompt_logprobs) for k in prefilled]
            resident = [batch.prefixes.resident[free[k]] if start else None for k, start in zip(prefilled, starts)]
        # a prompt that shares more with another one admitted now (its leader, prefilled first) than
        # with its slot's last prompt follows it: the leader's rows are copied up to where they part.
        # In sorted order the nearest leader before a prompt shares the most with it.
        leader = [None] * len(prefilled)
        if self.caches_prefixes and self.shares_prefill:
            last = None
            for j in sorted(range(len(prefilled)), key=lambda j: requests[prefilled[j]].prompt):
                prompt, ask = requests[prefilled[j]].prompt, requests[prefilled[j]].prompt_logprobs
                if last is not None:
                    shared = common_prefix(requests[prefilled[last]].prompt, prompt) - 1
                    if shared > starts[j] and (ask < 0 or valid_scores(starts[last], resident[last], asked) >= ask):
                        starts[j], leader[j] = shared, last
                        continue
                last = j
        if whole and not share and not any(starts):
            out, prompt_scores = self._prefill(state, batch.cache, starts, longest, longest, asked)
        else:
            leaders = [j for j in range(len(prefilled)) if leader[j] is None]
            followers = [j for j in range(len(prefilled)) if leader[j] is not None]
            out, prompt_scores = self._prefill_rows(batch, state, rows, prefilled, leaders, starts, resident, asked,
                                                    longest)
            if followers:
                position = {j: p for p, j in enumerate(leaders + followers)}  # (in the phases' outputs)
                for j in followers:
                    i = leader[j]
                    batch.cache.copy_rows(rows[[prefilled[i]]], rows[[prefilled[j]]], starts[j])
                    at, n = position[i], len(requests[prefilled[i]].prompt)
                    resident[j] = ResidentPrompt(requests[prefilled[i]].prompt, [h[at, :n] for h in out.hidden_states],
                                                 None if prompt_scores is None else [x[at, :n - 1] for x in prompt_scores],
                                                 valid_scores(starts[i], resident[i], asked))
                more, more_scores = self._prefill_rows(batch, state, rows, prefilled, followers, starts, resident, asked,
                                                       longest)
                order = torch.tensor([position[j] for j in range(len(prefilled))], device=device)
                out = replace(out, logits=torch.cat([out.logits, more.logits])[order],
                              hidden_states=[torch.cat(pair)[order] for pair in zip(out.hidden_states, more.hidden_states)])
                if prompt_scores is not None:
                    prompt_scores = [torch.cat(pair)[order] for pair in zip(prompt_scores, more_scores)]
        batch.prefixes.queries += sum(len(r.prompt) for r, done in zip(requests, counted) if not done)
        batch.prefixes.hits += (sum(start for k, start in zip(prefilled, starts) if not counted[k])
                                + sum(len(requests[k].prompt) for k, s in enumerate(source) if s != k and not counted[k]))
        if share:
            copies = [k for k, s in enumerate(source) if s != k]
            batch.cache.copy_rows(rows[[source[k] for k in copies]], rows[copies], longest)
            at = {k: j for j, k in enumerate(prefilled)}
            spread = torch.tensor([at[s] for s in source], device=device)
            out = replace(out, logits=out.logits[spread], hidden_states=[h[spread] for h in out.hidden_states])
            prompt_scores = None if prompt_scores is None else [x[spread] for x in prompt_scores]
        if prompt_scores is not None:
            self._keep_prompt_scores(batch, taken, requests, prompt_scores)
        if self.caches_prefixes:  # what each slot now holds, for the next request to take it
            valid = dict(zip(prefilled, (valid_scores(start, r, asked) for start, r in zip(starts, resident))))
            batch.prefixes.keep_admitted(free, [r.prompt for r in requests], out.hidden_states, prompt_scores,
                                         [valid[source[k] if share else k] for k in range(len(free))])
        logits = out.logits if whole else out.logits.new_zeros(slots, *out.logits.shape[1:]).index_copy(0, rows, out.logits)
        admitted = [False] * slots
        for b in free:
            admitted[b] = True
        no_drafts = self._no_drafts = DraftProposal(tokens=state.tokens.new_zeros(slots, 0),
                                                    num_tokens=state.tokens.new_zeros(slots))  # also for skipped rounds
        uniforms = _draw_uniforms(batch.generators, admitted, self.verifier.num_uniforms(0, params), device)
        first_logits = batch.stopper.suppress(logits, state)
        state.penalties = None
        if params.penalized:  # the history is the prompt (for the new requests)
            state.penalties = PenaltyHistory.of(state.tokens, state.prompt_lengths, state.lengths, logits.shape[-1])
            first_logits = state.penalties.penalize_verify(first_logits, no_drafts.tokens, no_drafts.num_tokens, params)
        if any(r.grammar is not None for r in requests) or batch.grammars is not None:
            if batch.grammars is None:
                batch.grammars = GrammarRows(slots, logits.shape[-1], batch.lookahead)
            for b, r in zip(free, requests):
                batch.grammars.admit(b, r.grammar, len(r.prompt))
            constrained = batch.grammars.constrained(free)
            if constrained:
                masks = batch.grammars.first_masks(constrained)  # [k, V] (the logits: [B, 1, V])
                masks = masks.view(-1, *[1] * (first_logits.dim() - 2), masks.shape[-1])
                first_logits = constrain(first_logits, constrained, masks)
        first = self.verifier.verify(first_logits, no_drafts, sampler=self.sampler, params=params, uniforms=uniforms)
        batch.stopper.append(state, first.tokens, torch.tensor(admitted, device=device).long(), logits)
        state.max_cache_len = max(state.max_cache_len, longest)
        if whole or not batch.drafter_started:  # a batch's first requests (the others' slots empty: no context)
            self.drafter.start(state, out if whole else replace(out, logits=logits, hidden_states=[
                h.new_zeros(slots, *h.shape[1:]).index_copy(0, rows, h) for h in out.hidden_states]), batch.cache.max_len)
            batch.drafter_started, batch.drafter_rows = True, slots
        else:
            self.drafter.admit(rows, state, out)

    @staticmethod
    def _collect(batch: "Batch", slots: list[int]) -> None:
        """Read the outputs (and log-probabilities) of the requests in ``slots`` and free the slots
        (one host read)."""
        if not slots:
            return
        state, rows = batch.state, torch.tensor(slots, device=batch.state.tokens.device)
        requests = [batch.holder[b] for b in slots]
        data = torch.cat([state.lengths[rows].unsqueeze(1), batch.cache.lengths[rows].unsqueeze(1), state.tokens[rows]],
                         1).tolist()
        for b, i, row in zip(slots, requests, data):
            batch.outputs[i] = row[2 + len(batch.requests[i].prompt): 2 + row[0]]
            batch.prefixes.extend(b, row[2: 2 + row[1]],  # (the tokens its cache rows hold)
                                  batch.history and batch.history.rows(b))
        spans = [(len(batch.requests[i].prompt), len(batch.outputs[i])) for i in requests]
        wanted = [batch.requests[i].logprobs for i in requests]  # (−1: none; k: k likeliest)
        if batch.stopper.logprobs is not None:
            for i in requests:
                batch.scores.tokens[i] = None
            asking = [j for j, k in enumerate(wanted) if k >= 0]  # (read only their rows)
            if asking:
                for j, row in zip(asking, batch.stopper.logprobs[rows[asking]].tolist()):
                    start, n = spans[j]
                    batch.scores.tokens[requests[j]] = row[start: start + n]
        if batch.stopper.top is not None:
            for i in requests:
                batch.scores.top[i] = None
            asking = [j for j, k in enumerate(wanted) if k >= 1]
            if asking:
                values, ids = (buffer[rows[asking]].tolist() for buffer in batch.stopper.top)
                for j, row_values, row_ids in zip(asking, values, ids):
                    (start, n), k = spans[j], wanted[j]
                    batch.scores.top[requests[j]] = [list(zip(row_ids[t][:k], row_values[t][:k]))
                                                     for t in range(start, start + n)]
        batch.counters.retire(rows, torch.tensor(requests, device=rows.device))
        batch.stopper.release(slots)
        for b in slots:
            batch.holder[b] = -1
            if batch.grammars is not None:
                batch.grammars.release(b)

    def _prefill_rows(self, batch: "Batch", state: DecodingState, rows: torch.Tensor, prefilled: list[int],
                      which: list[int], starts: list[int], resident: list, asked: int, longest: int):
        """Prefill the admitted requests ``prefilled[j]`` for ``j`` in ``which`` (their ``rows``), each
        from ``starts[j]`` (:meth:`_prefill_from`; ``starts[j]`` set to 0 where it prefilled the
        whole prompt)."""
        index = rows[[prefilled[j] for j in which]]
        lengths = state.prompt_lengths[index]
        part = replace(state, tokens=state.tokens[index], prompt_lengths=lengths, lengths=lengths.clone(),
                       done=state.done[index])
        out, scores, begins = self._prefill_from(batch, part, index, [starts[j] for j in which],
                                                 [resident[j] for j in which], asked, longest)
        for j, begin in zip(which, begins):
            starts[j] = begin
        return out, scores

    def _prefill_from(self, batch: "Batch", part: DecodingState, index: torch.Tensor, begins: list[int],
                      kept: list, asked: int, longest: int):
        """Prefill the prompts of ``part`` (a state over the cache rows ``index``: their tokens and
        prompt lengths) each from ``begins[k]``, and put the suffixes' outputs back at their
        prompts' positions with what their resident prompts ``kept``: the hidden states
        ``[k, longest, H]`` and scores ``[k, longest − 1]`` (+ likeliest) as after a prefill of the
        whole prompts. Where the padded suffixes would not fit the cache, the whole prompts.
        Returns the output, the scores and the positions each prefill began at."""
        lengths = part.prompt_lengths.tolist()
        counts = [int(n) - b for n, b in zip(lengths, begins)]
        kv_len = max(b + max(counts) for b in begins)
        if kv_len > batch.cache.max_len:  # (the padded suffixes would not fit: prefill whole prompts)
            begins, counts, kv_len = [0] * len(begins), [int(n) for n in lengths], longest
        out, scores = self._prefill(part, batch.cache.rows(index), begins, max(counts), kv_len, asked)
        if not any(begins) and max(counts) == longest:
            return out, scores, begins
        out = replace(out, hidden_states=[with_prefixes(h, [r and r.hidden[layer] for r in kept], begins, counts, longest)
                                          for layer, h in enumerate(out.hidden_states)])
        if scores is not None:
            scores = [with_prefixes(x, [r and r.scores and (r.scores[i] if i < len(r.scores) else None) for r in kept],
                                    begins, [c - 1 for c in counts], longest - 1) for i, x in enumerate(scores)]
        return out, scores, begins

    def _chunks(self, batch: "Batch", pairs: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], list[tuple]]:
        """Chunked prefill (:attr:`EngineConfig.prefill_chunk`): the step prefills at most that many
        new prompt positions, first for the prompts being prefilled in chunks already
        (``batch.prefilling``, oldest first), then for the requests taking slots now (``pairs``:
        slot, request; first come, first served). A prompt whose rest fits what is left is admitted
        now (returned as a pair); one that does not prefills what is left — ``(slot, request, end)``:
        the prompt up to ``end`` goes into the slot (:meth:`_prefill_chunks`) — and holds the slot
        from then on (its last request collected), its prompt counted in the prefix-cache figures
        with what the slot held of it before the first chunk. Requests that find nothing left go
        back to the front of the queue, in order. Notes in ``batch.chunked`` whether prefill work is
        left for later steps (then a round of the requests decoding comes first)."""
        budget, admitting, chunks, later = self.config.prefill_chunk, [], [], []
        for b, i in [*batch.prefilling.items(), *pairs]:
            new = b not in batch.prefilling
            if new and (budget <= 0 or later):
                later.append(i)
                continue
            request = batch.requests[i]
            start = batch.prefixes.reusable(b, request.prompt, request.prompt_logprobs)
            held = start + 1 if start else 0  # (positions the slot holds: the last one is fed again)
            rest = len(request.prompt) - held
            if rest <= budget:
                admitting.append((b, i))
                batch.prefilling.pop(b, None)
                batch.prefilled_to.pop(b, None)
                budget -= rest
                continue
            if budget <= 0:  # (in chunks already: its next one in a later step)
                continue
            if new:
                self._collect(batch, [b] if batch.holder[b] >= 0 else [])
                batch.prefilling[b] = i
                batch.counted.add(i)
                batch.prefixes.queries += len(request.prompt)
                batch.prefixes.hits += start
            chunks.append((b, i, held + budget))
            budget = 0
        batch.waiting.extendleft(reversed(later))
        batch.chunked = bool(batch.prefilling or later)
        return admitting, chunks

    def _prefill_chunks(self, batch: "Batch", chunks: list[tuple[int, int, int]]) -> None:
        """One chunk of each prompt prefilled in parts (``chunks``: slot, request, end): the prompt up
        to ``end`` goes into the slot's rows from what they hold, as a prompt of its own — its
        hidden states and scores kept with the slot (:class:`~dspark.prefix_cache.ResidentPrompt`)
        for the next chunk to reuse, the last one in the request's admission. No token is drawn,
        and the batch's state is left as it was (the slot rides along in rounds as a free one)."""
        state, device = batch.state, self.device
        slots = [b for b, _, _ in chunks]
        parts = [batch.requests[i].prompt[:end] for _, i, end in chunks]
        tops = [batch.requests[i].prompt_logprobs for _, i, _ in chunks]
        asked, longest, width = max(tops), max(len(p) for p in parts), state.tokens.shape[1]
        starts = [batch.prefixes.reusable(b, p, top) for b, p, top in zip(slots, parts, tops)]
        resident = [batch.prefixes.resident[b] if start else None for b, start in zip(slots, starts)]
        ends = torch.tensor([len(p) for p in parts], dtype=torch.long, device=device)
        part = replace(state, tokens=torch.tensor([p + [0] * (width - len(p)) for p in parts], dtype=torch.long,
                                                  device=device),
                       prompt_lengths=ends, lengths=ends.clone(), done=torch.ones_like(ends, dtype=torch.bool))
        out, scores, starts = self._prefill_from(batch, part, torch.tensor(slots, device=device), starts, resident,
                                                 asked, longest)
        batch.prefixes.keep_admitted(slots, parts, out.hidden_states, scores,
                                     [valid_scores(start, r, asked) for start, r in zip(starts, resident)])
        batch.prefilled_to.update((b, len(p)) for b, p in zip(slots, parts))

    @staticmethod
    def _keep_prompt_scores(batch: "Batch", taken: list[int], requests: list["Request"],
                            prompt_scores: list[torch.Tensor]) -> None:
        """Note the prompt scores of the admitted requests ``taken`` that asked for them (one host read)."""
        asking = [j for j, r in enumerate(requests) if r.prompt_logprobs >= 0]
        values = prompt_scores[0][asking].tolist()
        if any(requests[j].prompt_logprobs > 0 for j in asking):
            top_values, top_ids = (x[asking].tolist() for x in prompt_scores[1:])
        for at, j in enumerate(asking):
            i, k, n = taken[j], requests[j].prompt_logprobs, len(requests[j].prompt) - 1
            batch.scores.prompt[i] = [None] + values[at][:n]
            if k > 0:
                batch.scores.prompt_top[i] = [None] + [list(zip(ids[:k], lps[:k]))
                                                       for lps, ids in zip(top_values[at][:n], top_ids[at][:n])]

    def _prefill(self, state: DecodingState, cache, starts: list[int], width: int, kv_len: int, prompt_top: int = -1):
        """The prompts' forward into the cache from positions ``starts`` on (what a row already holds;
        usually 0): row ``b`` feeds ``prompt[starts[b]:]``, ``width`` its longest such suffix, into a
        cache read up to ``kv_len`` (≥ every ``starts[b] + width``). Returns its output (the logits
        after each prompt's last token ``[B, 1, V]``, the drafter's hidden states over the suffixes
        ``[B, width, H]``) and, when ``prompt_top ≥ 0``, the suffixes' scores: at suffix position
        ``t``, log p(next prompt token) ``[B, width − 1]`` (a row's last ``width − len`` columns are
        padding; no prompt token follows the last position), then with ``prompt_top = k > 0`` the
        ``k`` likeliest tokens' log-probabilities and ids there (``[B, width − 1, k]`` each, likeliest
        first). A model that maps its last layer's output
        to logits (``logits_of``, the native models) scores the prompt in chunks of
        :data:`PROMPT_SCORE_CHUNK` positions; others return the logits at every position at once."""
        target, batch = self.target, state.batch_size
        layers, scored = tuple(self.drafter.hidden_layers), prompt_top >= 0
        begin = torch.tensor(starts, dtype=torch.long, device=state.tokens.device)
        columns = begin.unsqueeze(1) + torch.arange(width, device=begin.device)  # [B, width]: the positions fed
        edge = state.tokens.shape[1] - 1
        num_new = state.prompt_lengths - begin
        cache.set_lengths(begin)
        chunked = scored and hasattr(target, "logits_of")
        positions = (num_new - 1).unsqueeze(1)
        if scored and not chunked:
            positions = torch.arange(width, device=begin.device).expand(batch, -1)
        out = target(state.tokens.gather(1, columns.clamp(max=edge)), cache, num_new, logits_positions=positions,
                     hidden_layers=layers + ((target.num_layers - 1,) if chunked else ()), kv_len=kv_len)
        if not scored:
            return out, None
        scored_columns = columns[:, :width - 1]  # [B, width − 1]: the positions a prompt token follows
        following = state.tokens.gather(1, (scored_columns + 1).clamp(max=edge))  # the token each one predicts

        def score(logits: torch.Tensor, tokens: torch.Tensor) -> list[torch.Tensor]:
            distributions = torch.log_softmax(logits.float(), -1)
            chosen = distributions.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
            return [chosen, *distributions.topk(prompt_top, -1)] if prompt_top > 0 else [chosen]

        if chunked:
            hidden = out.hidden_states[-1][:, :width - 1]
            out = replace(out, hidden_states=out.hidden_states[:len(layers)])
            parts = [score(target.logits_of(hidden[:, i:i + PROMPT_SCORE_CHUNK]), following[:, i:i + PROMPT_SCORE_CHUNK])
                     for i in range(0, max(width - 1, 1), PROMPT_SCORE_CHUNK)]  # (one empty chunk when nothing is scored)
            return out, [torch.cat(pieces, 1) for pieces in zip(*parts)]
        scores = score(out.logits[:, :width - 1], following)
        last = (num_new - 1).view(-1, 1, 1).expand(-1, 1, out.logits.shape[-1])
        return replace(out, logits=out.logits.gather(1, last)), scores

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
                stream: "_TokenStream | None" = None) -> list[int]:
        """One host read: ``[done_0 .. done_{B-1}, longest cache, total length, *scheduler summary]``
        (the longest of ``cache_lengths``: the rows the next round runs over, or more). A stream's
        window is read with it and handed over; a request its stop check ends is marked done, and
        its length cut, here (between rounds, no extra read)."""
        parts = [state.done.long(), cache_lengths.max().view(1), state.lengths.sum().view(1)]
        if summary is not None:
            parts.append(summary)
        if stream is None:
            return torch.cat(parts).tolist()
        status = torch.cat([*parts, stream.window(state)]).tolist()
        batch, size = state.batch_size, stream.size(state.batch_size)
        for b, length, dropped in stream.emit(status[-size:]):  # a stop string ended request b
            state.done[b], state.lengths[b] = True, length
            status[b], status[batch + 1] = 1, status[batch + 1] - dropped
        return status[:-size]

    def _round(self, state: DecodingState, cache, generators, active: list[bool], stopper: "_Stopper",
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
        uniforms = _draw_uniforms(generators, active, n_draft + self.verifier.num_uniforms(gamma, params), self.device)

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
        finished, num_drafted = state.done.clone(), proposal.num_tokens
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
        # alone is drafted where the drafter proposed another)
        drafters_verified = num_verify  # (the scheduler learns from the drafter's own choices alone)
        if constrained:
            grammar = grammars.round_masks(state, proposal.tokens, num_verify, constrained,
                                           force=drafting and self.drafter.replaceable_drafts, guide=guide)
            rows = torch.tensor(constrained, device=self.device)
            if grammar.dictated is not None:  # (up to the first draft the grammar dictated)
                drafters_verified = num_verify.index_copy(0, rows, torch.minimum(num_verify[rows], grammar.dictated))
            if grammar.forced is not None:
                num_verify = num_verify.index_copy(0, rows, grammar.verify)
                proposal = replace(with_forced(proposal, constrained, grammar.forced), num_tokens=num_verify)
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
            logits = constrain(logits, constrained, grammar.allowed)
        result = self.verifier.verify(logits, proposal, sampler=self.sampler, params=params, uniforms=verifier_uniforms)
        num_accepted = torch.where(finished, 0, result.num_accepted)
        if drafting:
            self.scheduler.record(drafters_verified, num_accepted if drafters_verified is num_verify
                                  else torch.minimum(num_accepted, drafters_verified))
        clock.lap(counters, 2)
        # 5. accept: append accepted drafts + 1, stop at EOS / max_new_tokens (may emit fewer)
        emitted = stopper.append(state, result.tokens, torch.where(finished, 0, num_accepted + 1), out.logits)
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
        counters.update(finished, num_verify, num_accepted, num_drafted, predicted, drafted=drafting)
        for hook in self.round_hooks:
            hook(proposal, result, ~finished)
        return drafting


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
    stopper: "_Stopper"
    counters: RoundCounters
    stream: "_TokenStream | None"
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

    def finish_reason(self, request: int) -> str:
        """Why a finished request ended: ``"abort"`` (:meth:`Engine.abort`), ``"stop"`` (EOS, one of
        its stop tokens, or its stop check: a stop string) or ``"length"`` (its budget)."""
        ids = self.outputs[request]
        if request in self.aborted:
            return "abort"
        if (self.stream is not None and request in self.stream.stopped) or (
                ids and ids[-1] in self.requests[request].stop_ids):
            return "stop"
        return "length"

    def mark_finished(self, now: float) -> None:
        """Note ``now`` for each request the last status read shows done for the first time."""
        for b, request in enumerate(self.holder):
            if request >= 0 and self.status[b] and self.finished[request] is None:
                self.finished[request] = now - self.started


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
#: prompt positions scored per LM-head call for ``prompt_logprobs`` (bounds the logits held at once)
PROMPT_SCORE_CHUNK = 512


def _per_request(value, batch: int) -> list:
    """A setting given once for all requests (a number or bool: a budget, ``min_new_tokens``,
    ``ignore_eos``) or as a list, one per request."""
    return list(value) if isinstance(value, (list, tuple)) else [value] * batch


def _stop_ids(eos_token_ids: tuple[int, ...], ignore_eos, stop_token_ids, batch: int) -> list[tuple[int, ...]]:
    """Each request's stop ids — EOS unless it ignores it, then its stop tokens
    (``stop_token_ids``: one id list for all, or one per request)."""
    per_request = bool(stop_token_ids) and isinstance(stop_token_ids[0], (list, tuple))
    if per_request and len(stop_token_ids) != batch:
        raise ValueError(f"stop_token_ids has {len(stop_token_ids)} lists for {batch} prompts: give one per prompt")
    ignore_eos = _per_request(ignore_eos, batch)
    if len(ignore_eos) != batch:
        raise ValueError(f"ignore_eos has {len(ignore_eos)} entries for {batch} prompts: give one per prompt")
    return [(() if ignore else eos_token_ids) + tuple(int(t) for t in (stop_token_ids[b] if per_request else stop_token_ids))
            for b, ignore in enumerate(ignore_eos)]


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _draw_uniforms(generators: list[torch.Generator], active: list[bool], count: int, device) -> torch.Tensor:
    """``[B, count]`` uniforms in [0, 1); each active request draws from its own generator, finished
    requests draw nothing (their rows are zeros), so a request's stream never depends on the batch."""
    uniforms = torch.zeros(len(generators), count, device=device)
    for b, generator in enumerate(generators):
        if active[b] and count:
            uniforms[b].uniform_(generator=generator)
    return uniforms


class _TokenStream:
    """The tokens each request emitted since the last status read, read with it (its last
    ``width`` tokens and its length; a round emits at most γ + 1): handed to ``on_tokens`` and
    checked by ``stop_check``, which may end the request after one of them (see :meth:`emit`)."""

    def __init__(self, batch: int, width: int, on_tokens: Callable[[int, list[int]], None] | None,
                 stop_check: Callable[[int, list[int]], int | None] | None):
        self.on_tokens, self.stop_check, self.width = on_tokens, stop_check, width
        self.sent = [0] * batch  # tokens of each slot's request already handed over (prompt included)
        self.request = [-1] * batch  # the request each slot holds (its index in the call)
        self.stopped: set[int] = set()  # requests a stop check ended

    def admit(self, slots: list[int], requests: list[int], prompt_lengths: list[int]) -> None:
        """Requests took these slots: nothing of theirs handed over yet but the prompt."""
        for b, i, length in zip(slots, requests, prompt_lengths):
            self.sent[b], self.request[b] = length, i

    def size(self, batch: int) -> int:
        return batch * (1 + self.width)

    def window(self, state: DecodingState) -> torch.Tensor:
        """``[B · (1 + width)]``: each request's length, then its last ``width`` tokens."""
        start = state.lengths.unsqueeze(1) - self.width
        positions = (start + torch.arange(self.width, device=start.device)).clamp(min=0)
        return torch.cat([state.lengths.unsqueeze(1), state.tokens.gather(1, positions)], 1).flatten()

    def emit(self, values: list[int]) -> list[tuple[int, int, int]]:
        """Hand over the new tokens in ``values`` (the host copy of :meth:`window`); return
        ``(slot, length, dropped)`` for each request a stop check ended: its new length and how
        many emitted tokens past the stop it loses."""
        row, ended = 1 + self.width, []
        for b in range(len(self.sent)):
            length, last = values[b * row], values[b * row + 1: (b + 1) * row]
            new = length - self.sent[b]
            if new > self.width:  # cannot happen: a round emits at most γ + 1 tokens per request
                raise RuntimeError(f"request {b} emitted {new} tokens in one round, more than {self.width}")
            request = self.request[b]
            if new <= 0 or request < 0:  # (an empty slot)
                continue
            ids = last[self.width - new:]
            kept = None if self.stop_check is None else self.stop_check(request, ids)
            if kept is not None:
                self.stopped.add(request)
                ids = ids[:kept]
                ended.append((b, self.sent[b] + kept, new - kept))
            self.sent[b] += len(ids)
            if self.on_tokens is not None:
                self.on_tokens(request, ids)
        return ended


class _Stopper:
    """Appends emitted tokens to the state and marks requests done at a stop id or the token budget;
    keeps each request's stop ids out of its first ``min_new_tokens`` tokens. Per slot of the
    batch, set by :meth:`admit` as requests take the slots.

    Args:
        batch: slots. logprobs, top: the buffers the log-probabilities go to (``None``: not asked for).
    """

    def __init__(self, batch: int, vocab_size: int, device, logprobs: torch.Tensor | None = None,
                 top: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.eos = torch.full((batch, 0), -1, dtype=torch.long, device=device)  # [B, E], −1 padding
        # [B] budgets; an empty slot's never binds (it is done, and its commits add nothing)
        self.max_new_tokens = torch.full((batch,), 2**40, dtype=torch.long, device=device)
        self.logprobs, self.top = logprobs, top
        self.vocab_size = vocab_size
        self.min_new = [0] * batch  # (host)
        self.longest_hold = 0  # (host int)
        self.calls = 0  # target distributions suppressed since the last admission (host int)
        self.min_new_tokens = self.stop_vocab = None  # [B], [B, V]: once a request holds stop ids back
        self.wants = [-1] * batch  # (host) each slot's request's log-probabilities: −1 none, k ≥ 0: k likeliest

    def admit(self, rows: torch.Tensor, slots: list[int], requests: list) -> None:
        """New requests (:class:`Request`) in ``slots`` (``rows`` on the device): their stop ids,
        budgets and ``min_new_tokens``."""
        device, batch = rows.device, self.eos.shape[0]
        width = max(self.eos.shape[1], *(len(r.stop_ids) for r in requests))
        if width > self.eos.shape[1]:  # a request with more stop ids than any before: widen
            self.eos = torch.cat([self.eos, self.eos.new_full((batch, width - self.eos.shape[1]), -1)], 1)
        eos = torch.tensor([list(r.stop_ids) + [-1] * (width - len(r.stop_ids)) for r in requests], dtype=torch.long,
                           device=device).view(len(requests), width)
        self.eos[rows] = eos
        self.max_new_tokens[rows] = torch.tensor([r.budget for r in requests], dtype=torch.long, device=device)
        for b, request in zip(slots, requests):
            self.min_new[b] = request.min_new if request.stop_ids else 0
            self.wants[b] = -1 if request.logprobs is None else request.logprobs
        if self.stop_vocab is None and any(self.min_new):
            self.min_new_tokens = torch.zeros(batch, dtype=torch.long, device=device)
            self.stop_vocab = torch.zeros(batch, self.vocab_size, dtype=torch.bool, device=device)
        if self.stop_vocab is not None:
            self.min_new_tokens[rows] = torch.tensor([self.min_new[b] for b in slots], dtype=torch.long, device=device)
            spare = torch.where(eos >= 0, eos, self.vocab_size)  # padding → a spare column
            self.stop_vocab[rows] = torch.zeros(len(slots), self.vocab_size + 1, dtype=torch.bool, device=device).scatter_(
                1, spare, True)[:, :self.vocab_size]
            self.calls, self.longest_hold = 0, max(self.min_new)

    def release(self, slots: list[int]) -> None:
        """The requests in ``slots`` were collected: nothing of theirs to record any more."""
        for b in slots:
            self.wants[b] = -1

    def suppress(self, logits: torch.Tensor, state: DecodingState) -> torch.Tensor:
        """The target's logits ``[B, K, V]`` for positions 0..K−1 after each request's last token, with
        its stop ids at −∞ where they would be among its first ``min_new_tokens`` generated
        tokens. Verification then samples from (and accepts drafts by) this distribution, so
        suppressing stays exact. A request has ≥ n − 1 tokens before the n-th call since it was
        admitted (one per call at least): once ``calls ≥`` the largest ``min_new_tokens`` of the
        batch nothing is left to suppress, and the logits pass. (``state``: the first ``B`` slots.)"""
        if self.calls >= self.longest_hold:
            return logits
        self.calls += 1
        rows = state.batch_size
        generated = state.lengths - state.prompt_lengths  # [B]: tokens before position 0's
        early = (generated.unsqueeze(1) + torch.arange(logits.shape[1], device=logits.device)
                 < self.min_new_tokens[:rows].unsqueeze(1))
        return logits.masked_fill(early.unsqueeze(-1) & self.stop_vocab[:rows].unsqueeze(1), float("-inf"))

    def append(self, state: DecodingState, emitted: torch.Tensor, num_emitted: torch.Tensor,
               logits: torch.Tensor) -> torch.Tensor:
        """Append ``emitted`` ``[B, K]``, of which the first ``num_emitted[b]`` are real; return how many
        were kept ``[B]`` (fewer after an EOS or when the budget runs out). One kernel for the batch.
        With :attr:`logprobs` (a ``[B, S]`` buffer beside ``state.tokens``), also record each
        token's log-probability under the target's ``logits`` ``[B, ≥K, V]`` it was drawn after, and
        with :attr:`top` (``[B, S, k]`` values and token ids) the ``k`` likeliest there; as with the
        tokens, what lands past a request's new length is never read (and is overwritten). Only
        while a request that asks for them holds a slot (:attr:`wants`), and as many likeliest
        tokens as the most any of them asks for: the others pay nothing. (``state``: the first
        ``B`` slots.)"""
        rows = state.batch_size
        kept = kernels.commit_tokens(state.tokens, state.lengths, state.prompt_lengths, state.done, emitted,
                                     num_emitted, self.eos[:rows], self.max_new_tokens[:rows])
        want = max(self.wants[:rows])
        if self.logprobs is not None and want >= 0:
            width = emitted.shape[1]
            distributions = torch.log_softmax(logits[:, :width].float(), -1)  # [B, K, V]
            start = state.lengths - kept  # where this call's tokens went
            positions = start.unsqueeze(1) + torch.arange(width, device=kept.device)  # [B, K]; γ + 1 spare columns
            self.logprobs[:rows].scatter_(1, positions, distributions.gather(-1, emitted.unsqueeze(-1)).squeeze(-1))
            if self.top is not None and want > 0:
                values, ids = distributions.topk(want, -1)  # [B, K, k], likeliest first
                index = positions.unsqueeze(-1).expand_as(ids)
                self.top[0][:rows, :, :want].scatter_(1, index, values)
                self.top[1][:rows, :, :want].scatter_(1, index, ids)
        return kept
