"""Prompt lookup where it should shine: greedy decoding of a random model falls into a loop.

    python benchmarks/ngram_loop.py [--repeats 5] [--new-tokens 512] [--gammas 2 4 8]

Same random ~6M Qwen3 as benchmarks/ar_vs_hf.py, 64-token random prompts, greedy. For batch 1
and 8, runs `none` and `ngram` (each γ) alternately after a warm-up and prints median tokens/s,
τ (tokens per target forward) and the speedup over `none`; outputs are checked to be identical.
"""

from __future__ import annotations

import argparse
import statistics

import torch

import dspark
from dspark.models import random_hf_model

from ar_vs_hf import QWEN3_6M


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--gammas", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()

    hf = random_hf_model(QWEN3_6M, seed=0)
    base = ["target.device=cpu", "target.tokenizer=null", "engine.max_batch_size=64"]
    pipes = {"none": dspark.build_pipeline("ar", target_model=hf, overrides=base)}
    for gamma in args.gammas:
        pipes[f"ngram g={gamma}"] = dspark.build_pipeline(
            "ngram", target_model=hf, overrides=base + [f"drafter.num_speculative_tokens={gamma}"])
    print(f"Qwen3 {sum(p.numel() for p in hf.parameters()) / 1e6:.1f}M random weights, greedy, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, {torch.get_num_threads()} threads, {args.repeats} alternating repeats")
    for batch in args.batches:
        prompts = torch.randint(0, QWEN3_6M["vocab_size"], (batch, args.prompt_len),
                                generator=torch.Generator().manual_seed(batch)).tolist()
        times = {name: [] for name in pipes}
        stats, outputs = {}, {}
        for name, pipe in pipes.items():  # warm-up
            pipe.generate(prompts, max_new_tokens=args.new_tokens, ignore_eos=True)
        for _ in range(args.repeats):
            for name, pipe in pipes.items():
                result = pipe.generate(prompts, max_new_tokens=args.new_tokens, ignore_eos=True)
                times[name].append(result.stats.wall_time_s)
                stats[name], outputs[name] = result.stats, result.token_ids
        for name in pipes:
            if outputs[name] != outputs["none"]:
                raise SystemExit(f"{name}: greedy output differs from autoregressive decoding")
        base_time = statistics.median(times["none"])
        print(f"\nbatch {batch}:  {'pipeline':12s} {'tok/s':>8s} {'tau':>6s} {'speedup':>8s}  spread of wall time")
        for name in pipes:
            med = statistics.median(times[name])
            print(f"          {name:12s} {batch * args.new_tokens / med:8.1f} {stats[name].mean_accepted_length:6.2f} "
                  f"{base_time / med:7.2f}x  [{min(times[name]):.3f}..{max(times[name]):.3f}]s")


if __name__ == "__main__":
    main()
