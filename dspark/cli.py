"""Command line: ``dspark generate --config configs/ar.yaml --prompt "..." [key=value ...]``."""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
from pathlib import Path

OVERRIDE = re.compile(r"^[A-Za-z_][\w]*(\.[\w]+)+=")  # section.key[.key]=value


def _generate(args: argparse.Namespace) -> int:
    from dspark.config import find_config
    from dspark.pipeline import build_pipeline

    # positional words that are not `section.key=value` overrides are prompts: `dspark generate "def f():"`
    positional = [o for o in args.overrides if not OVERRIDE.match(o)]
    overrides = [o for o in args.overrides if OVERRIDE.match(o)]
    prompts: list = positional + list(args.prompt or [])
    for ids in args.prompt_ids or []:
        prompts.append([int(t) for t in ids.replace(",", " ").split()])
    budgets = [args.max_new_tokens] * len(prompts)
    lines: list[dict] = [{} for _ in prompts]  # each prompt's own settings (a JSONL line's)
    if args.prompts_file:
        from dspark.data.eval_sets import read_jsonl

        if not Path(args.prompts_file).is_file():
            raise SystemExit(f"dspark generate: --prompts-file {args.prompts_file} is not a file")
        try:
            records = read_jsonl(args.prompts_file)
        except ValueError as err:
            raise SystemExit(f"dspark generate: {err}") from None
        prompts += [record["prompt"] for record in records]
        budgets += [record.get("max_new_tokens", args.max_new_tokens) for record in records]  # a line's own budget
        lines += [{name: record[name] for name in LINE_SETTINGS if name in record} for record in records]
        first = len(prompts) - len(records)  # (requests are numbered as generate numbers them: from 0, flags' first)
        for index, (line, record) in enumerate(zip(lines[first:], records), first):
            try:
                grammar = _line_grammar(record)
            except ValueError as err:
                raise SystemExit(f"dspark generate: {args.prompts_file}: request {index}: {err}") from None
            if grammar is not None:
                line["grammar"] = grammar
    if not prompts:
        raise SystemExit("dspark generate: give a prompt: dspark generate \"TEXT\", --prompt TEXT, --prompt-ids 'ID ID ...' "
                         "or --prompts-file FILE.jsonl")
    if args.chat and not all(isinstance(p, str) for p in prompts):
        raise SystemExit("dspark generate: --chat takes text prompts (each becomes a user message), not --prompt-ids")
    for flag, given in (("--chat-template", args.chat_template), ("--chat-template-kwargs", args.chat_template_kwargs)):
        if given is not None and not args.chat:
            raise SystemExit(f"dspark generate: {flag} applies with --chat")
    chat_template, template_kwargs = _chat_template_options(args, "generate")
    if args.output and not Path(args.output).resolve().parent.is_dir():
        raise SystemExit(f"dspark generate: --output {args.output}: its directory does not exist")
    if args.stream and len(prompts) != 1:
        raise SystemExit(f"dspark generate: --stream prints one request as it is generated; got {len(prompts)} "
                         "prompts (drop --stream to generate a batch)")
    if args.prompt_top_logprobs < 0:
        raise SystemExit(f"dspark generate: --prompt-top-logprobs must be >= 0, got {args.prompt_top_logprobs}")
    args.prompt_logprobs = args.prompt_logprobs or args.prompt_top_logprobs > 0
    if args.chat and args.prompt_logprobs:
        raise SystemExit("dspark generate: --prompt-logprobs scores the prompts as given; with --chat they are "
                         "rendered by the template first (use the Python API's prompt_logprobs on the rendered text)")
    if args.stream and args.progress:
        raise SystemExit("dspark generate: --stream and --progress both draw on the terminal; choose one")
    grammar = _grammar(args)
    pipe = build_pipeline(args.config if args.config is not None else find_config("default"), overrides=overrides)
    streamer = None
    if args.stream:
        from dspark.streaming import TextStreamer

        text = pipe.tokenizer is not None and not args.print_ids
        streamer = TextStreamer(pipe.tokenizer if text else _IdsAsText())
    flags = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                 repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                 frequency_penalty=args.frequency_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
                 logit_bias=_logit_bias(args.logit_bias), seed=args.seed, stop=args.stop,
                 stop_token_ids=args.stop_token_id, min_new_tokens=args.min_new_tokens, ignore_eos=args.ignore_eos)
    settings = dict(max_new_tokens=budgets if any(b != args.max_new_tokens for b in budgets) else args.max_new_tokens,
                    **_settings_per_line(flags, lines), progress=args.progress, on_tokens=streamer,
                    logprobs=args.logprobs or args.top_logprobs > 0, top_logprobs=args.top_logprobs,
                    prompt_logprobs=args.prompt_logprobs, prompt_top_logprobs=args.prompt_top_logprobs)
    if grammar is not None or any("grammar" in line for line in lines):  # (a line's own, else the flags')
        settings["grammar"] = [line.get("grammar", grammar) for line in lines]
    if args.chat:
        try:
            result = pipe.chat([[{"role": "user", "content": p}] for p in prompts], chat_template=chat_template,
                               chat_template_kwargs=template_kwargs, **settings)
        except ValueError as err:  # e.g. a tokenizer without a chat template
            raise SystemExit(f"dspark generate: {err}") from None
    else:
        try:
            result = pipe.generate(prompts, **settings)
        except ValueError as err:
            if "grammar" not in settings:
                raise
            raise SystemExit(f"dspark generate: {err}") from None
    if streamer is not None:
        streamer.finish()
        print(flush=True)
    if args.output:
        _write_outputs(args.output, prompts, result)
    for i, ids in enumerate(result.token_ids if not args.output else []):
        if len(prompts) > 1:  # (--stream takes one prompt)
            print(f"--- request {i}")
        if result.prompt_logprobs is not None:  # the prompt's tokens first, each given the ones before it
            prompt_ids = pipe.encode([prompts[i]])[0]
            print("prompt:")
            _print_logprobs(prompt_ids, result.prompt_logprobs[i], None if args.print_ids else pipe.tokenizer,
                            None if result.prompt_top_logprobs is None else result.prompt_top_logprobs[i])
            print("generated:")
        if streamer is None:
            print(result.texts[i] if result.texts is not None and not args.print_ids else " ".join(map(str, ids)))
        if result.logprobs is not None:
            _print_logprobs(ids, result.logprobs[i], None if args.print_ids else pipe.tokenizer,
                            None if result.top_logprobs is None else result.top_logprobs[i])
    print(f"[dspark] {result.stats.summary()}", file=sys.stderr)
    if args.stats_json:
        from dataclasses import asdict

        with open(args.stats_json, "w") as f:
            json.dump(asdict(result.stats), f, indent=2)
    return 0


def _grammar(args: argparse.Namespace):
    """The structured output ``--json-schema`` / ``--json`` / ``--regex`` / ``--choice`` / ``--grammar``
    asks for (a :class:`~dspark.structured.Grammar`), or ``None``."""
    from dspark.structured import Grammar

    try:
        if args.json_schema is not None or args.grammar is not None:
            path = Path(args.json_schema or args.grammar)
            if not path.is_file():
                raise SystemExit(f"dspark generate: {'--json-schema' if args.json_schema else '--grammar'} {path} "
                                 "is not a file")
            if args.json_schema:
                return Grammar.json_schema(path.read_text(), any_whitespace=not args.compact_json)
            return Grammar.ebnf(path.read_text())
        if args.compact_json:
            raise SystemExit("dspark generate: --compact-json applies with --json-schema")
        if args.json:
            return Grammar.json()
        if args.regex is not None:
            return Grammar.regex(args.regex)
        if args.choice:
            return Grammar.choice(args.choice)
    except ValueError as err:
        raise SystemExit(f"dspark generate: {err}") from None
    return None


def _line_grammar(record: dict):
    """A JSON line's structured output (its ``response_format``, ``structured_outputs`` or
    ``guided_*`` field, read as the OpenAI server reads it), or ``None``."""
    from dspark.serving.protocol import structured_output

    return structured_output(record)[0]


#: what a line of ``--prompts-file`` may set for its own request (besides ``max_new_tokens``)
LINE_SETTINGS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty", "no_repeat_ngram_size", "logit_bias", "seed", "stop", "stop_token_ids",
                 "min_new_tokens", "ignore_eos")


def _serve(args: argparse.Namespace) -> int:
    """Requests as JSON lines on stdin (or ``--requests FILE``), each submitted as it arrives while
    the others decode; one JSON line per request on stdout as it finishes."""
    import queue
    import threading

    from dspark.config import find_config
    from dspark.pipeline import build_pipeline

    if args.port is not None:
        return _serve_http(args)
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

        text = TextStreamer(pipe.tokenizer, on_text=lambda i, piece: pieces.__setitem__(i, pieces.get(i, "") + piece))
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
                _serve_submit(session, number, line, args, origin)
        for update in session.step():
            if args.stream:  # the new tokens (and their text) first, then the request's result when it ends
                if text is not None:
                    text(update.request, update.token_ids)
                    if update.finished:
                        text.finish(update.request)
                number, name = origin[update.request]
                event = {"line": number, **({"id": name} if name is not None else {}), "request": update.request,
                         "token_ids": update.token_ids, **({"text": pieces.pop(update.request, "")} if text else {})}
                print(json.dumps(event, ensure_ascii=False), flush=True)
            if update.finished:
                _serve_write(session, update.request, origin[update.request])
    return 0


def _serve_http(args: argparse.Namespace) -> int:
    """``dspark serve --port P``: the OpenAI API over HTTP (:class:`~dspark.serving.OpenAIServer`)."""
    import time

    from dspark.config import find_config
    from dspark.pipeline import build_pipeline
    from dspark.serving import OpenAIServer

    for flag, given in (("--requests", args.requests is not None), ("--stream", args.stream), ("--logprobs", args.logprobs)):
        if given:
            raise SystemExit(f"dspark serve: {flag} is for JSON lines on stdin; over HTTP each request sets stream / "
                             "logprobs itself")
    template, template_kwargs = _chat_template_options(args, "serve")
    pipe = build_pipeline(args.config if args.config is not None else find_config("default"), overrides=args.overrides)
    started = time.perf_counter()
    if args.warm_up:
        print(f"[dspark] warming up over 1 to {pipe.engine.config.max_batch_size} rows ...", file=sys.stderr, flush=True)
    try:
        server = OpenAIServer(pipe, max_len=args.max_len, host=args.host or "127.0.0.1", port=args.port,
                              model_name=args.served_model_name or "dspark",
                              default_max_tokens=16 if args.max_new_tokens is None else args.max_new_tokens,
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


def _chat_template_options(args: argparse.Namespace, command: str) -> tuple[str | None, dict | None]:
    """``--chat-template FILE``'s text and ``--chat-template-kwargs``' JSON object (``None`` when not
    given); a missing file or a value that is not a JSON object ends the command, naming it."""
    template = kwargs = None
    if args.chat_template is not None:
        if not Path(args.chat_template).is_file():
            raise SystemExit(f"dspark {command}: --chat-template {args.chat_template} is not a file")
        template = Path(args.chat_template).read_text(encoding="utf-8")
    if args.chat_template_kwargs is not None:
        try:
            kwargs = json.loads(args.chat_template_kwargs)
        except ValueError as err:
            raise SystemExit(f"dspark {command}: --chat-template-kwargs is not JSON: {err}") from None
        if not isinstance(kwargs, dict):
            raise SystemExit(f"dspark {command}: --chat-template-kwargs must be a JSON object, e.g. "
                             "'{\"enable_thinking\": false}'")
    return template, kwargs


def _serve_submit(session, number: int, line: str, args: argparse.Namespace, origin: dict) -> None:
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
        settings = {name: _listed_stops(name, record[name]) for name in LINE_SETTINGS if name in record}
        settings["grammar"] = _line_grammar(record)
        if settings.get("logit_bias") is not None:
            settings["logit_bias"] = _keys_as_token_ids(settings["logit_bias"])
        request = session.submit(record["prompt"], max_new_tokens=record.get("max_new_tokens", args.max_new_tokens),
                                 **settings)
    except (ValueError, TypeError, AttributeError) as err:
        print(json.dumps({"line": number, "error": str(err)}, ensure_ascii=False), flush=True)
        return
    origin[request] = (number, record.get("id"))


def _serve_write(session, request: int, origin: tuple[int, object]) -> None:
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


def _settings_per_line(flags: dict, lines: list[dict]) -> dict:
    """``generate``'s sampling and stop arguments: the flags' values, and a list with one value per
    request for each setting some line of the prompts file sets (the others keep the flag's; a request
    without a seed of its own gets ``--seed + i``, or a fresh one without ``--seed``)."""
    settings = dict(flags)
    for name in LINE_SETTINGS:
        if not any(name in line for line in lines):
            continue
        if name == "seed":
            default = [None if flags["seed"] is None else flags["seed"] + i for i in range(len(lines))]
        else:
            default = [flags[name]] * len(lines)
        settings[name] = [line[name] if name in line else default[i] for i, line in enumerate(lines)]
        settings[name] = [_listed_stops(name, value) for value in settings[name]]
        if name == "logit_bias":  # JSON objects: their keys are strings
            settings[name] = [_token_keyed(bias, f"request {i}'s logit_bias (--prompts-file)")
                              if "logit_bias" in line and bias is not None else bias
                              for i, (line, bias) in enumerate(zip(lines, settings[name]))]
    return settings


def _logit_bias(text: str | None) -> dict[int, float] | None:
    """``--logit-bias``'s JSON object, its keys (strings in JSON) read as token ids."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as err:
        raise SystemExit(f"dspark generate: --logit-bias must be a JSON object {{token id: bias}}, got {text!r} ({err})") from None
    return _token_keyed(value, "--logit-bias")


def _token_keyed(value, where: str) -> dict[int, float]:
    """A JSON object ``{"token id": bias}`` with its keys read as token ids (``where`` names it in errors)."""
    try:
        return _keys_as_token_ids(value)
    except ValueError as err:
        raise SystemExit(f"dspark generate: {where} must be a JSON object {{token id: bias}}, got {value!r} ({err})") from None


def _keys_as_token_ids(value) -> dict[int, float]:
    """A JSON object's keys (strings) read as token ids (``ValueError`` if they are not)."""
    if not isinstance(value, dict):
        raise ValueError("not an object")
    return {int(token): bias for token, bias in value.items()}


def _listed_stops(name: str, value):
    """A line's ``stop`` / ``stop_token_ids``: a single string or id as a list of one."""
    return [value] if name in ("stop", "stop_token_ids") and isinstance(value, (str, int)) else value


def _write_outputs(path: str, prompts: list, result) -> None:
    """One JSON line per request, in prompt order: the prompt (text or ids), the generated text
    (with a tokenizer), its token ids and, when asked for, their log-probabilities."""
    with open(path, "w", encoding="utf-8") as f:
        for i, prompt in enumerate(prompts):
            record = {"prompt": prompt, "token_ids": result.token_ids[i]}
            if result.texts is not None:
                record["text"] = result.texts[i]
            if result.logprobs is not None:
                record["logprobs"] = result.logprobs[i]
            if result.top_logprobs is not None:
                record["top_logprobs"] = result.top_logprobs[i]
            if result.prompt_logprobs is not None:
                record["prompt_logprobs"] = result.prompt_logprobs[i]
            if result.prompt_top_logprobs is not None:
                record["prompt_top_logprobs"] = result.prompt_top_logprobs[i]
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _print_logprobs(ids: list[int], logprobs: list[float], tokenizer, top: list | None = None) -> None:
    """One line per generated token: its id, its text (with a tokenizer) and its log-probability
    under the target's own distribution; then, with ``top``, the likeliest tokens there as
    ``id(text)=log-probability``."""
    def text(token: int) -> str:
        return "" if tokenizer is None else repr(tokenizer.decode([token], skip_special_tokens=False))

    for t, (token, logprob) in enumerate(zip(ids, logprobs)):
        columns = [str(token)] + ([text(token)] if tokenizer is not None else [])
        columns.append("-" if logprob is None else f"{logprob:.4f}")  # (a prompt's first token has none)
        if top is not None:
            columns.append("-" if top[t] is None else " ".join(  # (nor likeliest tokens)
                f"{alt}({text(alt)})={lp:.4f}" if tokenizer is not None else f"{alt}={lp:.4f}" for alt, lp in top[t]))
        print("\t".join(columns))


class _IdsAsText:
    """A "tokenizer" whose text is the ids, space-separated: ``--stream --print-ids``."""

    @staticmethod
    def decode(ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


def _train(args: argparse.Namespace) -> int:
    from dspark.training import load_train_config, train

    cfg = load_train_config(args.config, [*args.overrides, f"kind={args.kind}"])
    report = train(cfg)
    print(json.dumps(report["test"], indent=2))
    print(f"[dspark] exported {cfg.output_dir} ({report['parameters'] / 1e6:.2f}M parameters, "
          f"{report['train_seconds'] / 60:.1f} min)", file=sys.stderr)
    return 0


def _data_build(args: argparse.Namespace) -> int:
    from dspark.data.build import build_data, load_data_config

    manifest = build_data(load_data_config(args.config, args.overrides))
    print(json.dumps(manifest, indent=2))
    return 0


def _data_regenerate(args: argparse.Namespace) -> int:
    from dspark.data.regenerate import load_regenerate_config, regenerate

    cfg = load_regenerate_config(args.config, args.overrides)
    report = regenerate(cfg, progress=not args.no_progress)
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=2))
    print(f"[dspark] wrote {cfg.output}", file=sys.stderr)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from dspark.bench import load_bench_config, run_bench

    cfg = load_bench_config(args.config, args.overrides)
    report = run_bench(cfg, progress=not args.no_progress)
    print(Path(cfg.output_dir, "bench.md").read_text())
    return 1 if report["greedy_mismatches"] else 0


def _export(args: argparse.Namespace) -> int:
    from dspark.drafters.checkpoint import read_drafter_spec
    from dspark.drafters.eagle3 import CHECKPOINT_KEY, load_eagle3
    from dspark.drafters.eagle3_export import export_eagle3, export_problems
    from dspark.drafters.eagle_model import Eagle3Args
    from dspark.models import load_model
    from dspark.models.loading import resolve_checkpoint, resolve_dtype

    config_file = Path(resolve_checkpoint(args.target)) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"--target {args.target!r} has no config.json: give the target's checkpoint "
                                "directory (or an embedded model name)")
    dtype = resolve_dtype(args.dtype)
    _, spec = read_drafter_spec(args.drafter, CHECKPOINT_KEY)  # refuse before loading the target
    problems = export_problems(Eagle3Args(**{**spec, "target_layers": tuple(spec["target_layers"])}))
    if problems:
        raise ValueError("this EAGLE-3 head cannot be written in the EAGLE / SpecForge format: " + "; ".join(problems))
    target = load_model(args.target)
    head = load_eagle3(args.drafter, target)
    out = export_eagle3(head, target, json.loads(config_file.read_text()), args.out, dtype=dtype)
    print(f"[dspark] wrote the EAGLE-3 head {args.drafter} as LlamaForCausalLMEagle3 to {out} "
          f"(fused target layers {[i + 1 for i in head.args.target_layers]} as layer inputs)", file=sys.stderr)
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from dspark.scheduling.recipes import calibrate

    report = calibrate(args.config, args.overrides, prompts=args.prompts, num_prompts=args.num_prompts,
                       max_new_tokens=args.max_new_tokens, temperature=args.temperature, method=args.method,
                       batch_size=args.batch_size, seed=args.seed, output=args.output, plot=args.plot)
    print("| position | events | ECE before | ECE after | Brier before | Brier after | AUROC | temperature | shift |")
    print("|---|---|---|---|---|---|---|---|---|")
    for before, after, t, b in zip(report["before"], report["after"], report["temperatures"], report["biases"]):
        print(f"| {before['position']} | {before['events']} | {before['ece']:.4f} | {after['ece']:.4f} | "
              f"{before['brier']:.4f} | {after['brier']:.4f} | {after['auroc']:.3f} | {t:.3f} | {b:.3f} |")
    print(f"[dspark] {report['request_rounds']} request-rounds; {report['method']} {report['map']} map saved to "
          f"{report['saved_to']}", file=sys.stderr)
    return 0


def _profile(args: argparse.Namespace) -> int:
    from dspark.scheduling.recipes import profile

    counts = [int(t) for t in args.tokens.split(",")]
    table = profile(args.config, args.overrides, token_counts=counts, context_length=args.context_length,
                    output=args.output)
    print("| tokens in the forward | steps/s | tokens/s |")
    print("|---|---|---|")
    for b, sps in zip(table.token_counts, table.steps_per_second):
        print(f"| {b} | {sps:.1f} | {b * sps:.0f} |")
    print(f"[dspark] cost table saved to {args.output} ({table.dtype}, {table.threads} threads)", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``dspark`` argument parser (one sub-command per task)."""
    parser = argparse.ArgumentParser(prog="dspark", description="Lossless speculative decoding.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text with a config-composed pipeline",
                         usage='dspark generate ["PROMPT"] [--config CONFIG] [options] [section.key=value ...]')
    gen.add_argument("--config", default=None,
                     help="YAML config path or bare name in configs/ (default: configs/default.yaml when present, "
                          "else the built-in defaults: the embedded dspark-tiny model)")
    gen.add_argument("--prompt", action="append", help="a text prompt (repeat for a batch)")
    gen.add_argument("--prompt-ids", action="append", help="a prompt as token ids, 'ID ID ...' (repeatable)")
    gen.add_argument("--prompts-file", help="a JSONL file of prompts, one {\"prompt\": \"...\"} per line (added to the "
                                            "others); a line may set its own \"max_new_tokens\", sampling settings ("
                                            "\"temperature\", \"top_p\", \"logit_bias\", ...), \"seed\" and stops "
                                            "(\"stop\", \"stop_token_ids\", \"min_new_tokens\", \"ignore_eos\")")
    gen.add_argument("--output", help="write one JSON line per request here (prompt, text, token_ids[, logprobs, ...]) "
                                      "instead of printing the outputs")
    gen.add_argument("--chat", action="store_true",
                     help="each text prompt is a user message, rendered by the tokenizer's chat template")
    gen.add_argument("--chat-template", help="a Jinja chat template file to use instead of the tokenizer's (with --chat)")
    gen.add_argument("--chat-template-kwargs",
                     help="more template variables as a JSON object, e.g. '{\"enable_thinking\": false}' (with --chat)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--repetition-penalty", type=float, default=1.0,
                     help="> 1 discourages tokens already in the prompt or output (1 = off)")
    gen.add_argument("--presence-penalty", type=float, default=0.0,
                     help="subtracted from the logit of every token already in the output (in [-2, 2]; 0 = off)")
    gen.add_argument("--frequency-penalty", type=float, default=0.0,
                     help="times a token's count in the output, subtracted from its logit (in [-2, 2]; 0 = off)")
    gen.add_argument("--logit-bias", help="a JSON object {token id: bias}, biases in [-100, 100], e.g. '{\"0\": -100}'")
    gen.add_argument("--no-repeat-ngram-size", type=int, default=0,
                     help="no n-gram of this size occurs twice in prompt + output (0 = off)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--stop-token-id", type=int, action="append",
                     help="a token id that ends a request, like EOS (repeatable; kept in the output)")
    gen.add_argument("--min-new-tokens", type=int, default=0, help="no EOS or stop token before this many tokens")
    gen.add_argument("--stop", action="append",
                     help="a string that ends a request once generated (repeatable; kept in the output)")
    structured = gen.add_mutually_exclusive_group()
    structured.add_argument("--json-schema", metavar="FILE", help="the output is JSON valid under this schema (a JSON file)")
    structured.add_argument("--json", action="store_true", help="the output is a JSON value")
    structured.add_argument("--regex", metavar="PATTERN", help="the output matches this regular expression")
    structured.add_argument("--choice", action="append", metavar="TEXT",
                            help="the output is one of these (repeatable)")
    structured.add_argument("--grammar", metavar="FILE", help="the output follows this EBNF grammar (rule root)")
    gen.add_argument("--compact-json", action="store_true",
                     help="with --json-schema: no whitespace in the JSON but one space after : and , (a small model "
                          "may otherwise spend its budget on newlines)")
    gen.add_argument("--print-ids", action="store_true", help="print token ids instead of text")
    gen.add_argument("--top-logprobs", type=int, default=0,
                     help="with each token, the K likeliest tokens there and their log-probabilities (implies --logprobs)")
    gen.add_argument("--prompt-logprobs", action="store_true",
                     help="also each prompt token's log-probability under the target given the ones before it")
    gen.add_argument("--prompt-top-logprobs", type=int, default=0,
                     help="with each prompt token, the K likeliest tokens there (implies --prompt-logprobs)")
    gen.add_argument("--logprobs", action="store_true",
                     help="after each request, print every generated token with its log-probability under the target")
    gen.add_argument("--progress", action="store_true", help="show a progress bar")
    gen.add_argument("--stream", action="store_true", help="print the text as it is generated (one prompt)")
    gen.add_argument("--stats-json", help="also write the stats to this JSON file")
    gen.add_argument("overrides", nargs="*", help='the prompt, then config overrides, e.g. drafter.num_speculative_tokens=5')
    gen.set_defaults(func=_generate)

    serve = sub.add_parser("serve", help="decode requests as they arrive (JSON lines, or the OpenAI API over HTTP with --port), "
                                "continuous batching",
                           usage="dspark serve --max-len N [--config CONFIG] [--requests FILE | --port P] "
                                 "[section.key=value ...]")
    serve.add_argument("--config", default=None, help="as for generate")
    serve.add_argument("--requests", default=None,
                       help="a JSONL file of requests (default: stdin, read as lines arrive); a line is "
                            "{\"prompt\": ..., \"id\": ..., \"max_new_tokens\": ...} with any setting a --prompts-file "
                            "line may set")
    serve.add_argument("--max-len", type=int, default=None,
                       help="positions per request, prompt + max_new_tokens + γ + 1 at most (default: cache.max_len)")
    serve.add_argument("--max-new-tokens", type=int, default=None,
                       help="a request's budget unless it sets one (default: 64 for lines, 16 over HTTP as OpenAI's)")
    serve.add_argument("--logprobs", action="store_true", help="each output line carries its tokens' log-probabilities")
    serve.add_argument("--warm-up", action="store_true",
                       help="before serving, run dummy requests through rounds over every number of rows a round may "
                            "take (with engine.compile: compile them now, not on the first requests)")
    serve.add_argument("--stream", action="store_true",
                       help="also a line per step for each request that emitted: its new token_ids and the text they "
                            "complete (before its result line, which has \"stats\")")
    http = serve.add_argument_group("HTTP (the OpenAI API: /v1/completions, /v1/chat/completions, /v1/models; "
                                    "/health, /metrics, /tokenize, /detokenize)")
    http.add_argument("--port", type=int, default=None, help="serve the OpenAI API over HTTP on this port (0: any free "
                                                             "one) instead of reading JSON lines")
    http.add_argument("--host", default=None, help="the address to listen on (default 127.0.0.1)")
    http.add_argument("--served-model-name", default=None, help="the model name requests use (default: dspark)")
    http.add_argument("--max-logprobs", type=int, default=None,
                      help="the most likeliest tokens a request may ask for with its log-probabilities (0-20; "
                           "default 20; 0 refuses log-probabilities)")
    http.add_argument("--chat-template", default=None, help="a Jinja chat template file for /v1/chat/completions "
                                                            "(default: the tokenizer's)")
    http.add_argument("--chat-template-kwargs", default=None,
                      help="template variables as a JSON object, for every chat request")
    serve.add_argument("overrides", nargs="*", help="config overrides, e.g. engine.max_batch_size=16")
    serve.set_defaults(func=_serve)

    tr = sub.add_parser("train", help="train a target, a draft model or a block drafter (Lightning)")
    tr.add_argument("kind", choices=["target", "draft", "drafter"])
    tr.add_argument("--config", required=True, help="configs/train/{target,draft,dspark,dflash}.yaml")
    tr.add_argument("overrides", nargs="*", help="config overrides, e.g. max_steps=100")
    tr.set_defaults(func=_train)

    bench = sub.add_parser("bench", help="measure acceptance and speed against autoregressive decoding and transformers")
    bench.add_argument("--config", default="configs/bench/default.yaml")
    bench.add_argument("--no-progress", action="store_true")
    bench.add_argument("overrides", nargs="*", help="e.g. repeats=5 batch_sizes=[1,4]")
    bench.set_defaults(func=_bench)

    exp = sub.add_parser("export", help="write a drafter in another project's format (eagle3: the EAGLE / SpecForge "
                                        "format vLLM and SGLang serve)")
    exp.add_argument("kind", choices=["eagle3"])
    exp.add_argument("--drafter", required=True, help="the dspark EAGLE-3 checkpoint (directory or embedded name)")
    exp.add_argument("--target", required=True, help="the target it was trained for (checkpoint directory or embedded name)")
    exp.add_argument("--out", required=True, help="directory to write config.json and model.safetensors to")
    exp.add_argument("--dtype", default="bfloat16", help="weights' dtype (bfloat16, float16, float32)")
    exp.set_defaults(func=_export)

    cal = sub.add_parser("calibrate",
                         help="fit the per-position confidence maps (Sequential Temperature or Platt scaling)")
    cal.add_argument("--config", default="dspark",
                     help="a pipeline config whose drafter carries confidences (dspark, eagle3, draft_model)")
    cal.add_argument("--prompts", default="calibration", help="a shipped prompt set or a JSONL file of prompts")
    cal.add_argument("--num-prompts", type=int, default=120)
    cal.add_argument("--max-new-tokens", type=int, default=128)
    cal.add_argument("--temperature", type=float, default=1.0,
                     help="sampling temperature while recording (0: fit the greedy map, else the sampling map)")
    cal.add_argument("--batch-size", type=int, default=8, help="prompts decoded together while recording")
    cal.add_argument("--seed", type=int, default=0, help="sampling seed (request i of the batch at s gets s + i)")
    cal.add_argument("--method", choices=("sts", "platt"), default=None,
                     help="sts: a temperature per position; platt: a temperature and a shift (default: the drafter's)")
    cal.add_argument("--output", default=None, help="calibration.json path (default: beside the drafter checkpoint)")
    cal.add_argument("--plot", default=None, help="reliability diagrams (PNG)")
    cal.add_argument("overrides", nargs="*")
    cal.set_defaults(func=_calibrate)

    prof = sub.add_parser("profile", help="measure the target's verification steps per second against batch tokens")
    prof.add_argument("--config", default=None, help="a pipeline config (its target is profiled)")
    prof.add_argument("--tokens", default="1,2,4,8,16,32,64,128", help="token counts to measure, comma-separated")
    prof.add_argument("--context-length", type=int, default=256)
    prof.add_argument("--output", default="sps.json")
    prof.add_argument("overrides", nargs="*")
    prof.set_defaults(func=_profile)

    data = sub.add_parser("data", help="build the stdlib corpus artefacts and drafter training data")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    build = data_sub.add_parser("build", help="tokenizer, prompt sets and manifest from the stdlib corpus")
    build.add_argument("--config", default="configs/data/stdlib.yaml")
    build.add_argument("overrides", nargs="*")
    build.set_defaults(func=_data_build)
    regen = data_sub.add_parser("regenerate", help="drafter training data: train-split prompts continued by the target")
    regen.add_argument("--config", default="configs/data/regenerate.yaml")
    regen.add_argument("--no-progress", action="store_true")
    regen.add_argument("overrides", nargs="*")
    regen.set_defaults(func=_data_regenerate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dspark`` console script."""
    parser = build_parser()
    # argparse cannot place a `key=value ...` positional list after options of a sub-command:
    # collect the leftovers and accept those that are overrides
    args, extra = parser.parse_known_args(argv)
    unknown = [item for item in extra if item.startswith("-") or (args.command != "generate" and "=" not in item)]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = list(getattr(args, "overrides", None) or []) + extra
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, KeyError) as err:
        print(f"dspark {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
