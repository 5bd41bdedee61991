"""Requests that arrive while others decode: the serving loop over continuous batching.

``generate`` takes every request at once. A server gets them one by one: :class:`Session` takes a
request whenever it comes (:meth:`Session.submit`), and each :meth:`Session.step` either admits
waiting requests into free slots or decodes one round, returning what every request emitted
(vLLM's ``LLMEngine.add_request`` / ``step``). A request decodes exactly as it would alone,
whenever it was submitted and whatever it shares the batch with.

    session = pipe.session(max_len=512)
    first = session.submit("def add(a, b):", max_new_tokens=32)
    while session.unfinished:
        for update in session.step():
            print(update.request, update.token_ids, update.finished)
        if ...:  # a new request arrived
            session.submit("import os", max_new_tokens=16, temperature=0.8, seed=3)
    print(session.result(first).text)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dspark.engine import Batch
from dspark.records import SamplingParams
from dspark.streaming import CONTEXT_TOKENS, decode_continuation


@dataclass
class RequestUpdate:
    """What one :meth:`Session.step` brought for a request.

    Attributes:
        request: the request's id (what :meth:`Session.submit` returned).
        token_ids: the tokens it emitted in this step (final; a request's updates concatenate to
            its output; empty when a stop string ended it on tokens already handed over).
        finished: whether it ended in this step (:meth:`Session.result` then has its output).
        logprobs, top_logprobs: for a request that asked for them, those of ``token_ids`` (as
            :class:`RequestOutput` has them for the whole output), else ``None``.
        prompt_logprobs, prompt_top_logprobs: on a request's first update, its prompt's scores
            when it asked for them (as :class:`RequestOutput` has them), else ``None``.
    """

    request: int
    token_ids: list[int]
    finished: bool
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None


@dataclass
class RequestOutput:
    """A finished request (:meth:`Session.result`), as one row of ``generate``'s result.

    Attributes:
        token_ids: the generated ids. text: their text (with a tokenizer, else ``None``).
        finish_reason: why it ended: ``"stop"`` (EOS, a stop token or a stop string), ``"length"``
            (its ``max_new_tokens``), ``"abort"`` (:meth:`Session.abort`) or ``"error"`` (the
            distribution of its next token had no mass — a grammar's dead end, say: it ended
            before that token, and the engine's log says why).
        prompt_token_ids: its prompt, as the target read it.
        logprobs, top_logprobs, prompt_logprobs, prompt_top_logprobs: as the request asked for them
            (by default: as the session was opened to record them; else ``None``).
        stats: its counters (target forwards, drafted / verified / accepted tokens) and timings
            (``first_token_s`` / ``finished_s``: seconds since the session opened).
    """

    token_ids: list[int]
    text: str | None
    finish_reason: str
    prompt_token_ids: list[int]
    logprobs: list[float] | None
    top_logprobs: list[list[tuple[int, float]]] | None
    prompt_logprobs: list[float | None] | None
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None
    stats: dict


class Session:
    """A batch of ``engine.max_batch_size`` slots that requests join as they are submitted (see the
    module docstring). Open one with :meth:`Pipeline.session <dspark.pipeline.Pipeline.session>`.

    Args:
        pipeline: the pipeline whose engine decodes (it must batch continuously:
            ``engine.batching`` ``auto`` or ``continuous`` with a drafter that implements
            ``admit`` and a cache with row views).
        max_len: positions per request (prompt + ``max_new_tokens`` + γ + 1 at most); default
            ``cache.max_len``. The cache holds ``max_batch_size × max_len`` positions.
        logprobs, top_logprobs, prompt_logprobs, prompt_top_logprobs: as for ``generate``, for
            every request; with ``logprobs``, a request may ask for fewer (``submit(logprobs=False)``,
            a smaller ``top_logprobs``) and pays only for what it asks. The prompt's scores are
            computed at admission, so any request may ask for them (``submit(prompt_logprobs=True,
            prompt_top_logprobs=k)``) whatever the session's default.
    """

    def __init__(self, pipeline, *, max_len: int | None = None, logprobs: bool = False, top_logprobs: int = 0,
                 prompt_logprobs: bool = False, prompt_top_logprobs: int = 0):
        from dspark.pipeline import _is_integer, check_score_options

        engine = pipeline.engine
        if not engine.continuous:
            raise ValueError("a Session needs continuous batching, and this engine decodes in static batches "
                             f"(engine.batching={engine.config.batching}; the drafter must implement admit() and the "
                             "cache have row views)")
        top_logprobs, prompt_top_logprobs = check_score_options(logprobs, top_logprobs, prompt_logprobs,
                                                                prompt_top_logprobs)
        lookahead = engine.drafter.gamma + 1
        positions = getattr(engine.target, "max_position_embeddings", None)
        limit = None if positions is None else positions + lookahead  # (more could never be used)
        if max_len is None:
            max_len = engine.cache_config.max_len
            if max_len is None:
                raise ValueError("a Session needs max_len, the positions per request (prompt + max_new_tokens + "
                                 f"{lookahead} at most; dspark serve: --max-len), or cache.max_len in the config")
            if limit is not None and max_len > limit:
                max_len = limit  # (cache.max_len may be sized for larger batches of other models)
        if not _is_integer(max_len) or max_len < engine.drafter.gamma + 2:
            raise ValueError(f"max_len must be an integer >= {engine.drafter.gamma + 2}, got {max_len!r}")
        max_len = int(max_len)
        self.pipeline, self.engine = pipeline, engine
        self._emitted: dict[int, list[int]] = {}
        self._checks: list = []
        self._ended: set[int] = set()
        self._released: set[int] = set()
        self._reported: set[int] = set()  # requests that had an update
        self._options = dict(logprobs=logprobs, top_logprobs=top_logprobs, prompt_logprobs=prompt_logprobs,
                             prompt_top_logprobs=prompt_top_logprobs)
        self.batch: Batch = engine.open_batch(engine.config.max_batch_size, max_len, on_tokens=self._on_tokens,
                                              stop_check=self._stop_check, **self._options)

    def warm_up(self, rows: int | None = None) -> None:
        """Meet the shapes this session's rounds will run at before any request does. On a batch of
        this session's shape, dummy requests (one-token prompts) arrive one at a time until ``rows``
        of them decode together (default: every slot), each admitted into the running batch, then
        leave the same way, the last first (aborted), with two rounds between two changes — so
        rounds run over every number of rows they can (with ``engine.trim_idle_slots``, the powers
        of two up to ``rows``), growing and shrinking as with real traffic; greedy, then sampled.
        Then the session starts afresh, and its scheduler forgets what those rounds taught it
        (:meth:`~dspark.scheduling.Scheduler.forget`). With ``engine.compile`` this is where the
        target's and the drafter's rounds compile (seconds to a minute each on a CPU) rather than
        on the first requests of each load. Still compiled on first use: a setting first turned
        on later (a penalty, say), requests with different settings in one round, and a verify
        width the dummy rounds did not meet (a scheduler or a drafter that stops early narrows
        it). Only before the first :meth:`submit`."""
        engine, batch = self.engine, self.batch
        if batch.requests:
            raise ValueError("warm_up() comes before the first submit(): it decodes dummy requests on a batch of its "
                             f"own, and this session holds {len(batch.requests)} request(s)")
        slots, max_len, gamma = batch.state.batch_size, batch.max_len, engine.drafter.gamma
        top = slots if rows is None else rows
        if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= slots:
            raise ValueError(f"warm_up(rows=...) takes a number of rows from 1 to the session's {slots} slots, "
                             f"got {rows!r}")
        budget = max_len - 1 - (gamma + 1)  # (a one-token prompt, one round of lookahead)
        if budget < 1:
            raise ValueError(f"max_len {max_len} leaves no token to decode after a one-token prompt and a round of "
                             f"lookahead ({gamma + 1}): warm_up() needs max_len >= {gamma + 3}")
        for params in (SamplingParams(), SamplingParams(temperature=1.0)):
            dummy = engine.open_batch(slots, max_len, **self._options)
            for seed in range(top):  # one more at a time: an admission, then two rounds over the rows so far
                dummy.add(engine.request([0], max_new_tokens=budget, params=params, seed=seed, ignore_eos=True))
                for _ in range(3):
                    engine.step(dummy)
                engine.collect_finished(dummy)
            for request in reversed(range(top)):  # then the last one leaves, two rounds at a time
                engine.abort(dummy, request)
                engine.step(dummy)
                engine.step(dummy)
        engine.scheduler.forget()
        self.batch = engine.open_batch(slots, max_len, on_tokens=self._on_tokens, stop_check=self._stop_check,
                                       **self._options)

    def submit(self, prompt, *, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               min_p: float = 0.0, repetition_penalty: float = 1.0, presence_penalty: float = 0.0,
               frequency_penalty: float = 0.0, no_repeat_ngram_size: int = 0, logit_bias: dict[int, float] | None = None,
               seed: int | None = None, ignore_eos: bool = False, stop_token_ids: list[int] | None = None,
               stop: list[str] | None = None, min_new_tokens: int = 0, logprobs: bool | None = None,
               top_logprobs: int | None = None, prompt_logprobs: bool | None = None,
               prompt_top_logprobs: int | None = None, grammar=None) -> int:
        """Queue one request (a string, with a tokenizer, or token ids) with ``generate``'s settings
        for one request; it joins the batch at the next :meth:`step` that finds a slot free.
        Everything is checked first (a bad value raises, and nothing is queued). ``seed=None``:
        a fresh seed. ``logprobs`` / ``top_logprobs``: this request's (default: the session's;
        a session opened with ``logprobs=True, top_logprobs=K`` records them only for the requests
        that ask, up to ``K`` likeliest tokens, and costs the others nothing while none of those
        decodes). ``prompt_logprobs`` / ``prompt_top_logprobs``: likewise for the prompt's tokens
        (lm-eval-harness's loglikelihood reads them), any request may ask. ``grammar``: a
        :class:`~dspark.structured.Grammar` its output follows. Returns the request's id:
        0, 1, … in submission order."""
        from dspark.pipeline import check_score_options

        scores = prompt_scores = None  # (None: the session's setting)
        if logprobs is not None or top_logprobs is not None:
            top, _ = check_score_options(False if logprobs is None else logprobs, top_logprobs or 0, False)
            scores = top if logprobs else -1
        if prompt_logprobs is not None or prompt_top_logprobs is not None:
            _, top = check_score_options(False, 0, False if prompt_logprobs is None else prompt_logprobs,
                                         prompt_top_logprobs or 0)
            prompt_scores = top if prompt_logprobs else -1
        encoded, budgets, params, seeds, (ignore, stop_ids, checks, min_new) = self.pipeline._requests(
            [prompt], max_new_tokens, [seed], temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
            repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty, no_repeat_ngram_size=no_repeat_ngram_size, logit_bias=logit_bias,
            ignore_eos=ignore_eos, stop_token_ids=stop_token_ids, stop=stop, min_new_tokens=min_new_tokens)
        self.engine.check_fits([len(encoded[0])], budgets)
        grammars = self.pipeline._grammars(grammar, 1, ignore, min_new)
        request = self.engine.request(encoded[0], max_new_tokens=budgets[0],
                                      params=params if not isinstance(params, list) else params[0], seed=seeds[0],
                                      ignore_eos=ignore[0], stop_token_ids=stop_ids[0], min_new_tokens=min_new[0],
                                      logprobs=scores, prompt_logprobs=prompt_scores,
                                      grammar=None if grammars is None else grammars[0])
        index = self.batch.add(request)  # (refuses a request that does not fit max_len)
        self._checks.append(checks[0])
        return index

    def step(self) -> list[RequestUpdate]:
        """Admit waiting requests into free slots, or decode one round (nothing when no request is
        unfinished); returns an update for each request that emitted tokens or ended, by id."""
        self._emitted = {}
        self.engine.step(self.batch)
        scores = self._step_scores()  # (before the finished requests' slots are freed)
        ended = set(self.engine.collect_finished(self.batch))
        self._ended |= ended
        updates = [RequestUpdate(i, self._emitted.get(i, []), i in ended, *scores.get(i, (None, None)))
                   for i in sorted(set(self._emitted) | ended)]
        prompt = self.batch.scores
        for update in updates:  # a request's first: its prompt's scores
            if update.request not in self._reported:
                self._reported.add(update.request)
                update.prompt_logprobs = prompt.prompt[update.request]
                update.prompt_top_logprobs = prompt.prompt_top[update.request]
        return updates

    def _step_scores(self) -> dict[int, tuple[list[float], list | None]]:
        """The log-probabilities of this step's tokens, for the requests that emitted and asked
        for them (one read of the rows and positions they landed in)."""
        batch = self.batch
        asking = [(i, ids) for i, ids in self._emitted.items() if ids and batch.requests[i].logprobs >= 0]
        if not asking:
            return {}
        slot = {request: b for b, request in enumerate(batch.holder) if request >= 0}
        rows, positions = [], []
        for i, ids in asking:  # its new tokens end where the stream has handed its row over to
            end = batch.stream.sent[slot[i]]
            rows += [slot[i]] * len(ids)
            positions += range(end - len(ids), end)
        rows, positions = (torch.tensor(v, device=batch.state.tokens.device) for v in (rows, positions))
        values = batch.stopper.logprobs[rows, positions].tolist()
        if batch.stopper.top is not None and any(batch.requests[i].logprobs > 0 for i, _ in asking):
            top_values, top_ids = (buffer[rows, positions].tolist() for buffer in batch.stopper.top)
        scores, at = {}, 0
        for i, ids in asking:
            k, n = batch.requests[i].logprobs, len(ids)
            top = [list(zip(top_ids[t][:k], top_values[t][:k])) for t in range(at, at + n)] if k > 0 else None
            scores[i] = (values[at: at + n], top)
            at += n
        return scores

    def abort(self, request: int) -> bool:
        """End ``request`` now (a client went away): a waiting one never starts, a decoding one
        keeps what it emitted so far and frees its slot for the next. It is not reported by a later
        :meth:`step`; :meth:`result` has it (``finish_reason="abort"``). Returns whether it was
        unfinished (``False``: it had ended already, and keeps its own finish reason)."""
        ended = self.engine.abort(self.batch, request)
        if ended:
            self._ended.add(request)
        return ended

    def release(self, request: int) -> None:
        """Forget a finished request's prompt, output and scores (a long-running server calls this
        once it has sent a result); :meth:`result` then refuses it."""
        self._check_known(request)  # (first: True and 1.0 equal 1, and would pass the tests below)
        if request not in self._ended:
            raise ValueError(f"request {request!r} has not finished: abort() it first, or wait")
        batch = self.batch
        self._released.add(request)
        self._reported.discard(request)
        batch.requests[request] = batch.requests[request].released()
        batch.outputs[request] = self._checks[request] = None
        for scores in (batch.scores.tokens, batch.scores.top, batch.scores.prompt, batch.scores.prompt_top):
            if scores is not None:
                scores[request] = None

    def _check_known(self, request) -> None:
        """``ValueError`` naming ``request`` unless it is an id this session gave out."""
        self.batch.check_request(request, "session", "none submitted yet")

    @property
    def unfinished(self) -> int:
        """Requests submitted and not finished (waiting ones included)."""
        return self.batch.unfinished

    def prompt_token_ids(self, request: int) -> list[int]:
        """Request ``request``'s prompt ids (e.g. for :meth:`TextStreamer.start`)."""
        self._check_known(request)
        if request in self._released:
            raise ValueError(f"request {request} was released: its prompt is gone")
        return list(self.batch.requests[request].prompt)

    def result(self, request: int) -> RequestOutput:
        """The output of a finished request (``ValueError`` while it is not, or once released)."""
        self._check_known(request)
        if request not in self._ended:
            raise ValueError(f"request {request} has not finished (submitted: {len(self.batch.requests)})")
        if request in self._released:
            raise ValueError(f"request {request} was released: its output is gone")
        batch, tokenizer = self.batch, self.pipeline.tokenizer
        ids = batch.outputs[request]
        pick = lambda values: None if values is None else values[request]  # noqa: E731
        stats = dict(generated=len(ids), first_token_s=batch.first_token[request], finished_s=batch.finished[request])
        stats.update(zip(("target_forwards", "drafted", "verified", "accepted"),
                         batch.counters.per_request[:, request].tolist()))
        prompt = list(batch.requests[request].prompt)
        return RequestOutput(token_ids=ids, finish_reason=batch.finish_reason(request), prompt_token_ids=prompt,
                             text=None if tokenizer is None else decode_continuation(tokenizer, prompt[-CONTEXT_TOKENS:], ids),
                             logprobs=pick(batch.scores.tokens), top_logprobs=pick(batch.scores.top),
                             prompt_logprobs=pick(batch.scores.prompt), prompt_top_logprobs=pick(batch.scores.prompt_top),
                             stats=stats)

    def _on_tokens(self, request: int, ids: list[int]) -> None:
        self._emitted.setdefault(request, []).extend(ids)

    def _stop_check(self, request: int, ids: list[int]) -> int | None:
        check = self._checks[request]
        return None if check is None else check(request, ids)
