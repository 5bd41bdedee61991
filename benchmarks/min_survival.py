"""Tokens/s of the EAGLE-3 drafter stopping early (``drafter.min_survival``) against drafting γ
every round and against plain decoding, side by side in one process.

    python benchmarks/min_survival.py --thresholds 0.02,0.05,0.1 [--prompts 8] [--repeats 4] [--temperature 0]

Compiled pipelines (batch 1, the shipped head, γ = 7) decode the first ``--prompts`` code prompts
one at a time, 128 new tokens each: plain decoding, EAGLE-3 with ``min_survival=0`` and one per
threshold, alternating for ``--repeats`` passes after a warm-up pass (which compiles every graph).
Greedy runs check that every pipeline gives plain decoding's tokens. Prints per pipeline the
median tokens/s, its ratio to plain decoding, τ and the drafts offered per round.
"""

from __future__ import annotations

import argparse
import statistics
import time

import dspark
from dspark.bench.runner import load_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--thresholds", default="0.02,0.05,0.1", help="min_survival values, comma-separated")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=0.0)
    args = parser.parse_args()
    common = ["target.device=cpu", "engine.compile=true", "engine.max_batch_size=1"]
    pipes = {"none": dspark.build_pipeline("ar", overrides=common)}
    for threshold in [0.0, *(float(t) for t in args.thresholds.split(","))]:
        pipes[f"eagle3 min_survival={threshold:g}"] = dspark.build_pipeline(
            "eagle3", overrides=[*common, f"drafter.min_survival={threshold}"])
    prompts = load_prompts("code", pipes["none"].tokenizer, args.prompts)

    def one_pass(pipe, seed: int):
        outputs = [pipe.generate([p], max_new_tokens=128, temperature=args.temperature, seed=seed) for p in prompts]
        return outputs

    reference = None
    for name, pipe in pipes.items():  # warm-up: compiles every shape; greedy outputs must agree
        tokens = [o.token_ids[0] for o in one_pass(pipe, 0)]
        if args.temperature == 0:
            reference = reference or tokens
            if tokens != reference:
                raise SystemExit(f"[min_survival] {name}: greedy output differs from plain decoding")
    rates = {name: [] for name in pipes}
    taus, offered = {name: [] for name in pipes}, {name: [] for name in pipes}
    for repeat in range(args.repeats):
        for name, pipe in pipes.items():
            started = time.perf_counter()
            outputs = one_pass(pipe, repeat + 1)
            rates[name].append(sum(len(o.token_ids[0]) for o in outputs) / (time.perf_counter() - started))
            rounds = sum(o.stats.rounds for o in outputs)
            taus[name].append(sum(len(o.token_ids[0]) - 1 for o in outputs) / rounds)
            offered[name].append(sum(o.stats.drafted_tokens for o in outputs) / rounds)
        print(f"pass {repeat + 1}: " + ", ".join(f"{n} {rates[n][-1]:.0f}" for n in pipes), flush=True)
    plain, every = statistics.median(rates["none"]), rates["eagle3 min_survival=0"]
    print(f"\ncode, T = {args.temperature:g}, batch 1, {args.prompts} prompts x 128 tokens, {args.repeats} passes")
    print("| pipeline | tokens/s (median) | ÷ plain | ÷ γ every round (median of per-pass ratios) | τ | drafts offered per round |")
    print("|---|---|---|---|---|---|")
    for name in pipes:
        rate = statistics.median(rates[name])
        paired = statistics.median(r / e for r, e in zip(rates[name], every))
        print(f"| {name} | {rate:.0f} | {rate / plain:.2f}× | {paired:.2f}× | {statistics.median(taus[name]):.2f} | "
              f"{statistics.median(offered[name]):.2f} |")


if __name__ == "__main__":
    main()
