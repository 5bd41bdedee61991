"""dspark autoregressive decoding vs transformers' generate on the same random Qwen3, same process.

    python benchmarks/ar_vs_hf.py [--repeats 7] [--prompt-len 256] [--new-tokens 128] [--threads N] [--compile]

Runs alternate (dspark, [dspark+compile,] hf, dspark, ...) after one warm-up each; medians and the
spread (min..max) are printed with the ratio of medians. Greedy outputs are checked token for token.
``--compile`` adds dspark with ``engine.compile=true`` (the warm-up pays the compilation).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

import dspark
from dspark.models import random_hf_model

QWEN3_6M = dict(model_type="qwen3", vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
                tie_word_embeddings=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="also run dspark with engine.compile=true")
    parser.add_argument("--json", help="write the measurements here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    hf = random_hf_model(QWEN3_6M, seed=0)
    params = sum(p.numel() for p in hf.parameters())
    overrides = ["target.device=cpu", "target.tokenizer=null", f"cache.max_len={args.prompt_len + args.new_tokens + 1}"]
    pipes = {"dspark": dspark.build_pipeline("ar", target_model=hf, overrides=overrides)}
    if args.compile:
        pipes["dspark+compile"] = dspark.build_pipeline("ar", target_model=hf, overrides=overrides + ["engine.compile=true"])
    prompts = torch.randint(0, QWEN3_6M["vocab_size"], (args.batch, args.prompt_len), generator=torch.Generator().manual_seed(1))

    def runner(pipe):
        def run():
            start = time.perf_counter()
            out = pipe.generate(prompts.tolist(), max_new_tokens=args.new_tokens, ignore_eos=True)
            return time.perf_counter() - start, out.token_ids
        return run

    def run_hf():
        start = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=args.new_tokens,
                              min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
        return time.perf_counter() - start, out[:, args.prompt_len:].tolist()

    variants = {name: runner(pipe) for name, pipe in pipes.items()} | {"hf": run_hf}
    for fn in variants.values():  # warm-up (and compilation)
        fn()
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        outputs = {}
        for name, fn in variants.items():
            seconds, outputs[name] = fn()
            times[name].append(seconds)
        for name, ids in outputs.items():
            if ids != outputs["hf"]:
                raise SystemExit(f"greedy outputs differ between {name} and transformers")
    tokens = args.batch * args.new_tokens
    report = {
        "model_params": params, "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
    }
    for name, values in times.items():
        report[name] = {"median_s": statistics.median(values), "min_s": min(values), "max_s": max(values),
                        "tokens_per_s": tokens / statistics.median(values)}
    report["speedup"] = {name: report["hf"]["median_s"] / report[name]["median_s"] for name in pipes}
    print(f"Qwen3 {params / 1e6:.1f}M params, batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"{report['threads']} threads, {args.repeats} alternating repeats")
    for name in times:
        r = report[name]
        print(f"  {name:15s} {r['tokens_per_s']:8.1f} tok/s  median {r['median_s']:.3f}s  [{r['min_s']:.3f}..{r['max_s']:.3f}]")
    for name, ratio in report["speedup"].items():
        print(f"  {name} / transformers tokens/s: {ratio:.2f}x (greedy outputs identical)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
