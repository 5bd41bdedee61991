"""``dspark generate``: prompts from the flags, the command line or a JSONL file, decoded by a
config-composed pipeline; text (or ids, log-probabilities) on stdout, or JSON lines to a file."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from dspark.cli.requests import LINE_SETTINGS, chat_template_options, line_grammar, listed_stops, token_keyed

OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)*=")  # section.key[.key]=value, or a misspelt one (refused)


def generate_command(args: argparse.Namespace) -> int:
    from dspark.config import BARE_COMPONENT, ConfigError, find_config
    from dspark.pipeline import build_pipeline

    # positional words are prompts unless they read `name[.key...]=value`: overrides (a component
    # section switched by name, `drafter=ngram`, too); a word like `temperature=0.8` is then refused
    # as an unknown section rather than decoded as a second prompt — text of that shape goes in --prompt
    is_override = lambda word: bool(OVERRIDE.match(word) or BARE_COMPONENT.match(word))  # noqa: E731
    positional = [o for o in args.overrides if not is_override(o)]
    overrides = [o for o in args.overrides if is_override(o)]
    prompts: list = positional + list(args.prompt or [])
    for ids in args.prompt_ids or []:
        try:
            prompts.append([int(t) for t in ids.replace(",", " ").split()])
        except ValueError:
            raise SystemExit(f"dspark generate: --prompt-ids takes integer token ids separated by spaces or commas, "
                             f"e.g. '1 2 3'; got {ids!r}") from None
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
        _check_line_keys(args.prompts_file, records, first=len(prompts))
        prompts += [record["prompt"] for record in records]
        budgets += [record.get("max_new_tokens", args.max_new_tokens) for record in records]  # a line's own budget
        lines += [{name: record[name] for name in LINE_SETTINGS if name in record} for record in records]
        first = len(prompts) - len(records)  # (requests are numbered as generate numbers them: from 0, flags' first)
        for index, (line, record) in enumerate(zip(lines[first:], records), first):
            try:
                grammar = line_grammar(record)
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
    chat_template, template_kwargs = chat_template_options(args, "generate")
    for flag, path in (("--output", args.output), ("--stats-json", args.stats_json)):
        if path and not Path(path).resolve().parent.is_dir():
            raise SystemExit(f"dspark generate: {flag} {path}: its directory does not exist")
        if path and Path(path).is_dir():
            raise SystemExit(f"dspark generate: {flag} {path} is a directory: name a file")
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
    try:
        pipe = build_pipeline(args.config if args.config is not None else find_config("default"), overrides=overrides)
    except ConfigError as err:
        if "unknown config section" not in str(err):
            raise
        raise SystemExit(f"dspark generate: {err} (a prompt that reads NAME=VALUE goes in --prompt \"...\"; sampling "
                         "settings are flags: --temperature 0.8)") from None
    streamer = None
    if args.stream:
        from dspark.streaming import TextStreamer

        text = pipe.tokenizer is not None and not args.print_ids
        streamer = TextStreamer(pipe.tokenizer) if text else TextStreamer(_IdsAsText(), prompt_context=False)
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


def _check_line_keys(path: str, records: list[dict], first: int) -> None:
    """A ``--prompts-file`` line's keys: a key that is nearly a setting's name is refused (a
    misspelt ``temprature`` was ignored silently, the request decoded greedily); other keys are
    taken as the line's own data (an eval set's ``id``, ``reference`` …) and named once on stderr."""
    import difflib

    from dspark.serving.protocol import STRUCTURED_FIELDS

    known = ("prompt", "max_new_tokens", *LINE_SETTINGS, *STRUCTURED_FIELDS)
    ignored: set[str] = set()
    for index, record in enumerate(records, first):
        for key in sorted(set(record) - set(known)):
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.8)
            if close:
                raise SystemExit(f"dspark generate: {path}: request {index}: unknown key {key!r} (did you mean "
                                 f"{close[0]!r}?); a line may set max_new_tokens, {', '.join(LINE_SETTINGS)} and a "
                                 f"structured output ({', '.join(STRUCTURED_FIELDS)})")
            ignored.add(key)
    if ignored:
        print(f"[dspark] {path}: keys that are no setting, ignored: {', '.join(sorted(ignored))}", file=sys.stderr)


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
        settings[name] = [listed_stops(name, value) for value in settings[name]]
        if name == "logit_bias":  # JSON objects: their keys are strings
            settings[name] = [token_keyed(bias, f"request {i}'s logit_bias (--prompts-file)")
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
    return token_keyed(value, "--logit-bias")


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
