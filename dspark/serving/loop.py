"""The engine's thread: one :class:`~dspark.session.Session` stepped while requests come from
other threads.

HTTP handlers run on threads of their own; a session is not thread-safe, so one thread owns it.
Handlers hand requests over (:meth:`EngineLoop.submit`, which waits for the session's answer: an
id per request, or the error that refused them), and read what each request emits from a queue of
their own: an :class:`Emitted` per step, the last one with the request's output. The thread waits
for work only when nothing decodes; otherwise it takes whatever arrived between two steps.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

import torch

from dspark.serving.metrics import ServerMetrics
from dspark.session import RequestOutput, RequestUpdate


@dataclass
class Emitted:
    """What a request emitted in one step (its tag as the handler gave it: a choice index, say),
    with their log-probabilities when it asked for them, and on its first its prompt's
    (:class:`~dspark.session.RequestUpdate`'s). ``output`` is set on its last (the request ended:
    by a stop, its budget or an abort)."""

    tag: object
    token_ids: list[int]
    output: RequestOutput | None = None
    logprobs: list[float] | None = None
    top_logprobs: list | None = None
    prompt_logprobs: list | None = None
    prompt_top_logprobs: list | None = None


class EngineStopped(RuntimeError):
    """The engine's thread is not running (closed, or it failed: the error says how)."""


class EngineLoop:
    """Owns ``session`` on a thread of its own (:meth:`start`); other threads submit and abort.

    Args:
        session: the session to step (opened on the pipeline that serves).
    """

    def __init__(self, session):
        self.session = session
        self._inbox: queue.Queue = queue.Queue()
        self._listeners: dict[int, tuple[queue.Queue, object]] = {}  # request id → (its queue, its tag)
        self._thread = threading.Thread(target=self._run, name="dspark-engine", daemon=True)
        self.error: BaseException | None = None  # what stopped the thread, if it failed
        self.completed = 0  # requests that ended
        self.aborted = 0  # of which aborted (by abort() or close())
        self.metrics = ServerMetrics()  # (written by the engine's thread only)
        self._submitted: dict[int, float] = {}  # request id → when, on the session's clock

    def start(self) -> "EngineLoop":
        """Start the engine's thread; returns ``self``."""
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        """Whether the engine's thread is alive (not closed, not failed)."""
        return self._thread.is_alive()

    def submit(self, requests: list[dict], tags: list, events: queue.Queue) -> list[int]:
        """Submit ``requests`` (:meth:`Session.submit`'s keyword arguments each) at once; their
        :class:`Emitted` go to ``events`` tagged with ``tags``. Returns their ids. If the session
        refuses one, none of them is decoding (those already submitted are aborted) and its
        error is raised here, with the refused request's index in ``requests`` as
        ``err.refused_index``."""
        return self._ask("submit", (requests, tags, events))

    def next(self, events: queue.Queue):
        """The next item of ``events`` (a queue this loop writes to); :class:`EngineStopped` if the
        thread ended without writing one."""
        while True:
            try:
                return events.get(timeout=1.0)
            except queue.Empty:
                if not self.running and events.empty():
                    raise EngineStopped("the engine stopped" + (f": it failed ({self.error!r})" if self.error else ""))

    def snapshot(self) -> dict:
        """Counts as of now, taken by the engine's thread between two steps: requests ``running``
        and ``waiting``, and per draft position the request-rounds that ``reached`` it and that
        ``accepted`` it since the session opened."""
        return self._ask("snapshot", None)

    def abort(self, ids: list[int]) -> None:
        """End these requests (those still unfinished; each gets its last :class:`Emitted`)."""
        self._send(("abort", ids, None))

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop the thread once its current step ends; unfinished requests are aborted."""
        if self.running:
            self._inbox.put(("close", None, None))
            self._thread.join(timeout)

    def _ask(self, kind: str, payload):
        """Send a message and wait for the engine thread's answer (raised if it is an error)."""
        reply: queue.Queue = queue.Queue(maxsize=1)
        self._send((kind, payload, reply))
        answer = self.next(reply)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def _send(self, message: tuple) -> None:
        if not self.running:
            raise EngineStopped("the engine is not running" + (f": it failed ({self.error!r})" if self.error else ""))
        self._inbox.put(message)

    def _run(self) -> None:
        session = self.session
        try:
            while True:
                try:  # wait for a message only when nothing decodes
                    message = self._inbox.get(block=not session.unfinished)
                    while True:
                        if self._handle(*message):
                            return
                        message = self._inbox.get_nowait()
                except queue.Empty:
                    pass
                for update in session.step():
                    self._emit(update.request, update)
        except BaseException as err:  # tell every waiting handler, and refuse what comes next
            self.error = err
            for events, tag in self._listeners.values():
                events.put(EngineStopped(f"the engine failed: {err!r}"))
            raise
        finally:
            self._drain()

    def _handle(self, kind: str, payload, reply) -> bool:
        """Carry out one message; ``True`` to stop."""
        session = self.session
        if kind == "submit":
            requests, tags, events = payload
            ids = []
            try:
                for request in requests:
                    ids.append(session.submit(**request))
            except Exception as err:  # noqa: BLE001 — a refused request is the caller's error
                err.refused_index = len(ids)  # which of ``requests`` was refused
                for request in ids:
                    session.abort(request)
                    session.release(request)
                reply.put(err)
                return False
            now = time.perf_counter() - session.batch.started
            for request, tag in zip(ids, tags):
                self._listeners[request] = (events, tag)
                self._submitted[request] = now
            reply.put(ids)
        elif kind == "abort":
            for request in payload:
                if request in self._listeners and session.abort(request):
                    self.aborted += 1
                    self._emit(request)
        elif kind == "snapshot":
            batch = session.batch
            gamma = batch.counters.gamma
            counts = torch.cat([batch.counters.reached, batch.counters.accepted_at]).tolist() if gamma else []
            reply.put(dict(running=batch.running + len(batch.prefilling), waiting=len(batch.waiting),
                           reached=counts[:gamma], accepted=counts[gamma:], prefix_queries=batch.prefixes.queries,
                           prefix_hits=batch.prefixes.hits))
        elif kind == "close":
            for request in list(self._listeners):
                self.aborted += session.abort(request)
                self._emit(request)
            return True
        return False

    def _emit(self, request: int, update: RequestUpdate | None = None) -> None:
        """Pass ``update`` on to the request's listener (``None``: it was aborted, nothing more comes)."""
        events, tag = self._listeners[request]
        output = None
        if update is None or update.finished:
            output = self.session.result(request)
            self.session.release(request)
            self.metrics.finished(output, self._submitted.pop(request))
            del self._listeners[request]
            self.completed += 1
        if update is None:
            update = RequestUpdate(request, [], True)
        events.put(Emitted(tag, update.token_ids, output, update.logprobs, update.top_logprobs, update.prompt_logprobs,
                           update.prompt_top_logprobs))

    def _drain(self) -> None:
        """The thread is ending: answer what is still in the inbox."""
        while True:
            try:
                kind, _, reply = self._inbox.get_nowait()
            except queue.Empty:
                return
            if reply is not None:
                reply.put(EngineStopped("the engine stopped"))
