"""Tokens/s with the `dspark` scheduler's choice compiled (``engine.compile``) against the same
pipeline with the choice left eager, alternating runs in one process.

    python benchmarks/scheduler_compile.py [--config eagle3] [--domain code] [--prompts 8]
        [--max-new-tokens 128] [--repeats 5] [--temperature 0] [--batch-size 1] [key=value ...]

Both pipelines compile the target and drafter forwards; only the scheduler differs. Prints the
median tokens/s of each, their ratio, and the schedule column (ms per round, engine.time_phases).
"""

from __future__ import annotations

import argparse
import statistics
import time

import dspark
from dspark.bench.runner import load_prompts
from dspark.scheduling.schedulers import prefix_lengths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="eagle3")
    parser.add_argument("--domain", default="code")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    overrides = ["target.device=cpu", "engine.compile=true", "engine.time_phases=true", "scheduler.name=dspark",
                 *args.overrides]
    pipes = {name: dspark.build_pipeline(args.config, overrides=overrides) for name in ("compiled", "eager")}
    pipes["eager"].engine.scheduler._lengths = prefix_lengths  # undo Scheduler.compile
    prompts = load_prompts(args.domain, pipes["eager"].tokenizer, args.prompts)
    rates, schedule_ms = {k: [] for k in pipes}, {k: [] for k in pipes}
    for repeat in range(args.repeats + 1):  # the first pass warms up (compiles every shape)
        for name, pipe in pipes.items():
            tokens, rounds, schedule = 0, 0, 0.0
            started = time.perf_counter()
            for start in range(0, len(prompts), args.batch_size):
                result = pipe.generate(prompts[start:start + args.batch_size], max_new_tokens=args.max_new_tokens,
                                       temperature=args.temperature, seed=start, ignore_eos=True)
                tokens += result.stats.generated_tokens
                rounds += result.stats.rounds
                schedule += result.stats.schedule_time_s
            if repeat:
                rates[name].append(tokens / (time.perf_counter() - started))
                schedule_ms[name].append(1e3 * schedule / rounds)
    for name in pipes:
        print(f"{name:9s} scheduler: {statistics.median(rates[name]):7.1f} tokens/s "
              f"[{min(rates[name]):.1f}..{max(rates[name]):.1f}], schedule {statistics.median(schedule_ms[name]):.3f} ms/round")
    print(f"compiled ÷ eager: {statistics.median(rates['compiled']) / statistics.median(rates['eager']):.3f}")


if __name__ == "__main__":
    main()
