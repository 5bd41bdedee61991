"""CPU projections on oneDNN against torch's BLAS (MKL), side by side in one process.

    python benchmarks/cpu_linear.py [--configs ar draft_model eagle3 dspark] [--prompts 8]
        [--max-new-tokens 128] [--repeats 3] [--forward-repeats 100]

Every native model and drafter layer projects through :func:`dspark.models.linear.linear`, which
takes oneDNN's inner product for CPU float32 inference (``dspark.models.linear.ONEDNN``) and
``F.linear`` (MKL) otherwise. Dynamo guards on that switch, so both variants' compiled graphs live
in one process and the runs alternate (oneDNN, BLAS, oneDNN, …) after a warm-up of each:

* **forward**: ms per compiled forward of the embedded target appending ``width`` tokens per
  request to a cache holding a 150-token prompt (reading 512 positions), batch 1 and 8, widths 1
  (a decode step) and 8 (a verify forward at γ = 7);
* **decoding**: tokens/s of each pipeline (``engine.compile=true``, greedy, batch 1, the shipped
  code prompts, one request per ``generate`` call), the median over ``--repeats`` passes, τ, and
  how many outputs are the same under both (float32 rounding differs between the libraries, so a
  near-tie may resolve differently; each output is still the target's greedy one).
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

VARIANTS = {"onednn": True, "blas": False}


def forward_times(repeats: int) -> None:
    model = load_model("dspark-tiny")
    forward = compile_forward(model, model.device)
    print("| batch | width | oneDNN ms | BLAS ms | BLAS ÷ oneDNN |")
    print("|---|---|---|---|---|")
    with torch.inference_mode():
        for batch in (1, 8):
            cache = StaticKVCache.for_model(model, batch, 512)
            model(torch.randint(2, model.vocab_size, (batch, 150)), cache, kv_len=150)
            prompt_lengths = cache.lengths.clone()
            for width in (1, 8):
                tokens, num_new = torch.randint(2, model.vocab_size, (batch, width)), torch.full((batch,), width)
                times = {name: [] for name in VARIANTS}
                for repeat in range(repeats + 3):  # 3 warm-up passes (the first of each variant compiles)
                    for name, enabled in VARIANTS.items():
                        linear_module.ONEDNN = enabled
                        cache.lengths.copy_(prompt_lengths)
                        started = time.perf_counter()
                        forward(tokens, cache, num_new, kv_len=512)
                        if repeat >= 3:
                            times[name].append(time.perf_counter() - started)
                fast, blas = (statistics.median(times[name]) * 1e3 for name in VARIANTS)
                print(f"| {batch} | {width} | {fast:.2f} | {blas:.2f} | {blas / fast:.2f} |")


def decoding_speeds(configs: list[str], num_prompts: int, max_new_tokens: int, repeats: int) -> None:
    print("\n| pipeline | τ | oneDNN tok/s | BLAS tok/s | oneDNN ÷ BLAS | same outputs |")
    print("|---|---|---|---|---|---|")
    for config in configs:
        pipe = dspark.build_pipeline(config, overrides=["target.device=cpu", "target.dtype=float32",
                                                        "engine.compile=true"])
        prompts = load_prompts("code", pipe.tokenizer, num_prompts)
        speeds, outputs, taus = {name: [] for name in VARIANTS}, {}, {}
        for repeat in range(repeats + 1):  # the first pass of each variant compiles
            for name, enabled in VARIANTS.items():
                linear_module.ONEDNN = enabled
                seconds, outputs[name], taus[name] = decode(pipe, prompts, max_new_tokens, grammar=None)
                if repeat:
                    speeds[name].append(sum(map(len, outputs[name])) / seconds)
        same = sum(a == b for a, b in zip(*outputs.values()))
        fast, blas = (statistics.median(speeds[name]) for name in VARIANTS)
        print(f"| {config} | {taus['onednn']:.2f} | {fast:.0f} [{min(speeds['onednn']):.0f}..{max(speeds['onednn']):.0f}] | "
              f"{blas:.0f} [{min(speeds['blas']):.0f}..{max(speeds['blas']):.0f}] | {fast / blas:.2f} | "
              f"{same}/{len(prompts)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["ar", "draft_model", "eagle3", "dspark"])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--forward-repeats", type=int, default=100)
    args = parser.parse_args()
    if not torch.backends.mkldnn.is_available():
        raise SystemExit("this torch build has no oneDNN (torch.backends.mkldnn.is_available() is False)")
    env = environment()
    print(f"{env['cpu']}, {env['torch_threads']} threads, torch {env['torch']}, float32, embedded dspark-tiny")
    forward_times(args.forward_repeats)
    decoding_speeds(args.configs, args.prompts, args.max_new_tokens, args.repeats)


if __name__ == "__main__":
    main()
