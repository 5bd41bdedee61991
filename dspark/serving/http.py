"""An OpenAI-compatible HTTP server over a pipeline: ``/v1/completions``, ``/v1/chat/completions``
(both with ``stream``), ``/v1/models``, ``/health``, ``/metrics`` (Prometheus' format:
:mod:`dspark.serving.metrics`), ``/tokenize``, ``/detokenize`` and ``/tokenizer_info`` — what
vLLM's and SGLang's servers answer, so that OpenAI clients, dashboards and lm-eval-harness talk to
dspark unchanged.

    server = OpenAIServer(dspark.build_pipeline("eagle3"), max_len=512, port=8000).start()
    # POST http://127.0.0.1:8000/v1/completions {"prompt": "def add(a, b):", "max_tokens": 32}
    server.close()

Every request joins one :class:`~dspark.session.Session` (continuous batching over
``engine.max_batch_size`` slots) stepped by the engine's own thread (:class:`EngineLoop`); each
HTTP connection is served on a thread of its own, which waits for its choices' tokens. A choice
decodes exactly as ``generate`` would decode it alone with the same settings and seed. A client
that goes away before its answer is complete (streamed or not) has its choices aborted, freeing
their slots.

Standard library only (``http.server``): a research server, not a hardened front end — put it
behind one to face the internet.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import select
import signal
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from dspark.pipeline import MAX_TOP_LOGPROBS
from dspark.serving.loop import EngineLoop, EngineStopped
from dspark.serving.metrics import render
from dspark.serving.protocol import (CHAT_FIELDS, COMPLETION_FIELDS, ChoiceText, Job, ProtocolError, cut_at_stop,
                                     joined, logprobs_body, parse_detokenize, parse_request, parse_tokenize)
from dspark.streaming import CONTEXT_TOKENS, REPLACEMENT, decode_continuation
from dspark.tokenization import token_bytes

log = logging.getLogger("dspark.serving")

#: the largest request body read (bytes)
MAX_BODY = 32 * 2**20
#: how often a connection waiting for tokens checks that its client is still there (seconds)
CLIENT_CHECK_S = 0.1


def _interrupt(signum, frame) -> None:
    """SIGINT and SIGTERM while :meth:`OpenAIServer.serve_forever` runs: stop serving."""
    raise KeyboardInterrupt


class OpenAIServer:
    """The HTTP server and the engine's thread, over ``pipeline``.

    Args:
        pipeline: a :class:`~dspark.pipeline.Pipeline` that batches continuously.
        max_len: positions per request (prompt + ``max_tokens`` + γ + 1 at most); default ``cache.max_len``.
        host, port: where to listen (port 0: any free port; :attr:`url` says which).
        model_name: the ``model`` this server answers to (a request may leave it out).
        default_max_tokens: the budget of a request that sets no ``max_tokens``; ``None`` (default):
            16 for a completion, the rest of the context for a chat (as OpenAI's and vLLM's).
        max_logprobs: the most likeliest tokens a request may ask for with its log-probabilities
            (vLLM's default, 20; 0 refuses log-probabilities). Only the requests that ask pay for
            them — and the others while one of those decodes beside them (the batch's distributions
            go through one log-softmax).
        chat_template: a Jinja chat template for ``/v1/chat/completions`` (default: the tokenizer's).
        chat_template_kwargs: template variables for every chat request (a request may add its own).
        warm_up: before listening, :meth:`~dspark.session.Session.warm_up` the session (with
            ``engine.compile``, the rounds compile now rather than on the first requests).
    """

    def __init__(self, pipeline, *, max_len: int | None = None, host: str = "127.0.0.1", port: int = 8000,
                 model_name: str = "dspark", default_max_tokens: int | None = None, max_logprobs: int = 20,
                 chat_template: str | None = None, chat_template_kwargs: dict | None = None, warm_up: bool = False):
        if default_max_tokens is not None and (isinstance(default_max_tokens, bool) or not isinstance(default_max_tokens, int)
                                               or default_max_tokens < 1):
            raise ValueError(f"default_max_tokens must be an integer >= 1 or None, got {default_max_tokens!r}")
        if isinstance(max_logprobs, bool) or not isinstance(max_logprobs, int) or not 0 <= max_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"max_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {max_logprobs!r}")
        if not isinstance(model_name, str) or not model_name:
            raise ValueError(f"model_name must be a non-empty string, got {model_name!r}")
        if pipeline.tokenizer is None:
            raise ValueError("the OpenAI API returns text: serve a pipeline with a tokenizer (target.tokenizer, or "
                             "build_pipeline(tokenizer=...))")
        self.pipeline, self.model_name = pipeline, model_name
        self.default_max_tokens, self.max_logprobs = default_max_tokens, max_logprobs
        self.chat_template, self.chat_template_kwargs = chat_template, dict(chat_template_kwargs or {})
        session = pipeline.session(max_len=max_len, logprobs=max_logprobs > 0, top_logprobs=max_logprobs)
        if warm_up:
            session.warm_up()
        self.loop = EngineLoop(session)
        self.created = int(time.time())
        self.httpd = ThreadingHTTPServer((host, port), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.api = self  # (the handler's way back)
        self._serving: threading.Thread | None = None

    @property
    def url(self) -> str:
        """``http://host:port`` (the port bound, when 0 was asked for)."""
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "OpenAIServer":
        """Serve on background threads; returns at once (:meth:`close` stops)."""
        self.loop.start()
        self._serving = threading.Thread(target=self.httpd.serve_forever, name="dspark-http", daemon=True)
        self._serving.start()
        return self

    def serve_forever(self) -> None:
        """Serve on this thread until interrupted (Ctrl-C, SIGINT) or terminated (SIGTERM), then close.

        On the main thread both signals are taken over while serving, whatever they were before: a
        process started in the background of a shell inherits SIGINT *ignored*, and SIGTERM (what
        ``kill``, ``docker stop`` and Kubernetes send) would otherwise end it without closing."""
        self.loop.start()
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                previous[signum] = signal.signal(signum, _interrupt)
        try:
            self.httpd.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            for signum, handler in previous.items():
                if handler is not None:  # (None: a handler set outside Python, which cannot be put back)
                    signal.signal(signum, handler)
            self.close()

    def close(self) -> None:
        """Stop listening, abort what is unfinished and stop the engine's thread."""
        if self._serving is not None:
            self.httpd.shutdown()
            self._serving = None
        self.httpd.server_close()
        self.loop.close()

    def __enter__(self) -> "OpenAIServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- a request's life: checked, submitted, answered ----------------------------------------

    def job(self, body, *, chat: bool) -> Job:
        """A request body checked against this server's model and limits (:func:`parse_request`)."""
        return parse_request(body, chat=chat, model=self.model_name, default_max_tokens=self.default_max_tokens,
                             max_logprobs=self.max_logprobs)

    def tokenize(self, body) -> dict:
        """``/tokenize``: a prompt's (or a rendered conversation's) token ids, as a completion would
        read them (or without the tokenizer's special tokens: ``add_special_tokens: false``), and
        how many positions a request may use (prompt + completion)."""
        prompt, chat, template_kwargs, special = parse_tokenize(body, model=self.model_name)
        try:
            if chat:
                tokens = self._render([prompt], template_kwargs)[0]
            elif special:
                tokens = self.pipeline.encode([prompt])[0]
            else:
                tokens = self.pipeline.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        except (ValueError, TypeError) as err:
            raise ProtocolError(str(err)) from None
        return {"count": len(tokens), "max_model_len": self.max_model_len, "tokens": tokens}

    @property
    def max_model_len(self) -> int:
        """Positions a request may fill, prompt and output (vLLM's ``max_model_len``): the batch's
        ``max_len`` less one round's lookahead."""
        batch = self.loop.session.batch
        return batch.max_len - batch.lookahead

    def tokenizer_info(self) -> dict:
        """``/tokenizer_info`` (vLLM's): the tokenizer's special tokens and chat template, what a
        client that tokenizes through this server (lm-eval-harness's remote tokenizer) needs."""
        tokenizer = self.pipeline.tokenizer
        template = self.chat_template if self.chat_template is not None else getattr(tokenizer, "chat_template", None)
        return {"tokenizer_class": type(tokenizer).__name__, "eos_token": tokenizer.eos_token,
                "bos_token": tokenizer.bos_token, "pad_token": tokenizer.pad_token, "unk_token": tokenizer.unk_token,
                "chat_template": template, "model_max_length": self.max_model_len}

    def detokenize(self, body) -> dict:
        """``/detokenize``: the text of token ids (special tokens kept)."""
        tokens = parse_detokenize(body, model=self.model_name, vocab_size=self.pipeline.engine.target.vocab_size)
        return {"prompt": self.pipeline.tokenizer.decode(tokens, skip_special_tokens=False)}

    def _render(self, conversations: list, template_kwargs: dict | None) -> list[list[int]]:
        """Conversations rendered with this server's chat template and variables (and the request's)."""
        from dspark.chat import render_conversations

        kwargs = {**self.chat_template_kwargs, **(template_kwargs or {})}
        try:
            return render_conversations(self.pipeline.tokenizer, conversations, self.chat_template, kwargs)
        except (ValueError, TypeError) as err:
            if "no chat template" in str(err):
                err = ValueError("this server's tokenizer has no chat template: start it with --chat-template FILE "
                                 "(OpenAIServer(chat_template=...)), or use /v1/completions")
            raise ProtocolError(str(err), "messages") from None

    def submit(self, job: Job, events: queue.Queue) -> list[int]:
        """Submit every choice of ``job`` (choice ``k``'s events tagged ``k``); returns their ids.
        An echoing job with log-probabilities has its prompts scored too; one that generates
        nothing (``max_tokens`` 0) draws one token, which is not returned (as vLLM does)."""
        if job.chat:
            job.prompt_ids = self._render(job.prompts, job.chat_template_kwargs)  # (refusals name "messages")
            if job.max_tokens is None:  # none set: the rest of the context (OpenAI's and vLLM's chat default)
                longest, context = max(len(ids) for ids in job.prompt_ids), self.max_model_len
                if longest >= context:
                    raise ProtocolError(f"the conversation takes {longest} tokens, all of the {context} a request may "
                                        "have: none is left to generate", "messages")
                job.max_tokens = context - longest
                if job.settings["min_new_tokens"] > job.max_tokens:
                    raise ProtocolError(f"min_tokens ({job.settings['min_new_tokens']}) must not exceed the "
                                        f"{job.max_tokens} tokens left in the context", "min_tokens")
        else:
            try:
                job.prompt_ids = self.pipeline.encode(job.prompts)
            except (ValueError, TypeError) as err:
                raise ProtocolError(str(err), "prompt") from None
        grammar = job.settings.get("grammar")
        if grammar is not None:  # (compiled here, not on the engine's thread: a schema may take a while)
            try:
                self.pipeline.grammar_compiler.compile(grammar)
            except (ValueError, TypeError, ImportError) as err:
                raise ProtocolError(str(err), job.grammar_field) from None
        scores = {} if not self.max_logprobs else dict(logprobs=job.logprobs is not None, top_logprobs=job.logprobs or 0)
        if job.echo and job.logprobs is not None:
            scores.update(prompt_logprobs=True, prompt_top_logprobs=job.logprobs)
        requests = [dict(prompt=prompt, max_new_tokens=max(job.max_tokens, 1),
                         seed=None if job.seed is None else job.seed + i * job.n + j, **job.settings, **scores)
                    for i, prompt in enumerate(job.prompt_ids) for j in range(job.n)]
        try:
            return self.loop.submit(requests, list(range(job.choices)), events)
        except (ValueError, TypeError) as err:  # the session's checks (prompt length, vocabulary, ...)
            raise session_refusal(err, job) from None

    def choice(self, job: Job, index: int, output) -> dict:
        """Choice ``index``'s body: its text cut at a stop string (after its prompt, with ``echo``),
        its log-probabilities, why it ended."""
        n = len(output.token_ids) if job.max_tokens else 0  # (max_tokens 0: the one token drawn is dropped)
        generated = [None if v is None else v[:n] for v in (output.token_ids, output.logprobs, output.top_logprobs)]
        text = cut_at_stop(output.text, job.stops, job.include_stop, self.stops_from(job, output))[0] if n else ""
        scores = self.logprobs(job, *generated, context=output.prompt_token_ids)
        if job.echo:
            prompt, prompt_scores = self.echoed(job, index, output.prompt_logprobs, output.prompt_top_logprobs)
            if prompt_scores is not None:
                scores = joined(prompt_scores, self.logprobs(job, *generated, len(prompt), context=output.prompt_token_ids))
            text = prompt + text
        body = {"index": index}
        if job.chat:
            body["message"] = {"role": "assistant", "content": text}
        else:
            body["text"] = text
        body["logprobs"] = scores
        body["finish_reason"] = output.finish_reason
        return body

    def stops_from(self, job: Job, output) -> int:
        """Where in a finished choice's text a stop string may end: past the text of its first
        ``min_tokens − 1`` tokens, which the engine does not let complete one (0 without)."""
        min_new = job.settings.get("min_new_tokens") or 0
        if not job.stops or min_new <= 1:
            return 0
        head = decode_continuation(self.pipeline.tokenizer, output.prompt_token_ids[-CONTEXT_TOKENS:],
                                   output.token_ids[:min_new - 1])
        return len(head.rstrip(REPLACEMENT))

    def echoed(self, job: Job, index: int, prompt_logprobs: list | None, prompt_top_logprobs: list | None
               ) -> tuple[str, dict | None]:
        """What choice ``index`` of an echoing job starts with: its prompt's text (as sent, or its
        ids decoded) and, when asked, the prompt tokens' log-probabilities (``None`` at the first)."""
        prompt, ids = job.prompts[index // job.n], job.prompt_ids[index // job.n]
        text = prompt if isinstance(prompt, str) else self.pipeline.tokenizer.decode(ids, skip_special_tokens=False)
        if prompt_logprobs is None:  # (none asked, or never admitted: aborted while waiting)
            return text, None
        return text, self.logprobs(job, ids, prompt_logprobs, prompt_top_logprobs)

    def logprobs(self, job: Job, token_ids: list[int], logprobs: list[float] | None, top_logprobs: list | None,
                 offset: int = 0, *, context: list[int] = ()) -> dict | None:
        """The ``logprobs`` object of a choice's tokens (all of them, or a chunk's; ``offset``: where
        their text starts; ``context``: the ids before them), tokens as text — each read on from
        the tokens before it, as the choice's text is (a word-start token keeps its space; a token
        that ends inside a character names the characters it completes, so the names join into
        the text and the offsets point into it); ``None`` when its request asked for none."""
        if job.logprobs is None:
            return None
        tokenizer, before = self.pipeline.tokenizer, list(context[-CONTEXT_TOKENS:])
        contexts = [(before + token_ids[:j])[-CONTEXT_TOKENS:] for j in range(len(token_ids))]
        # (a token that leaves a character incomplete names the text it completes: none yet; its
        # bytes, with chat, say what it holds)
        name = lambda j, t: decode_continuation(tokenizer, contexts[j], [t], skip_special_tokens=False  # noqa: E731
                                                ).rstrip(REPLACEMENT)
        top = None
        if top_logprobs is not None and (job.logprobs or job.chat):
            top = [None if alternatives is None else [(name(j, t), lp, token_bytes(tokenizer, t) if job.chat else None)
                                                      for t, lp in alternatives[:job.logprobs]]
                   for j, alternatives in enumerate(top_logprobs)]
        elif not job.chat and job.logprobs == 0:  # the chosen token alone, as OpenAI's and vLLM's list it
            top = [None if lp is None else [] for lp in logprobs or []]
        raw = [token_bytes(tokenizer, t) for t in token_ids] if job.chat else None
        return logprobs_body(job.chat, [name(j, t) for j, t in enumerate(token_ids)], logprobs or [], top, offset, raw)

    @staticmethod
    def usage(job: Job, outputs: list) -> dict:
        """Token counts (each prompt once, whatever ``n``), and dspark's: target forwards and drafts."""
        prompt = sum(len(outputs[i * job.n].prompt_token_ids) for i in range(len(job.prompts)))
        completion = sum(len(o.token_ids) for o in outputs) if job.max_tokens else 0
        forwards = sum(o.stats["target_forwards"] for o in outputs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "speculative": {"target_forwards": forwards, "drafted_tokens": sum(o.stats["drafted"] for o in outputs),
                                "accepted_tokens": sum(o.stats["accepted"] for o in outputs),
                                "tokens_per_forward": completion / forwards if forwards else None}}

    def head(self, job: Job) -> dict:
        """The fields every response (or every chunk of a stream) starts with: a new id, the object
        kind, the time, the model."""
        kind = "chat.completion" if job.chat else "text_completion"
        return {"id": f"{'chatcmpl' if job.chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": kind + (".chunk" if job.chat and job.stream else ""), "created": int(time.time()),
                "model": self.model_name}


#: the HTTP methods the server answers
ALLOWED_METHODS = "GET, POST, OPTIONS"

#: the session's names for the request fields the API names otherwise
_API_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}


def session_refusal(err: Exception, job: Job) -> ProtocolError:
    """The API's error for a request the session refused: its message in the API's field names,
    ``param`` the field it starts with (when it is one the endpoint reads), and, for a request
    of several prompts, which one."""
    message = re.sub(r"^request \d+: ", "", str(err))
    message = re.sub(r"\b(" + "|".join(_API_NAMES) + r")\b", lambda m: _API_NAMES[m.group(1)], message)
    first = re.match(r"\w+", message)
    fields = CHAT_FIELDS if job.chat else COMPLETION_FIELDS
    param = first.group(0) if first and first.group(0) in fields | {"prompt"} else None
    if param == "prompt" and job.chat:
        param, message = "messages", "the conversation" + message[len("prompt"):]
    index = getattr(err, "refused_index", None)
    if len(job.prompts) > 1 and index is not None:
        message = f"prompt {index // job.n}: {message}"
    return ProtocolError(message, param)


class _Handler(BaseHTTPRequestHandler):
    """One connection's requests (on a thread of its own)."""

    protocol_version = "HTTP/1.1"
    server_version = "dspark"
    _checked = 0.0  # when _next last checked the client

    @property
    def api(self) -> OpenAIServer:
        return self.server.api

    def log_message(self, format: str, *args) -> None:  # noqa: A002 — http.server's signature
        log.info("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:  # noqa: N802 — http.server's name
        self._guarded(self._get)

    def do_POST(self) -> None:  # noqa: N802
        self._guarded(self._post)

    def do_OPTIONS(self) -> None:  # noqa: N802 — what a client may ask (an HTTP client's probe)
        self._guarded(self._options)

    def do_PUT(self) -> None:  # noqa: N802 — the methods no route takes: 405, with the API's error body
        self._guarded(self._not_allowed)

    do_DELETE = do_PATCH = do_PUT

    def send_response(self, code: int, message: str | None = None) -> None:
        self._responded = True
        super().send_response(code, message)

    def _guarded(self, handle) -> None:
        """``handle()``, with a last resort for what its own checks did not foresee: the error is
        logged and, when no response has begun, the client gets a 500 with the API's error body
        (not a dropped connection); the connection then closes."""
        self._responded = False
        self.route = urlsplit(self.path).path  # (a query string does not change the route)
        try:
            handle()
        except Exception:  # noqa: BLE001 — anything: a handler thread must answer
            log.exception("%s %s failed", self.command, self.path)
            self.close_connection = True
            if not self._responded:
                self._error(ProtocolError("the server failed on this request (its log has the traceback)", status=500))

    def _options(self) -> None:
        if self.headers.get("Content-Length", "0") != "0":  # a body, not read: not to be parsed as a request
            self.close_connection = True
        self.send_response(204)
        self.send_header("Allow", ALLOWED_METHODS)
        self.send_header("Content-Length", "0")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()

    def _not_allowed(self) -> None:
        self._error(ProtocolError(f"method {self.command} is not allowed: this server answers {ALLOWED_METHODS}",
                                  status=405))

    def _get(self) -> None:
        if self.route == "/health":
            ok = self.api.loop.running
            self._json(200 if ok else 503, {"status": "ok" if ok else "the engine is not running"})
        elif self.route == "/metrics":
            try:
                snapshot = self.api.loop.snapshot()
            except EngineStopped as err:
                self._error(ProtocolError(str(err), status=503))
                return
            text = render(self.api.loop.metrics, model=self.api.model_name, running=snapshot["running"],
                          waiting=snapshot["waiting"], reached=snapshot["reached"], accepted_at=snapshot["accepted"],
                          prefix_queries=snapshot["prefix_queries"], prefix_hits=snapshot["prefix_hits"])
            self._send(200, text.encode("utf-8"), "text/plain; version=0.0.4; charset=utf-8")
        elif self.route == "/tokenizer_info":
            self._json(200, self.api.tokenizer_info())
        elif self.route == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": self.api.model_name, "object": "model",
                                                         "created": self.api.created, "owned_by": "dspark"}]})
        else:
            self._error(ProtocolError(f"no such path: GET {self.route} (GET /v1/models, /health, /metrics, "
                                      "/tokenizer_info)", status=404))

    def _post(self) -> None:
        if self.route in ("/tokenize", "/detokenize"):
            try:
                self._json(200, (self.api.tokenize if self.route == "/tokenize" else self.api.detokenize)(self._body()))
            except ProtocolError as err:
                self._error(err)
            return
        if self.route not in ("/v1/completions", "/v1/chat/completions"):
            self._error(ProtocolError(f"no such path: POST {self.route} (POST /v1/completions, /v1/chat/completions, "
                                      "/tokenize, /detokenize)", status=404))
            return
        try:
            job = self.api.job(self._body(), chat=self.route == "/v1/chat/completions")
            events: queue.Queue = queue.Queue()
            ids = self.api.submit(job, events)
        except ProtocolError as err:
            self._error(err)
            return
        except EngineStopped as err:
            self._error(ProtocolError(str(err), status=503))
            return
        try:
            (self._stream if job.stream else self._answer)(job, ids, events)
        except EngineStopped as err:  # (a whole answer: a 503; a stream already begun just ends)
            if not job.stream:
                self._error(ProtocolError(str(err), status=503))

    def _body(self):
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise ProtocolError("the request needs a Content-Length header", status=411)
        if int(length) > MAX_BODY:
            raise ProtocolError(f"the request body is {length} bytes, more than {MAX_BODY}", status=413)
        raw = self.rfile.read(int(length))
        try:
            return json.loads(raw)
        except ValueError as err:
            raise ProtocolError(f"the request body is not JSON: {err}") from None

    def _answer(self, job: Job, ids: list[int], events: queue.Queue) -> None:
        outputs = [None] * job.choices
        try:
            while any(o is None for o in outputs):
                event = self._next(events)
                if event.output is not None:
                    outputs[event.tag] = event.output
        except ConnectionResetError:  # the client went away: free its slots
            log.info("%s went away: aborting its requests", self.address_string())
            self.api.loop.abort([i for i, o in zip(ids, outputs) if o is None])
            return
        body = {**self.api.head(job), "choices": [self.api.choice(job, k, o) for k, o in enumerate(outputs)],
                "usage": self.api.usage(job, outputs)}
        self._json(200, body)

    def _stream(self, job: Job, ids: list[int], events: queue.Queue) -> None:
        """Server-sent events: a chunk per step that brings a choice text (with its new tokens'
        log-probabilities, when asked for: a chunk whose text waits carries them on to the next),
        its last with its finish reason; then the usage if asked; then ``[DONE]``."""
        from dspark.streaming import TextStreamer

        api, head = self.api, self.api.head(job)
        if job.include_usage:  # every chunk has a usage field, null until the last (OpenAI's stream_options)
            head["usage"] = None
        pieces: dict[int, str] = {}
        decode = TextStreamer(api.pipeline.tokenizer, on_text=lambda k, piece: pieces.__setitem__(k, pieces.get(k, "") + piece),
                              keep_texts=False)
        for k in range(job.choices):  # each choice's first tokens read on from its prompt
            decode.start(k, job.prompt_ids[k // job.n])
        read = [list(job.prompt_ids[k // job.n]) for k in range(job.choices)]  # ids whose log-probabilities were sent
        texts = [ChoiceText(job.stops, job.include_stop) for _ in range(job.choices)]
        outputs = [None] * job.choices
        pending: list[list] = [[[], [], []] for _ in range(job.choices)]  # tokens, log-probabilities, top ones
        echoed: list[int | None] = [None] * job.choices  # with echo: each choice's prompt text's length, once sent
        scored = [0] * job.choices  # the text length of the tokens whose log-probabilities were sent
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        try:
            if job.chat:
                for k in range(job.choices):
                    self._event({**head, "choices": [{"index": k, "delta": {"role": "assistant", "content": ""},
                                                      "logprobs": None, "finish_reason": None}]})
            while any(o is None for o in outputs):
                event = self._next(events)
                k = event.tag
                if job.echo and echoed[k] is None:  # a choice's first chunk: its prompt
                    text, scores = api.echoed(job, k, event.prompt_logprobs, event.prompt_top_logprobs)
                    echoed[k] = len(text)
                    self._event({**head, "choices": [{"index": k, "text": text, "logprobs": scores,
                                                      "finish_reason": None}]})
                if not job.max_tokens:  # the prompt alone: the token drawn is not sent
                    if event.output is not None:
                        outputs[k] = event.output
                        self._event({**head, "choices": [{"index": k, "text": "", "logprobs": None,
                                                          "finish_reason": event.output.finish_reason}]})
                    continue
                decode(k, event.token_ids)
                if event.output is not None:
                    decode.finish(k)
                    outputs[k] = event.output
                    delta = texts[k].finish(pieces.pop(k, ""), api.stops_from(job, event.output))
                else:
                    delta = texts[k].feed(pieces.pop(k, ""))
                if event.logprobs is not None:
                    pending[k][0] += event.token_ids
                    pending[k][1] += event.logprobs
                    pending[k][2] += event.top_logprobs or []
                if not delta and event.output is None:
                    continue
                # (where these tokens' text starts: not where the delta does, which a stop string's
                # hold-back may leave behind them)
                scores = api.logprobs(job, *pending[k][:2], pending[k][2] or None, (echoed[k] or 0) + scored[k],
                                      context=read[k])
                read[k] = (read[k] + pending[k][0])[-CONTEXT_TOKENS:]
                if scores is not None and not job.chat:
                    scored[k] += sum(len(token) for token in scores["tokens"])
                choice = {"index": k, **({"delta": {"content": delta}} if job.chat else {"text": delta}),
                          "logprobs": scores,
                          "finish_reason": None if event.output is None else event.output.finish_reason}
                pending[k] = [[], [], []]
                self._event({**head, "choices": [choice]})
            if job.include_usage:
                self._event({**head, "choices": [], "usage": api.usage(job, outputs)})
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):  # the client went away: free its slots
            log.info("%s went away: aborting %d requests", self.address_string(), len(ids))
            self.api.loop.abort([i for i, o in zip(ids, outputs) if o is None])

    def _next(self, events: queue.Queue):
        """The next :class:`Emitted` for this connection's requests; ``ConnectionResetError`` once
        the client has closed the connection (checked while nothing comes), :class:`EngineStopped`
        if the engine did."""
        while True:
            try:
                event = events.get(timeout=CLIENT_CHECK_S)
            except queue.Empty:
                event = None
                if not self.api.loop.running and events.empty():
                    raise EngineStopped("the engine stopped") from self.api.loop.error
            if time.monotonic() - self._checked > CLIENT_CHECK_S:  # (events may come every step)
                self._checked = time.monotonic()
                if self._client_gone():
                    raise ConnectionResetError("the client closed the connection") from None
            if isinstance(event, BaseException):
                raise event
            if event is not None:
                return event

    def _client_gone(self) -> bool:
        """Whether the client closed its end: the socket reads as ended (a client that sent its
        next request already is still there)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _event(self, body: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(body, ensure_ascii=False).encode("utf-8") + b"\n\n")
        self.wfile.flush()

    def _json(self, status: int, body: dict) -> None:
        self._send(status, json.dumps(body, ensure_ascii=False).encode("utf-8"), "application/json")

    def _send(self, status: int, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _error(self, err: ProtocolError) -> None:
        if err.status in (405, 411, 413):  # the body was not read: it must not be parsed as the next request
            self.close_connection = True
        self._json(err.status, err.body())
