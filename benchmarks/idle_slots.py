"""Rounds over the occupied slots alone (``engine.trim_idle_slots``) against rounds over every slot.

    python benchmarks/idle_slots.py [--configs ar eagle3] [--slots 64] [--requests 1 4 16 64]
        [--tokens 32] [--repeats 3] [--compile] [--plot PNG]

A session of ``--slots`` slots (a server's ``engine.max_batch_size``) decodes ``k`` requests
submitted at once (code prompts, ``--tokens`` greedy tokens each, EOS ignored), for each ``k`` of
``--requests``: with trimmed rounds, a round runs over the first slots up to the last busy one;
without, over all of them. Both run alternately, ``--repeats`` times after a warm-up; prints the
median tokens/s of each and their ratio (``--plot``: tokens/s against ``k``). The outputs of both
are compared token for token; a difference is printed loudly.
"""

from __future__ import annotations

import argparse
import statistics
import time

import dspark
from dspark.bench.runner import load_prompts


def run(pipe, prompts: list[list[int]], tokens: int) -> tuple[float, list]:
    session = pipe.session(max_len=max(len(p) for p in prompts) + tokens + pipe.drafter.gamma + 1)
    started = time.perf_counter()
    ids = [session.submit(p, max_new_tokens=tokens, ignore_eos=True) for p in prompts]
    while session.unfinished:
        session.step()
    elapsed = time.perf_counter() - started
    outputs = [session.result(i).token_ids for i in ids]
    return sum(len(o) for o in outputs) / elapsed, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["ar", "eagle3"])
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--requests", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="engine.compile=true (the first runs compile)")
    parser.add_argument("--plot", help="draw tokens/s against the number of requests to this PNG")
    args = parser.parse_args()
    if max(args.requests) > args.slots:
        parser.error(f"--requests {max(args.requests)} is more than --slots {args.slots}")
    rows = []
    for config in args.configs:
        pipes = {trim: dspark.build_pipeline(config, overrides=[
            "target.device=cpu", f"engine.max_batch_size={args.slots}", f"engine.trim_idle_slots={str(trim).lower()}",
            f"engine.compile={str(args.compile).lower()}"]) for trim in (True, False)}
        prompts = load_prompts("code", pipes[True].tokenizer, max(args.requests))
        for k in args.requests:
            speeds, outputs = {True: [], False: []}, {}
            for repeat in range(args.repeats + 1):
                for trim in ((True, False) if repeat % 2 == 0 else (False, True)):
                    speed, outputs[trim] = run(pipes[trim], prompts[:k], args.tokens)
                    if repeat:  # (the first pass warms up)
                        speeds[trim].append(speed)
            if outputs[True] != outputs[False]:
                print(f"!!! {config}, {k} requests: trimmed and full rounds decoded different tokens")
            on, off = (statistics.median(speeds[t]) for t in (True, False))
            rows.append((config, k, on, off))
            print(f"{config:8s} {k:3d} requests in {args.slots} slots: trimmed {on:7.1f} tok/s, all slots "
                  f"{off:7.1f} tok/s, {on / off:.2f}x", flush=True)
    print("\n| pipeline | requests | trimmed tokens/s | all slots tokens/s | trimmed ÷ all |\n|---|---|---|---|---|")
    for config, k, on, off in rows:
        print(f"| `{config}` | {k} | {on:.0f} | {off:.0f} | **{on / off:.2f}×** |")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 4))
        for config in args.configs:
            mine = [r for r in rows if r[0] == config]
            line, = ax.plot([r[1] for r in mine], [r[2] for r in mine], marker="o", label=f"{config}, trimmed rounds")
            ax.plot([r[1] for r in mine], [r[3] for r in mine], marker="s", linestyle="--", color=line.get_color(),
                    label=f"{config}, rounds over all {args.slots} slots")
        ax.set_xscale("log", base=2)
        ax.set_xticks(args.requests, [str(k) for k in args.requests])
        ax.set_xlabel(f"requests decoding together (in a session of {args.slots} slots)")
        ax.set_ylabel("tokens / s")
        ax.set_title("rounds over the occupied slots alone, against all slots")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
