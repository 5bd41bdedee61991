"""Chunked prefill (``engine.prefill_chunk``) against a whole prefill: how long the requests that
decode stall while a long prompt goes in, and what it costs the long one.

    python benchmarks/chunked_prefill.py [--configs ar eagle3] [--decoders 4] [--long 1536]
        [--chunks 0 256 128] [--tokens 48] [--repeats 3] [--plot PNG]

A session of ``--decoders`` + 1 slots decodes ``--decoders`` code prompts (``--tokens`` greedy
tokens each, EOS ignored); once each has emitted 4 times, a long prompt (code prompts joined, cut
to ``--long`` tokens) arrives, asking for 8 tokens. For each chunk size (0: the whole prompt in one
prefill), in alternation, ``--repeats`` times after a warm-up: the longest gap between two
emissions of a decoding request (its stall), the median gap, the long request's time to its first
token, and the time to finish everything — medians over the repeats. The outputs of every chunk
size are compared token for token; a difference is printed loudly. ``--plot``: the decoding
requests' tokens over time in one run of each chunk size, with the long prompt's arrival and first
token marked.
"""

from __future__ import annotations

import argparse
import statistics
import time

import dspark
from dspark.bench.runner import load_prompts

LONG_TOKENS = 8  # what the long request asks for
ARRIVAL_EMISSIONS = 4  # steps in which each decoding request has emitted when the long prompt arrives


def run(pipe, decoders: list[list[int]], long_prompt: list[int], tokens: int) -> dict:
    """One pass: the step times, who emitted at each, and every output."""
    session = pipe.session(max_len=len(long_prompt) + max(tokens, LONG_TOKENS) + pipe.drafter.gamma + 1)
    started = time.perf_counter()
    ids = [session.submit(p, max_new_tokens=tokens, ignore_eos=True) for p in decoders]
    emissions = {i: [] for i in ids}  # request → the times it emitted
    long_id = arrived = None
    while session.unfinished or long_id is None:
        if long_id is None and all(len(emissions[i]) >= ARRIVAL_EMISSIONS for i in ids):
            long_id, arrived = session.submit(long_prompt, max_new_tokens=LONG_TOKENS, ignore_eos=True), time.perf_counter()
            emissions[long_id] = []
        updates = session.step()
        now = time.perf_counter()
        for update in updates:
            if update.token_ids:
                emissions[update.request].append(now)
    gaps = [b - a for i in ids for a, b in zip(emissions[i], emissions[i][1:])]
    return dict(stall=max(gaps), median_gap=statistics.median(gaps), ttft=emissions[long_id][0] - arrived,
                total=time.perf_counter() - started, outputs=[session.result(i).token_ids for i in [*ids, long_id]],
                timeline=[(t - started, sum(1 for i in ids for e in emissions[i] if e <= t))
                          for t in sorted({e for i in ids for e in emissions[i]})],
                arrived=arrived - started, first=emissions[long_id][0] - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["ar", "eagle3"])
    parser.add_argument("--decoders", type=int, default=4)
    parser.add_argument("--long", type=int, default=1536, help="the long prompt's tokens")
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 256, 128], help="prefill chunks (0: whole)")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--plot", help="draw the decoding requests' tokens over time to this PNG")
    args = parser.parse_args()
    results = {}
    for config in args.configs:
        pipes = {chunk: dspark.build_pipeline(config, overrides=[
            "target.device=cpu", f"engine.max_batch_size={args.decoders + 1}", f"engine.prefill_chunk={chunk}"])
            for chunk in args.chunks}
        tokenizer = pipes[args.chunks[0]].tokenizer
        prompts = load_prompts("code", tokenizer, 64)
        decoders = prompts[:args.decoders]
        long_prompt = [t for p in prompts[args.decoders:] for t in p][:args.long]
        if len(long_prompt) < args.long:
            parser.error(f"the code prompts hold {len(long_prompt)} tokens, fewer than --long {args.long}")
        runs = {chunk: [] for chunk in args.chunks}
        for repeat in range(args.repeats + 1):
            order = args.chunks if repeat % 2 == 0 else args.chunks[::-1]
            for chunk in order:
                result = run(pipes[chunk], decoders, long_prompt, args.tokens)
                if repeat:  # (the first pass warms up)
                    runs[chunk].append(result)
        reference = runs[args.chunks[0]][0]["outputs"]
        for chunk in args.chunks:
            if any(r["outputs"] != reference for r in runs[chunk]):
                print(f"!!! {config}: prefill_chunk={chunk} gave other tokens than prefill_chunk={args.chunks[0]}")
        print(f"{config}: {args.decoders} requests decoding {args.tokens} tokens, a {args.long}-token prompt arriving "
              f"(medians of {args.repeats})")
        print("| chunk | longest stall | median gap | long prompt's first token | all done |")
        print("|---|---|---|---|---|")
        for chunk in args.chunks:
            median = lambda key: statistics.median(r[key] for r in runs[chunk])  # noqa: E731
            print(f"| {chunk or 'whole'} | {1000 * median('stall'):.1f} ms | {1000 * median('median_gap'):.1f} ms | "
                  f"{1000 * median('ttft'):.1f} ms | {median('total'):.2f} s |")
        results[config] = runs
    if args.plot:
        plot(results, args.chunks, args.plot)


def plot(results: dict, chunks: list[int], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 3.8), squeeze=False)
    for ax, (config, runs) in zip(axes[0], results.items()):
        for chunk in chunks:
            run = runs[chunk][0]
            times, counts = zip(*run["timeline"])
            line, = ax.step([1000 * t for t in times], counts, where="post",
                            label=f"chunk {chunk}" if chunk else "whole prefill")
            ax.axvline(1000 * run["first"], color=line.get_color(), linestyle=":", linewidth=1)
        ax.axvline(1000 * runs[chunks[0]][0]["arrived"], color="grey", linewidth=1, label="the long prompt arrives")
        ax.plot([], [], color="black", linestyle=":", linewidth=1, label="its first token")
        ax.set_title(f"{config}: tokens of the decoding requests")
        ax.set_xlabel("ms since the first submission")
        ax.set_ylabel("tokens emitted")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
