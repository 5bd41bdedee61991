"""Command line: ``dspark generate --config configs/ar.yaml --prompt "..." [key=value ...]``."""

from __future__ import annotations

import argparse
import json
import sys


def _generate(args: argparse.Namespace) -> int:
    from dspark.pipeline import build_pipeline

    pipe = build_pipeline(args.config, overrides=args.overrides)
    prompts: list = list(args.prompt or [])
    for ids in args.prompt_ids or []:
        prompts.append([int(t) for t in ids.replace(",", " ").split()])
    if not prompts:
        raise SystemExit("dspark generate: give at least one --prompt TEXT or --prompt-ids 'ID ID ...'")
    result = pipe.generate(prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, seed=args.seed,
                           ignore_eos=args.ignore_eos, progress=args.progress)
    for i, ids in enumerate(result.token_ids):
        if len(prompts) > 1:
            print(f"--- request {i}")
        print(result.texts[i] if result.texts is not None and not args.print_ids else " ".join(map(str, ids)))
    print(f"[dspark] {result.stats.summary()}", file=sys.stderr)
    if args.stats_json:
        from dataclasses import asdict

        with open(args.stats_json, "w") as f:
            json.dump(asdict(result.stats), f, indent=2)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``dspark`` argument parser (one sub-command per task)."""
    parser = argparse.ArgumentParser(prog="dspark", description="Lossless speculative decoding.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text with a config-composed pipeline")
    gen.add_argument("--config", default="ar", help="YAML config path or bare name in configs/ (default: ar)")
    gen.add_argument("--prompt", action="append", help="a text prompt (repeat for a batch)")
    gen.add_argument("--prompt-ids", action="append", help="a prompt as token ids, 'ID ID ...' (repeatable)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--print-ids", action="store_true", help="print token ids instead of text")
    gen.add_argument("--progress", action="store_true", help="show a progress bar")
    gen.add_argument("--stats-json", help="also write the stats to this JSON file")
    gen.add_argument("overrides", nargs="*", help="config overrides, e.g. drafter.num_speculative_tokens=5")
    gen.set_defaults(func=_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dspark`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, KeyError) as err:
        print(f"dspark {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
