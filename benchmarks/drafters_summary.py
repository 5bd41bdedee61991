"""Issue 7/8's goal table from a `dspark bench --config configs/bench/drafters.yaml` run.

    python benchmarks/drafters_summary.py bench_out/drafters/bench.json

Prints, per domain and temperature (batch 1): τ and tokens/s speedup over `none` of each drafter,
DSpark's τ over DFlash's, and DSpark's drafting time per round over DFlash's.
"""

from __future__ import annotations

import json
import sys


def main(path: str) -> None:
    rows = [r for r in json.load(open(path))["rows"] if r["kind"] == "dspark" and r["batch_size"] == 1]
    cells = sorted({(r["domain"], r["temperature"]) for r in rows})
    labels = [r["family"] for r in rows if (r["domain"], r["temperature"]) == cells[0]]
    print("| domain | T | " + " | ".join(f"{label} τ / speedup" for label in labels)
          + " | τ dspark ÷ dflash | draft ms dspark ÷ dflash |")
    print("|---|---|" + "---|" * (len(labels) + 2))
    for domain, temperature in cells:
        by = {r["family"]: r for r in rows if (r["domain"], r["temperature"]) == (domain, temperature)}
        cols = [f"{by[f]['tau']:.2f} / {by[f]['speedup_vs_none']:.2f}x" for f in labels]
        tau_ratio = by["dspark"]["tau"] / by["dflash"]["tau"] if "dflash" in by and "dspark" in by else float("nan")
        draft_ratio = (by["dspark"]["draft_ms_per_round"] / by["dflash"]["draft_ms_per_round"]
                       if "dflash" in by and "dspark" in by else float("nan"))
        print(f"| {domain} | {temperature:g} | " + " | ".join(cols) + f" | {tau_ratio:.3f} | {draft_ratio:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench_out/drafters/bench.json")
