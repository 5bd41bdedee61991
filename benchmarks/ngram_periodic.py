"""τ of prompt lookup with and without ``periodic`` (a match close to the end continues as if the
text repeats) on the shipped prompt sets, greedy and sampled, side by side.

    python benchmarks/ngram_periodic.py [--gamma 4] [--prompts 16] [--max-new-tokens 128]

The embedded target, eager, batch 8, seed 0. τ does not depend on the machine's speed; greedy
outputs must be identical (the drafts change, the tokens may not). Prints a Markdown table.
"""

from __future__ import annotations

import argparse

import dspark
from dspark.bench.runner import load_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()
    pipes = {periodic: dspark.build_pipeline("ngram", overrides=[
        "target.device=cpu", "engine.max_batch_size=8", f"drafter.num_speculative_tokens={args.gamma}",
        f"drafter.periodic={periodic}"]) for periodic in (False, True)}
    print(f"| domain | T | τ, γ = {args.gamma} | τ, γ = {args.gamma}, periodic | ratio |")
    print("|---|---|---|---|---|")
    for domain in ("code", "prose"):
        prompts = load_prompts(domain, pipes[False].tokenizer, args.prompts)
        for temperature in (0.0, 1.0):
            outs = {p: pipe.generate(prompts, max_new_tokens=args.max_new_tokens, temperature=temperature, seed=0)
                    for p, pipe in pipes.items()}
            if temperature == 0.0 and outs[False].token_ids != outs[True].token_ids:
                raise SystemExit(f"[ngram_periodic] greedy outputs differ on {domain}")
            plain, periodic = (outs[p].stats.mean_accepted_length for p in (False, True))
            print(f"| {domain} | {temperature:g} | {plain:.2f} | {periodic:.2f} | {periodic / plain:.2f} |", flush=True)


if __name__ == "__main__":
    main()
