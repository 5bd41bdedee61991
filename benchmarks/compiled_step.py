"""Milliseconds per target forward of the embedded target, eager vs compiled, by batch size and width.

    python benchmarks/compiled_step.py [--batches 1 8 32] [--widths 1 8] [--cache-len 512] [--repeats 100]

One forward appends ``width`` tokens per request to a static cache of ``--cache-len`` positions
already holding a 150-token prompt, reading the whole cache (as ``engine.compile`` rounds do);
the cache lengths are reset before each call. Eager and compiled calls alternate; medians are
printed with their ratio. This is the measurement behind the compiled cache-write fix of
2026-11-29 (docs/benchmarks.md): before it, the compiled forward copied each layer's cache twice.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dspark.cache import StaticKVCache
from dspark.models import load_model
from dspark.models.compiled import compile_forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--widths", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--cache-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=100)
    args = parser.parse_args()

    model = load_model("dspark-tiny")
    compiled = compile_forward(model, model.device)
    print(f"dspark-tiny, float32, {torch.get_num_threads()} threads, cache {args.cache_len} positions, "
          f"{args.repeats} alternating repeats")
    print("| batch | width | eager ms | compiled ms | eager ÷ compiled |")
    print("|---|---|---|---|---|")
    with torch.inference_mode():
        for batch in args.batches:
            cache = StaticKVCache.for_model(model, batch, args.cache_len)
            model(torch.randint(2, model.vocab_size, (batch, 150)), cache, kv_len=150)
            prompt_lengths = cache.lengths.clone()
            for width in args.widths:
                tokens = torch.randint(2, model.vocab_size, (batch, width))
                num_new = torch.full((batch,), width)
                times = {"eager": [], "compiled": []}
                for repeat in range(args.repeats + 3):  # 3 warm-up passes (the first compiles)
                    for name, forward in (("eager", model), ("compiled", compiled)):
                        cache.lengths.copy_(prompt_lengths)
                        started = time.perf_counter()
                        forward(tokens, cache, num_new, kv_len=args.cache_len)
                        if repeat >= 3:
                            times[name].append(time.perf_counter() - started)
                eager, fast = (statistics.median(times[k]) * 1e3 for k in ("eager", "compiled"))
                print(f"| {batch} | {width} | {eager:.2f} | {fast:.2f} | {eager / fast:.2f} |")


if __name__ == "__main__":
    main()
