"""Requests with different sampling settings in one batch, against one call per group of settings.

    python benchmarks/per_request_settings.py [--configs ar eagle3] [--batch 8] [--max-new-tokens 64] [--repeats 5]

The first ``--batch`` code prompts of the eval set, in four groups of settings (greedy; T = 0.7
with top-p 0.9; T = 0.9; T = 1 with top-k 40), decoded three ways, alternating, ``--repeats``
times after a warm-up: **mixed** — one ``generate`` call, the settings as per-request lists;
**grouped** — one call per group (what a caller without per-request settings does); **shared** —
one call with every request at T = 0.8, top-p 0.95 (the cost of a batch that agrees, for
reference). Mixed and grouped decode the same tokens (a request decodes as alone), so their
tokens/s compare like for like. Prints medians [min..max] and the ratios of the medians.
"""

from __future__ import annotations

import argparse
import statistics
import time

import dspark
from dspark.bench.runner import load_prompts

GROUPS = [dict(temperature=0.0), dict(temperature=0.7, top_p=0.9), dict(temperature=0.9), dict(temperature=1.0, top_k=40)]
DEFAULTS = dict(temperature=0.0, top_k=0, top_p=1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["ar", "eagle3"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="engine.compile=true")
    args = parser.parse_args()

    for name in args.configs:
        pipe = dspark.build_pipeline(f"configs/{name}.yaml", overrides=[
            "target.device=cpu", "target.dtype=float32", f"engine.compile={str(args.compile).lower()}"])
        prompts = load_prompts("code", pipe.tokenizer, args.batch)
        group_of = [i % len(GROUPS) for i in range(len(prompts))]
        lists = {key: [GROUPS[g].get(key, default) for g in group_of] for key, default in DEFAULTS.items()}
        settings = dict(max_new_tokens=args.max_new_tokens, ignore_eos=True)

        def mixed():
            return pipe.generate(prompts, seed=list(range(len(prompts))), **lists, **settings).token_ids

        def grouped():
            out = [None] * len(prompts)
            for g, group in enumerate(GROUPS):
                rows = [i for i in range(len(prompts)) if group_of[i] == g]
                ids = pipe.generate([prompts[i] for i in rows], seed=rows, **group, **settings).token_ids
                for i, row in zip(rows, ids):
                    out[i] = row
            return out

        def shared():
            return pipe.generate(prompts, seed=0, temperature=0.8, top_p=0.95, **settings).token_ids

        variants = {"mixed": mixed, "grouped": grouped, "shared": shared}
        outputs = {key: fn() for key, fn in variants.items()}  # warm-up (and compilation)
        assert outputs["mixed"] == outputs["grouped"], "a request decoded differently in a mixed batch"
        rates = {key: [] for key in variants}
        for _ in range(args.repeats):
            for key, fn in variants.items():
                start = time.perf_counter()
                ids = fn()
                rates[key].append(sum(map(len, ids)) / (time.perf_counter() - start))
        medians = {key: statistics.median(r) for key, r in rates.items()}
        cells = ", ".join(f"{key} {medians[key]:.0f} [{min(r):.0f}..{max(r):.0f}]" for key, r in rates.items())
        print(f"{name}: tokens/s {cells}; mixed / grouped {medians['mixed'] / medians['grouped']:.2f}x, "
              f"mixed / shared {medians['mixed'] / medians['shared']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
