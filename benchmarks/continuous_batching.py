"""Continuous batching against static batches: more requests than slots, of different lengths.

    python benchmarks/continuous_batching.py [--configs ar eagle3] [--prompts 32] [--batch 8]
        [--budgets 16 32 64 128] [--temperature 0] [--repeats 3] [--compile] [--plot PNG]

The first ``--prompts`` code prompts of the eval set, request ``i`` with budget
``budgets[i % len(budgets)]`` (EOS ignored, so the lengths are what the budgets say), decoded
through ``--batch`` slots by two pipelines of the same config, alternating, ``--repeats`` times
after a warm-up: ``engine.batching=continuous`` (a request that ends hands its slot to the next
one between two rounds) and ``engine.batching=static`` (batches one after the other, each until
its longest request ends). Both decode the same tokens (each request decodes as alone; the script
asserts it). Prints tokens/s medians [min..max], rounds and the ratio of the medians.
"""

from __future__ import annotations

import argparse
import statistics
import time

import dspark
from dspark.bench.runner import load_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["ar", "eagle3"])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--budgets", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="engine.compile=true")
    parser.add_argument("--plot", help="draw each request's wait and decoding, both ways, for the first config "
                                       "(a PNG path, e.g. docs/images/continuous_batching_timeline.png)")
    args = parser.parse_args()

    for name in args.configs:
        pipes = {batching: dspark.build_pipeline(f"configs/{name}.yaml", overrides=[
            "target.device=cpu", "target.dtype=float32", f"engine.compile={str(args.compile).lower()}",
            f"engine.max_batch_size={args.batch}", f"engine.batching={batching}"]) for batching in ("continuous", "static")}
        prompts = load_prompts("code", pipes["static"].tokenizer, args.prompts)
        budgets = [args.budgets[i % len(args.budgets)] for i in range(len(prompts))]
        settings = dict(max_new_tokens=budgets, temperature=args.temperature, seed=list(range(len(prompts))),
                        ignore_eos=True)
        outputs = {key: pipe.generate(prompts, **settings) for key, pipe in pipes.items()}  # warm-up (and compiling)
        assert outputs["continuous"].token_ids == outputs["static"].token_ids, "a request decoded differently"
        rates, last = {key: [] for key in pipes}, {}
        for _ in range(args.repeats):
            for key, pipe in pipes.items():
                start = time.perf_counter()
                last[key] = pipe.generate(prompts, **settings)
                rates[key].append(last[key].stats.generated_tokens / (time.perf_counter() - start))
        if args.plot and name == args.configs[0]:
            draw_timeline(last, budgets, args, name)
        medians = {key: statistics.median(r) for key, r in rates.items()}
        cells = ", ".join(f"{key} {medians[key]:.0f} [{min(r):.0f}..{max(r):.0f}] tokens/s "
                          f"({outputs[key].stats.rounds} rounds, τ {outputs[key].stats.mean_accepted_length:.2f})"
                          for key, r in rates.items())
        print(f"{name}: {cells}; continuous / static {medians['continuous'] / medians['static']:.2f}x", flush=True)


def draw_timeline(results: dict, budgets: list[int], args, name: str) -> None:
    """One row per request: waiting for a slot (light), then decoding from its first token to its
    end (dark, shaded by budget), the static batches above the continuous batch, on one time axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    shades = {budget: plt.cm.viridis(k / max(1, len(args.budgets) - 1)) for k, budget in enumerate(sorted(set(budgets)))}
    for ax, key in zip(axes, ("static", "continuous")):
        stats = results[key].stats
        for i, (row, budget) in enumerate(zip(stats.per_request, budgets)):
            ax.barh(i, row["first_token_s"], color="0.88")
            ax.barh(i, row["finished_s"] - row["first_token_s"], left=row["first_token_s"], color=shades[budget])
        ax.invert_yaxis()
        ax.set_ylabel("request")
        ax.set_title(f"{key}: {stats.generated_tokens / stats.wall_time_s:.0f} tokens/s, {stats.rounds} rounds")
    axes[-1].set_xlabel("seconds since the call began")
    handles = [plt.Rectangle((0, 0), 1, 1, color="0.88")] + [plt.Rectangle((0, 0), 1, 1, color=c) for c in shades.values()]
    fig.legend(handles, ["waiting for a slot"] + [f"decoding, {b} tokens" for b in shades], loc="lower center", ncol=3, fontsize="small",
               frameon=False)
    fig.suptitle(f"{name}: {len(budgets)} requests through {args.batch} slots (T = {args.temperature:g})")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(args.plot, dpi=110)
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
