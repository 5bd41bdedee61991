"""Command line: ``dspark generate --config configs/ar.yaml --prompt "..." [key=value ...]``.

One sub-command per task; :func:`build_parser` wires each to its function (``generate``:
:mod:`dspark.cli.generate`, ``serve``: :mod:`dspark.cli.serve`, the rest: :mod:`dspark.cli.tasks`)."""

from __future__ import annotations

import argparse
import sys

from dspark.cli.generate import generate_command
from dspark.cli.serve import serve_command
from dspark.cli.tasks import (bench_command, calibrate_command, data_build_command, data_regenerate_command,
                              export_command, profile_command, token_counts, train_command)


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
    gen.add_argument("--seed", type=int, default=None,
                     help="sampling seed: request i gets SEED + i, the same tokens on every run (default: fresh "
                          "seeds each run, as the Python API)")
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
    gen.set_defaults(func=generate_command)

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
                       help="a request's budget unless it sets one (default: 64 for lines; over HTTP, as OpenAI's: "
                            "16 for a completion, the rest of the context for a chat)")
    serve.add_argument("--logprobs", action="store_true", help="each output line carries its tokens' log-probabilities")
    serve.add_argument("--warm-up", action="store_true",
                       help="before serving, run dummy requests through rounds over every number of rows a round may "
                            "take (with engine.compile: compile them now, not on the first requests)")
    serve.add_argument("--stream", action="store_true",
                       help="also a line per step for each request that emitted: its new token_ids and the text they "
                            "complete (before its result line, which has \"stats\")")
    http = serve.add_argument_group("HTTP (the OpenAI API: /v1/completions, /v1/chat/completions, /v1/models; "
                                    "/health, /metrics, /tokenize, /detokenize, /tokenizer_info)")
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
    serve.set_defaults(func=serve_command)

    tr = sub.add_parser("train", help="train a target, a draft model or a block drafter (Lightning)")
    tr.add_argument("kind", choices=["target", "draft", "drafter"])
    tr.add_argument("--config", required=True, help="configs/train/{target,draft,dspark,dflash,eagle3}.yaml")
    tr.add_argument("overrides", nargs="*", help="config overrides, e.g. max_steps=100")
    tr.set_defaults(func=train_command)

    bench = sub.add_parser("bench", help="measure acceptance and speed against autoregressive decoding and transformers")
    bench.add_argument("--config", default="configs/bench/default.yaml")
    bench.add_argument("--no-progress", action="store_true")
    bench.add_argument("overrides", nargs="*", help="e.g. repeats=5 batch_sizes=[1,4]")
    bench.set_defaults(func=bench_command)

    exp = sub.add_parser("export", help="write a drafter in another project's format (eagle3: the EAGLE / SpecForge "
                                        "format vLLM and SGLang serve)")
    exp.add_argument("kind", choices=["eagle3"])
    exp.add_argument("--drafter", required=True, help="the dspark EAGLE-3 checkpoint (directory or embedded name)")
    exp.add_argument("--target", required=True, help="the target it was trained for (checkpoint directory or embedded name)")
    exp.add_argument("--out", required=True, help="directory to write config.json and model.safetensors to")
    exp.add_argument("--dtype", default="bfloat16", help="weights' dtype (bfloat16, float16, float32)")
    exp.set_defaults(func=export_command)

    cal = sub.add_parser("calibrate",
                         help="fit the per-position confidence maps (Sequential Temperature or Platt scaling)")
    cal.add_argument("--config", default="dspark",
                     help="a pipeline config whose drafter carries confidences (dspark, eagle3, draft_model, early_exit)")
    cal.add_argument("--prompts", default="calibration", help="a shipped prompt set or a JSONL file of prompts")
    cal.add_argument("--num-prompts", type=int, default=120)
    cal.add_argument("--max-new-tokens", type=int, default=128)
    cal.add_argument("--temperature", type=float, default=1.0,
                     help="sampling temperature while recording (0: fit the greedy map, else the sampling map)")
    cal.add_argument("--batch-size", type=int, default=8, help="prompts decoded together while recording")
    cal.add_argument("--seed", type=int, default=0, help="sampling seed (request i of the batch at s gets s + i)")
    cal.add_argument("--method", choices=("sts", "platt"), default=None,
                     help="sts: a temperature per position; platt: a temperature and a shift (default: the drafter's)")
    cal.add_argument("--output", default=None, help="calibration.json path (default: beside the drafter checkpoint; a "
                     "checkpoint shipped with dspark needs one: its own map is not overwritten)")
    cal.add_argument("--plot", default=None, help="reliability diagrams (PNG)")
    cal.add_argument("overrides", nargs="*")
    cal.set_defaults(func=calibrate_command)

    prof = sub.add_parser("profile", help="measure the target's verification steps per second against batch tokens")
    prof.add_argument("--config", default=None, help="a pipeline config (its target is profiled)")
    prof.add_argument("--tokens", type=token_counts, default="1,2,4,8,16,32,64,128",
                      help="token counts to measure, comma-separated")
    prof.add_argument("--context-length", type=int, default=256)
    prof.add_argument("--output", default="sps.json")
    prof.add_argument("overrides", nargs="*")
    prof.set_defaults(func=profile_command)

    data = sub.add_parser("data", help="build the stdlib corpus artefacts and drafter training data")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    build = data_sub.add_parser("build", help="tokenizer, prompt sets and manifest from the stdlib corpus")
    build.add_argument("--config", default="configs/data/stdlib.yaml")
    build.add_argument("overrides", nargs="*")
    build.set_defaults(func=data_build_command)
    regen = data_sub.add_parser("regenerate", help="drafter training data: train-split prompts continued by the target")
    regen.add_argument("--config", default="configs/data/regenerate.yaml")
    regen.add_argument("--no-progress", action="store_true")
    regen.add_argument("overrides", nargs="*")
    regen.set_defaults(func=data_regenerate_command)
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
    except (ValueError, TypeError, FileNotFoundError, KeyError, ImportError) as err:  # (ImportError: a _target_)
        print(f"dspark {args.command}: error: {err}", file=sys.stderr)
        return 2

