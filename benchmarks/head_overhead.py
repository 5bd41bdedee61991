"""Drafting time per round of the DSpark drafter's sequential head against DFlash (issue 7's
"sequential head overhead" goal), the Markov head with and without its precomputed bias table.

    python benchmarks/head_overhead.py [--prompts 8] [--repeats 5] [--max-new-tokens 128]

The shipped DSpark (Markov head) and DFlash drafters on the embedded target, compiled
(``engine.compile=true``), batch 1, γ = 7: ``dspark`` reads the head's bias from its table
(the default for this vocabulary), ``dspark_matvec`` multiplies by ``W2ᵀ`` at every step
(``drafter.bias_table_mib=0``). Per domain and temperature, the variants decode the same prompts
one at a time, alternating, after a warm-up pass; each ``generate`` call gives one drafting time per
round (``engine.time_phases``; the context append is kept out of it, ``fuse_append = False``, as
before that fusion existed). Prints the medians over prompts × repeats and their ratios to
DFlash's. τ is printed as a check that the variants draft alike (the table changes the bias only
by rounding).
"""

from __future__ import annotations

import argparse
import statistics

import dspark
from dspark.bench.runner import load_prompts

VARIANTS = {"dflash": ("configs/dflash.yaml", []),
            "dspark": ("configs/dspark.yaml", []),
            "dspark_matvec": ("configs/dspark.yaml", ["drafter.bias_table_mib=0"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()

    common = ["target.device=cpu", "target.dtype=float32", "engine.compile=true", "engine.time_phases=true"]
    pipes = {name: dspark.build_pipeline(config, overrides=common + extra) for name, (config, extra) in VARIANTS.items()}
    for pipe in pipes.values():  # time the draft block alone: the context append stays a call of its own
        pipe.engine.drafter.fuse_append = False
    print(f"drafting ms per round, median over {args.prompts} prompts × {args.repeats} alternating repeats "
          f"(batch 1, γ = 7, {args.max_new_tokens} new tokens)")
    print("| domain | T | " + " | ".join(f"{n} ms (τ)" for n in VARIANTS) + " | dspark ÷ dflash | dspark_matvec ÷ dflash |")
    print("|---|---|" + "---|" * (len(VARIANTS) + 2))
    for domain in ("code", "prose"):
        prompts = load_prompts(domain, pipes["dflash"].tokenizer, args.prompts)
        for temperature in (0.0, 1.0):
            times = {name: [] for name in pipes}
            taus = {name: [] for name in pipes}
            for repeat in range(args.repeats + 1):  # pass 0 warms up (compiles)
                order = list(pipes)[repeat % len(pipes):] + list(pipes)[: repeat % len(pipes)]
                for i, prompt in enumerate(prompts):
                    for name in order:
                        stats = pipes[name].generate([prompt], max_new_tokens=args.max_new_tokens,
                                                     temperature=temperature, seed=i, ignore_eos=True,
                                                     progress=False).stats
                        if repeat:
                            times[name].append(stats.draft_time_s / stats.rounds * 1e3)
                            taus[name].append(stats.mean_accepted_length)
            ms = {name: statistics.median(v) for name, v in times.items()}
            cells = [f"{ms[n]:.3f} ({statistics.mean(taus[n]):.2f})" for n in pipes]
            print(f"| {domain} | {temperature:g} | " + " | ".join(cells)
                  + f" | {ms['dspark'] / ms['dflash']:.2f} | {ms['dspark_matvec'] / ms['dflash']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
