"""Prefix caching: what skipping the prefill of the prompt a slot already holds saves, per pipeline.

    python benchmarks/prefix_cache.py [--configs ar eagle3] [--questions 6] [--choices 4]
        [--context 256] [--conversations 3] [--turns 4] [--reply 24] [--repeats 3] [--plot PNG]
        [--compare prefix_caching|reuse_outputs]

Two workloads through a session (:class:`dspark.Session`, 4 slots), each request submitted once
the one before has finished — as a client that waits for its answers sends them:

* **scoring** (lm-eval-harness's loglikelihood over the API): ``--questions`` contexts of
  ``--context`` tokens (the shipped code prompts, joined), each followed by ``--choices``
  continuations; a request scores context + continuation (the prompt's log-probabilities and
  likeliest token, one generated token); **scoring, together**: a question's continuations
  submitted at once (lm-eval's ``batch_size``);
* **conversation**: ``--conversations`` chats of ``--turns`` turns; each turn's prompt is the last
  turn's prompt, its reply (``--reply`` greedy tokens) and a new user message.

Each workload runs with ``engine.prefix_caching`` on and off (``--compare reuse_outputs``: the
conversations alone, prefix caching on, with ``engine.reuse_outputs`` on and off — a slot keeps its
last reply, or its last prompt alone), alternating, ``--repeats`` times after a warm-up; prints
the median wall time of each, their ratio, the median time to the first token of the turns after
the first (the admission step: the prefill), and the share of prompt tokens whose prefill was
skipped (``--plot``: the medians as bars). The outputs of both runs are compared token for token
(and the scores to 1e-4); a difference is printed loudly.
"""

from __future__ import annotations

import argparse
import statistics
import time

import dspark
from dspark.bench.runner import load_prompts


def workloads(tokenizer, questions: int, choices: int, context: int, conversations: int) -> dict:
    prompts = load_prompts("code", tokenizer, 64)
    stream = [t for p in prompts for t in p]
    contexts = [stream[i * context:(i + 1) * context] for i in range(questions)]
    endings = [p[:6] for p in prompts[-choices:]]
    scoring = [[c + e for e in endings] for c in contexts]
    openings = [p for p in prompts[questions:questions + conversations]]
    return {"scoring": scoring, "conversation": openings}


def run_scoring(pipe, questions: list[list[list[int]]], together: bool) -> tuple[float, list, tuple[int, int], list]:
    session = pipe.session(max_len=max(len(p) for q in questions for p in q) + 1 + pipe.drafter.gamma + 1)
    started, outputs = time.perf_counter(), []
    for question in questions:
        for group in ([question] if together else [[p] for p in question]):
            ids = [session.submit(p, max_new_tokens=1, prompt_logprobs=True, prompt_top_logprobs=1) for p in group]
            while session.unfinished:
                session.step()
            for request in ids:
                result = session.result(request)
                outputs.append((result.token_ids, result.prompt_logprobs[1:]))
    prefixes = session.batch.prefixes
    return time.perf_counter() - started, outputs, (prefixes.hits, prefixes.queries), []


def run_conversations(pipe, openings: list[list[int]], turns: int, user: list[int],
                      reply: int) -> tuple[float, list, tuple[int, int], list]:
    """(wall time, the replies, prefix-cache hits and queries, the first-token times of later turns)"""
    longest = max(len(o) for o in openings) + turns * (reply + len(user))
    session = pipe.session(max_len=longest + reply + pipe.drafter.gamma + 1)
    started, outputs, first_tokens = time.perf_counter(), [], []
    for opening in openings:
        prompt = list(opening)
        for turn in range(turns):
            request = session.submit(prompt, max_new_tokens=reply, ignore_eos=True)
            admitted = time.perf_counter()
            session.step()  # (the admission: its prefill and first token)
            if turn:
                first_tokens.append(time.perf_counter() - admitted)
            while session.unfinished:
                session.step()
            ids = session.result(request).token_ids
            outputs.append(ids)
            prompt = prompt + ids + user
    prefixes = session.batch.prefixes
    return time.perf_counter() - started, outputs, (prefixes.hits, prefixes.queries), first_tokens


def same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return abs(a - b) <= 1e-4
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=["ar", "eagle3"])
    parser.add_argument("--questions", type=int, default=6)
    parser.add_argument("--choices", type=int, default=4)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--conversations", type=int, default=3)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--reply", type=int, default=24, help="tokens of each conversation turn's reply")
    parser.add_argument("--compare", choices=["prefix_caching", "reuse_outputs"], default="prefix_caching",
                        help="the engine setting turned on and off")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--plot", help="draw the medians, on against off, to this PNG")
    args = parser.parse_args()
    rows = []
    for config in args.configs:
        pipes = {on: dspark.build_pipeline(config, overrides=["target.device=cpu", "engine.max_batch_size=4",
                                                              f"engine.{args.compare}={str(on).lower()}"])
                 for on in (True, False)}
        data = workloads(pipes[True].tokenizer, args.questions, args.choices, args.context, args.conversations)
        user = pipes[True].encode(["\n# next: "])[0]
        jobs = {"scoring": lambda pipe: run_scoring(pipe, data["scoring"], together=False),
                "scoring, together": lambda pipe: run_scoring(pipe, data["scoring"], together=True),
                "conversation": lambda pipe: run_conversations(pipe, data["conversation"], args.turns, user, args.reply)}
        if args.compare == "reuse_outputs":
            jobs = {"conversation": jobs["conversation"]}
        for name, job in jobs.items():
            for on in (True, False):  # warm-up
                job(pipes[on])
            times, outputs, reuse, firsts = {True: [], False: []}, {}, {}, {True: [], False: []}
            for _ in range(args.repeats):
                for on in (True, False):
                    seconds, outputs[on], reuse[on], first_tokens = job(pipes[on])
                    times[on].append(seconds)
                    firsts[on] += first_tokens
            median = {on: statistics.median(t) for on, t in times.items()}
            hits, queries = reuse[True]
            ttft = "" if not firsts[True] else (
                f"  later turns' first token on {statistics.median(firsts[True]) * 1e3:.1f} ms"
                f" off {statistics.median(firsts[False]) * 1e3:.1f} ms")
            print(f"{config:8s} {name:17s} {args.compare} on {median[True]:6.2f} s [{min(times[True]):.2f}..{max(times[True]):.2f}]"
                  f"  off {median[False]:6.2f} s [{min(times[False]):.2f}..{max(times[False]):.2f}]"
                  f"  off/on {median[False] / median[True]:.2f}x{ttft}  prefill skipped {hits}/{queries} prompt tokens"
                  f" ({hits / queries:.0%}; off: {reuse[False][0] / reuse[False][1]:.0%})", flush=True)
            rows.append((f"{config}\n{name}", median[True], median[False]))
            if not same(outputs[True], outputs[False]):
                print(f"!!! {config} {name}: outputs with {args.compare} differ from those without", flush=True)

    if args.plot:
        plot(rows, args.plot, args.compare)


def plot(rows: list[tuple[str, float, float]], path: str, compare: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 1, 3.6))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [on for _, on, _ in rows], 0.4, label=f"{compare} on")
    ax.bar([i + 0.2 for i in x], [off for _, _, off in rows], 0.4, label="off")
    for i, (_, on, off) in enumerate(rows):
        ax.annotate(f"{off / on:.2f}x", (i, max(on, off)), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), [label for label, _, _ in rows], fontsize=7)
    ax.set_ylabel("seconds (median)")
    ax.set_title(f"{compare}: time of each workload, on against off")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
