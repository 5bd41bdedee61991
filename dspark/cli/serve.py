"""``dspark serve``: requests as JSON lines on stdin, decoded as they arrive; or, with ``--port``,
the OpenAI API over HTTP."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from dspark.cli.requests import LINE_SETTINGS, chat_template_options, keys_as_token_ids, line_grammar, listed_stops


def serve_command(args: argparse.Namespace) -> int:
    """Requests as JSON lines on stdin (or ``--requests FILE``), each submitted as it arrives while
    the others decode; one JSON line per request on stdout as it finishes."""
    import queue
    import threading

    from dspark.config import find_config
    from dspark.pipeline import build_pipeline

    if args.port is not None:
        return serve_http(args)
    for flag, given in (("--host", args.host), ("--served-model-name", args.served_model_name),
                        ("--max-logprobs", args.max_logprobs), ("--chat-template", args.chat_template),
                        ("--chat-template-kwargs", args.chat_template_kwargs)):
        if given is not None:
            raise SystemExit(f"dspark serve: {flag} applies with --port (the HTTP server)")
    args.max_new_tokens = 64 if args.max_new_tokens is None else args.max_new_tokens
    source = sys.stdin if args.requests in (None, "-") else None
    if source is None and not Path(args.requests).is_file():
        raise SystemExit(f"dspark serve: --requests {args.requests} is not a file")
    pipe = build_pipeline(args.config if args.config is not None else find_config("default"), overrides=args.overrides)
    try:
        session = pipe.session(max_len=args.max_len, logprobs=args.logprobs)
    except ValueError as err:
        raise SystemExit(f"dspark serve: {err}") from None
    if args.warm_up:
        _warm_up(session)
    lines: queue.Queue = queue.Queue()

    def read() -> None:  # lines arrive on their own schedule; the decoding loop takes what has come
        with open(args.requests, encoding="utf-8") if source is None else contextlib.nullcontext(source) as stream:
            for number, line in enumerate(stream, 1):
                lines.put((number, line))
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    origin: dict[int, tuple[int, object]] = {}  # request → (line number, the line's "id")
    pieces: dict[int, str] = {}  # --stream: the text each request's new tokens completed
    text = None
    if args.stream and pipe.tokenizer is not None:
        from dspark.streaming import TextStreamer

        text = TextStreamer(pipe.tokenizer, on_text=lambda i, piece: pieces.__setitem__(i, pieces.get(i, "") + piece),
                            keep_texts=False)
    started: set[int] = set()  # --stream: the requests whose text streamer knows their prompt
    reading = True
    while reading or session.unfinished:
        while reading:  # wait for a line only when nothing decodes
            try:
                item = lines.get(block=not session.unfinished)
            except queue.Empty:
                break
            if item is None:
                reading = False
                break
            number, line = item
            if line.strip():
                submit_line(session, number, line, args, origin)
        for update in session.step():
            if args.stream:  # the new tokens (and their text) first, then the request's result when it ends
                if text is not None:
                    if update.request not in started:  # its first tokens read on from its prompt
                        started.add(update.request)
                        text.start(update.request, session.prompt_token_ids(update.request))
                    text(update.request, update.token_ids)
                    if update.finished:
                        text.finish(update.request)
                        started.discard(update.request)
                number, name = origin[update.request]
                event = {"line": number, **({"id": name} if name is not None else {}), "request": update.request,
                         "token_ids": update.token_ids, **({"text": pieces.pop(update.request, "")} if text else {})}
                print(json.dumps(event, ensure_ascii=False), flush=True)
            if update.finished:
                write_result(session, update.request, origin.pop(update.request))
    return 0


def serve_http(args: argparse.Namespace) -> int:
    """``dspark serve --port P``: the OpenAI API over HTTP (:class:`~dspark.serving.OpenAIServer`)."""
    import time

    from dspark.config import find_config
    from dspark.pipeline import build_pipeline
    from dspark.serving import OpenAIServer

    for flag, given in (("--requests", args.requests is not None), ("--stream", args.stream), ("--logprobs", args.logprobs)):
        if given:
            raise SystemExit(f"dspark serve: {flag} is for JSON lines on stdin; over HTTP each request sets stream / "
                             "logprobs itself")
    template, template_kwargs = chat_template_options(args, "serve")
    pipe = build_pipeline(args.config if args.config is not None else find_config("default"), overrides=args.overrides)
    started = time.perf_counter()
    if args.warm_up:
        print(f"[dspark] warming up over 1 to {pipe.engine.config.max_batch_size} rows ...", file=sys.stderr, flush=True)
    try:
        server = OpenAIServer(pipe, max_len=args.max_len, host=args.host or "127.0.0.1", port=args.port,
                              model_name=args.served_model_name or "dspark",
                              default_max_tokens=args.max_new_tokens,
                              max_logprobs=20 if args.max_logprobs is None else args.max_logprobs,
                              chat_template=template,
                              chat_template_kwargs=template_kwargs, warm_up=args.warm_up)
    except (ValueError, OSError) as err:
        raise SystemExit(f"dspark serve: {err}") from None
    if args.warm_up:
        print(f"[dspark] warmed up in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    print(f"[dspark] serving the OpenAI API at {server.url}/v1 (model {server.model_name!r}, "
          f"{pipe.engine.config.max_batch_size} slots; Ctrl-C stops)", file=sys.stderr, flush=True)
    server.serve_forever()
    return 0


def _warm_up(session) -> None:
    """``--warm-up``: :meth:`~dspark.session.Session.warm_up`, timed on stderr."""
    import time

    started = time.perf_counter()
    print(f"[dspark] warming up over 1 to {session.batch.state.batch_size} rows ...", file=sys.stderr, flush=True)
    session.warm_up()
    print(f"[dspark] warmed up in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)


def submit_line(session, number: int, line: str, args: argparse.Namespace, origin: dict) -> None:
    """Submit one request line, or write why it was refused (``{"line": n, "error": ...}``)."""
    from dspark.serving.protocol import STRUCTURED_FIELDS

    try:
        record = json.loads(line)
        if not isinstance(record, dict) or "prompt" not in record:
            raise ValueError('a request is a JSON object with a "prompt"')
        unknown = set(record) - {"prompt", "id", "max_new_tokens", *LINE_SETTINGS, *STRUCTURED_FIELDS}
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)}; a request may set max_new_tokens, "
                             f"{', '.join(LINE_SETTINGS)}, a structured output ({', '.join(STRUCTURED_FIELDS)}) "
                             "and id")
        settings = {name: listed_stops(name, record[name]) for name in LINE_SETTINGS if name in record}
        settings["grammar"] = line_grammar(record)
        if settings.get("logit_bias") is not None:
            settings["logit_bias"] = keys_as_token_ids(settings["logit_bias"])
        request = session.submit(record["prompt"], max_new_tokens=record.get("max_new_tokens", args.max_new_tokens),
                                 **settings)
    except (ValueError, TypeError, AttributeError) as err:
        print(json.dumps({"line": number, "error": str(err)}, ensure_ascii=False), flush=True)
        return
    origin[request] = (number, record.get("id"))


def write_result(session, request: int, origin: tuple[int, object]) -> None:
    """A finished request's JSON line: where it came from, its output, its counts and timings."""
    output = session.result(request)
    number, name = origin
    record = {"line": number, **({"id": name} if name is not None else {}), "request": request,
              "token_ids": output.token_ids}
    if output.text is not None:
        record["text"] = output.text
    if output.logprobs is not None:
        record["logprobs"] = output.logprobs
    record["stats"] = output.stats
    print(json.dumps(record, ensure_ascii=False), flush=True)
