"""CPU projections: oneDNN with packed weights, oneDNN with plain weights, and torch's BLAS (MKL),
side by side in one process.

    python benchmarks/cpu_linear.py [--configs ar draft_model eagle3 dspark] [--prompts 8]
        [--max-new-tokens 128] [--repeats 3] [--forward-blocks 10]

Every native model and drafter layer projects through :func:`dspark.models.linear.linear`, which
takes oneDNN's inner product for CPU float32 inference where ``dspark.models.linear.ONEDNN`` is set
(by default on AMD processors), by oneDNN's packed copy of each weight (``PACK_WEIGHTS``), and
``F.linear`` (MKL) otherwise. This script measures the three variants whatever the default, so
that the default can be checked on a new machine.
Dynamo guards on ``ONEDNN`` and the packed copy is looked up inside the op, so every variant's
compiled graphs live in one process and the variants alternate after a warm-up of each:

* **forward**: ms per compiled forward of the embedded target appending ``width`` tokens per
  request to a cache holding a 150-token prompt (reading 512 positions), batch 1 and 8, widths 1
  (a decode step), 2, 4 and 8 (a verify forward at γ = 7). The variants alternate by blocks of
  20 timed calls after 3 untimed ones (alternating call by call would evict each variant's
  weights from the cache with the other's); the median over ``--forward-blocks`` blocks each;
* **decoding**: tokens/s of each pipeline (``engine.compile=true``, greedy, batch 1, the shipped
  code prompts, one request per ``generate`` call), the median over ``--repeats`` passes, τ, and
  how many outputs equal the packed variant's (float32 rounding differs between the libraries
  and layouts, so a near-tie may resolve differently; each output is still the target's greedy one).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import dspark
import dspark.models.linear as linear_module
from dspark.bench.report import environment
from dspark.bench.runner import load_prompts
from dspark.cache import StaticKVCache
from dspark.models import load_model
from dspark.models.compiled import compile_forward
from structured import decode  # (benchmarks/structured.py: one request at a time)

#: variant → (ONEDNN, PACK_WEIGHTS)
VARIANTS = {"packed": (True, True), "plain": (True, False), "blas": (False, False)}


def use(variant: str) -> None:
    linear_module.ONEDNN, linear_module.PACK_WEIGHTS = VARIANTS[variant]


def forward_times(blocks: int) -> None:
    model = load_model("dspark-tiny")
    forward = compile_forward(model, model.device)
    print("| batch | width | packed ms | plain ms | BLAS ms | plain ÷ packed | BLAS ÷ packed |")
    print("|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        for batch in (1, 8):
            cache = StaticKVCache.for_model(model, batch, 512)
            model(torch.randint(2, model.vocab_size, (batch, 150)), cache, kv_len=150)
            prompt_lengths = cache.lengths.clone()
            for width in (1, 2, 4, 8):
                tokens, num_new = torch.randint(2, model.vocab_size, (batch, width)), torch.full((batch,), width)
                times = {name: [] for name in VARIANTS}
                for block in range(blocks + 1):  # block 0 compiles each variant's graph
                    for name in VARIANTS:
                        use(name)
                        for call in range(23):
                            cache.lengths.copy_(prompt_lengths)
                            started = time.perf_counter()
                            forward(tokens, cache, num_new, kv_len=512)
                            if block and call >= 3:
                                times[name].append(time.perf_counter() - started)
                packed, plain, blas = (statistics.median(times[name]) * 1e3 for name in VARIANTS)
                print(f"| {batch} | {width} | {packed:.2f} | {plain:.2f} | {blas:.2f} | {plain / packed:.2f} | "
                      f"{blas / packed:.2f} |")


def decoding_speeds(configs: list[str], num_prompts: int, max_new_tokens: int, repeats: int) -> None:
    print("\n| pipeline | τ | packed tok/s | plain tok/s | BLAS tok/s | packed ÷ plain | packed ÷ BLAS | "
          "same outputs (plain, BLAS) |")
    print("|---|---|---|---|---|---|---|---|")
    for config in configs:
        pipe = dspark.build_pipeline(config, overrides=["target.device=cpu", "target.dtype=float32",
                                                        "engine.compile=true"])
        prompts = load_prompts("code", pipe.tokenizer, num_prompts)
        speeds, outputs, taus = {name: [] for name in VARIANTS}, {}, {}
        for repeat in range(repeats + 1):  # the first pass of each variant compiles
            for name in VARIANTS:
                use(name)
                seconds, outputs[name], taus[name] = decode(pipe, prompts, max_new_tokens, grammar=None)
                if repeat:
                    speeds[name].append(sum(map(len, outputs[name])) / seconds)
        same = [sum(a == b for a, b in zip(outputs["packed"], outputs[name])) for name in ("plain", "blas")]
        median = {name: statistics.median(speeds[name]) for name in VARIANTS}
        cells = " | ".join(f"{median[name]:.0f} [{min(speeds[name]):.0f}..{max(speeds[name]):.0f}]" for name in VARIANTS)
        print(f"| {config} | {taus['packed']:.2f} | {cells} | {median['packed'] / median['plain']:.2f} | "
              f"{median['packed'] / median['blas']:.2f} | {same[0]}/{len(prompts)}, {same[1]}/{len(prompts)} |")
    use("packed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["ar", "draft_model", "eagle3", "dspark"])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--forward-blocks", type=int, default=10)
    args = parser.parse_args()
    if not torch.backends.mkldnn.is_available():
        raise SystemExit("this torch build has no oneDNN (torch.backends.mkldnn.is_available() is False)")
    env = environment()
    print(f"{env['cpu']}, {env['torch_threads']} threads, torch {env['torch']}, float32, embedded dspark-tiny")
    forward_times(args.forward_blocks)
    decoding_speeds(args.configs, args.prompts, args.max_new_tokens, args.repeats)


if __name__ == "__main__":
    main()
