"""What top-p costs: the sampler alone, and decoding with it against temperature alone.

    python benchmarks/top_p_cost.py [--configs ar eagle3] [--batches 1 8] [--repeats 3] [--no-compile]

First the sampler's time for verify- and draft-shaped logits of the embedded vocabulary, T = 0.8
against T = 0.8 with top-p 0.95 (median of 20 calls). Then, per config and batch size, the first
code prompts of the eval set decoded for 64 tokens both ways, alternating, ``--repeats`` times after
a warm-up (``engine.compile`` unless ``--no-compile``): medians [min..max] tokens/s and the ratio
top-p ÷ temperature alone.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import dspark
from dspark.bench.runner import load_prompts
from dspark.records import SamplingParams
from dspark.samplers import DefaultSampler

PLAIN, TOP_P = dict(temperature=0.8), dict(temperature=0.8, top_p=0.95)


def sampler_ms(shape: tuple[int, ...], params: SamplingParams) -> float:
    logits, sampler = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 3, DefaultSampler()
    sampler.probs(logits, params)
    times = []
    for _ in range(20):
        start = time.perf_counter()
        sampler.probs(logits, params)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["ar", "eagle3"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()

    vocab = None
    for name in args.configs:
        pipe = dspark.build_pipeline(f"configs/{name}.yaml", overrides=[
            "target.device=cpu", "target.dtype=float32", f"engine.compile={str(not args.no_compile).lower()}"])
        if vocab is None:
            vocab = pipe.target.vocab_size
            for shape in [(1, 8, vocab), (8, 8, vocab), (1, vocab), (8, vocab)]:
                print(f"sampler {list(shape)}: T 0.8 {sampler_ms(shape, SamplingParams(**PLAIN)):.2f} ms, "
                      f"top-p 0.95 {sampler_ms(shape, SamplingParams(**TOP_P)):.2f} ms", flush=True)
        for batch in args.batches:
            prompts = load_prompts("code", pipe.tokenizer, batch)
            variants = {"T 0.8": PLAIN, "T 0.8, top-p 0.95": TOP_P}
            for settings in variants.values():  # warm-up (and compilation)
                pipe.generate(prompts, max_new_tokens=64, ignore_eos=True, seed=0, **settings)
            rates = {key: [] for key in variants}
            for _ in range(args.repeats):
                for key, settings in variants.items():
                    start = time.perf_counter()
                    ids = pipe.generate(prompts, max_new_tokens=64, ignore_eos=True, seed=0, **settings).token_ids
                    rates[key].append(sum(map(len, ids)) / (time.perf_counter() - start))
            medians = {key: statistics.median(r) for key, r in rates.items()}
            cells = ", ".join(f"{key} {medians[key]:.0f} [{min(r):.0f}..{max(r):.0f}]" for key, r in rates.items())
            print(f"{name}, batch {batch}: tokens/s {cells}; top-p / T alone "
                  f"{medians['T 0.8, top-p 0.95'] / medians['T 0.8']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
