"""What the engine's watch for distributions without mass costs: plain and prompt-lookup decoding of
the embedded target, batch 1, with ``Stopper.check_mass`` as it is and replaced by a no-op in
this process, alternating runs, medians and their ratio.

    python benchmarks/mass_check.py [--repeats 7] [--max-new-tokens 128] [--eager]

Compiled by default (``engine.compile=true``: where a round's fixed costs weigh most); the
outputs of the two variants are the same (greedy), which the script checks.
"""

from __future__ import annotations

import argparse
import statistics
import time

import dspark
from dspark.engine.stopping import Stopper

PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--eager", action="store_true", help="engine.compile=false")
    args = parser.parse_args()
    watched = Stopper.check_mass
    variants = {"check": watched, "no-op": lambda self, logits, tokens, num_emitted, lengths: tokens}
    overrides = ["target.device=cpu", f"engine.compile={not args.eager}".lower()]
    pipes = {name: dspark.build_pipeline(name, overrides=overrides) for name in ("ar", "ngram")}
    prompt = pipes["ar"].tokenizer.encode(PROMPT)
    rates = {(name, v): [] for name in pipes for v in variants}
    outputs = {}
    for pipe in pipes.values():  # warm-up (compilation)
        pipe.generate([prompt], max_new_tokens=args.max_new_tokens, ignore_eos=True)
    for repeat in range(args.repeats):
        for name, pipe in pipes.items():
            for variant in (list(variants) if repeat % 2 else list(variants)[::-1]):
                Stopper.check_mass = variants[variant]
                started = time.perf_counter()
                out = pipe.generate([prompt], max_new_tokens=args.max_new_tokens, ignore_eos=True)
                rates[name, variant].append(args.max_new_tokens / (time.perf_counter() - started))
                outputs.setdefault(name, out.token_ids)
                if out.token_ids != outputs[name]:
                    raise SystemExit(f"[mass_check] {name}: the outputs differ between the variants")
    Stopper.check_mass = watched
    print("| pipeline | check tok/s | no-op tok/s | check ÷ no-op |")
    print("|---|---|---|---|")
    for name in pipes:
        check, noop = (statistics.median(rates[name, v]) for v in variants)
        print(f"| {name} | {check:.1f} [{min(rates[name, 'check']):.0f}..{max(rates[name, 'check']):.0f}] | "
              f"{noop:.1f} [{min(rates[name, 'no-op']):.0f}..{max(rates[name, 'no-op']):.0f}] | {check / noop:.3f} |")


if __name__ == "__main__":
    main()
