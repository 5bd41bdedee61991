"""How much of a decoding round the verification and commit ops take on this machine (the torch
twins on CPU, the Triton kernels on CUDA), with the shipped DSpark drafter and the embedded target.

    python benchmarks/kernel_share.py [--config configs/dspark.yaml] [--prompts 8] [--new-tokens 96] [key=value ...]

Every call of a ``dspark.kernels`` op is timed (host clock; on CUDA with a synchronisation around
it, which slows the run but not the op) and summed; the share is that sum over the decoding time
(wall minus prefill). Reported per batch size (1, 8) and temperature (0, 1) on the code prompts.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import dspark
from dspark.bench.runner import load_prompts
from dspark.kernels import dispatch


class OpClock:
    """Wraps the dispatcher so that every op call adds its seconds to ``seconds[op]``."""

    def __init__(self, device):
        self.seconds: dict[str, float] = {}
        self.sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
        self.original = dispatch.implementation

    def __enter__(self):
        def timed_implementation(op, device):
            fn = self.original(op, device)

            def timed(*args):
                self.sync()
                start = time.perf_counter()
                out = fn(*args)
                self.sync()
                self.seconds[op] = self.seconds.get(op, 0.0) + time.perf_counter() - start
                return out
            return timed

        import dspark.kernels as ops
        self._ops = ops
        ops.implementation = timed_implementation
        return self

    def __exit__(self, *exc):
        self._ops.implementation = self.original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/dspark.yaml")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. engine.compile=true")
    args = parser.parse_args()
    pipe = dspark.build_pipeline(args.config, overrides=args.overrides)
    prompts = load_prompts("code", pipe.tokenizer, args.prompts)
    rows = []
    for batch in (1, 8):
        for temperature in (0.0, 1.0):
            pipe.generate(prompts[:batch], max_new_tokens=8, temperature=temperature, seed=0)  # warm-up
            seconds, decoding, rounds = {}, 0.0, 0
            for start in range(0, len(prompts), batch):
                with OpClock(pipe.engine.device) as clock:
                    stats = pipe.generate(prompts[start:start + batch], max_new_tokens=args.new_tokens,
                                          temperature=temperature, seed=start, ignore_eos=True).stats
                for op, s in clock.seconds.items():
                    seconds[op] = seconds.get(op, 0.0) + s
                decoding += stats.wall_time_s - stats.prefill_time_s
                rounds += stats.rounds
            ops_total = sum(seconds.values())
            row = {"batch": batch, "temperature": temperature, "rounds": rounds,
                   "ms_per_round": 1000 * decoding / rounds, "ops_ms_per_round": 1000 * ops_total / rounds,
                   "share": ops_total / decoding, "per_op_ms_per_round": {op: 1000 * s / rounds for op, s in seconds.items()},
                   "backend": dispatch.backend_for(pipe.engine.device)}
            rows.append(row)
            per_op = ", ".join(f"{op} {ms:.3f}" for op, ms in row["per_op_ms_per_round"].items())
            print(f"batch {batch} T={temperature:g}: round {row['ms_per_round']:.2f} ms, ops {row['ops_ms_per_round']:.3f} ms "
                  f"= {100 * row['share']:.1f}% ({per_op}; {row['backend']})", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": {"threads": torch.get_num_threads(), "torch": torch.__version__}, "rows": rows}, f,
                      indent=2)


if __name__ == "__main__":
    main()
