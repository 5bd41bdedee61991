"""Tokens/s with a compiled round's context append fused into the next draft call, against a
compiled call of its own (``Drafter.fuse_append``), side by side in one process.

    python benchmarks/fused_append.py dspark eagle3 [--prompts 8] [--repeats 12] [--temperature 0]

Per config, two compiled pipelines (batch 1, the shipped drafter) decode the first ``--prompts``
code prompts one at a time, 128 new tokens each; the two alternate for ``--repeats`` passes after
a warm-up pass that also checks that both give the same tokens. Prints each pass's tokens/s, the
medians and the median of the per-pass ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import dspark
from dspark.bench.runner import load_prompts


def measure(config: str, num_prompts: int, repeats: int, temperature: float) -> dict[str, list[float]]:
    pipes = {}
    for name, fuse in (("fused", True), ("separate", False)):
        pipe = dspark.build_pipeline(config, overrides=["target.device=cpu", "engine.compile=true",
                                                        "engine.max_batch_size=1"])
        pipe.engine.drafter.fuse_append = fuse
        pipes[name] = pipe
    prompts = load_prompts("code", pipes["fused"].tokenizer, num_prompts)

    def decode(pipe) -> list[list[int]]:
        return [pipe.generate([p], max_new_tokens=128, temperature=temperature, seed=0).token_ids[0] for p in prompts]

    if decode(pipes["fused"]) != decode(pipes["separate"]):  # warm-up (compiles) and check
        raise SystemExit(f"[fused_append] {config}: the fused and separate appends gave different tokens")
    rates: dict[str, list[float]] = {name: [] for name in pipes}
    for _ in range(repeats):
        for name, pipe in pipes.items():
            started = time.perf_counter()
            tokens = sum(len(ids) for ids in decode(pipe))
            rates[name].append(tokens / (time.perf_counter() - started))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--temperature", type=float, default=0.0)
    args = parser.parse_args()
    for config in args.configs:
        rates = measure(config, args.prompts, args.repeats, args.temperature)
        ratios = [f / s for f, s in zip(rates["fused"], rates["separate"])]
        print(f"{config}: fused {[round(r) for r in rates['fused']]}, separate {[round(r) for r in rates['separate']]} tok/s")
        print(f"{config}: medians {statistics.median(rates['fused']):.1f} / {statistics.median(rates['separate']):.1f} "
              f"tok/s; fused ÷ separate per pass: median {statistics.median(ratios):.3f} "
              f"[{min(ratios):.2f}..{max(ratios):.2f}]")


if __name__ == "__main__":
    main()
