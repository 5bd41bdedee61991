"""Issue 9's sweep table from a `dspark bench --config configs/bench/scheduling.yaml` run.

    python benchmarks/scheduling_summary.py bench_out/scheduling/bench.json

Per cell: tokens/s (median over the repeats) of every pipeline; for the `dspark` schedulers, in
brackets, drafts verified / drafted per request-round; then the default scheduler (`scheduled`)
over verifying every draft (`fixed_g7`), over plain decoding (`none`) and over the better of the two.
A second table gives the scheduler's own cost: the `schedule` phase's share of a round.
"""

from __future__ import annotations

import json
import sys

SCHEDULED = ("scheduled_tokens", "scheduled_nofb", "scheduled")


def main(path: str) -> None:
    rows = json.load(open(path))["rows"]
    cells = sorted({(r["domain"], r["temperature"], r["batch_size"]) for r in rows})
    labels = list(dict.fromkeys(r["family"] for r in rows))
    print("| domain | T | batch | " + " | ".join(labels) + " | ÷ fixed_g7 | ÷ none | ÷ max(none, fixed_g7) |")
    print("|---|---|---|" + "---|" * (len(labels) + 3))
    for cell in cells:
        by = {r["family"]: r for r in rows if (r["domain"], r["temperature"], r["batch_size"]) == cell}
        cols = []
        for label in labels:
            r = by[label]
            extra = f" ({r['verified_per_round']:.2f} / {r['drafted_per_round']:.1f})" if label in SCHEDULED else ""
            cols.append(f"{r['tokens_per_s']:.0f}{extra}")
        rate = {label: by[label]["tokens_per_s"] for label in labels}
        best = max(rate["none"], rate["fixed_g7"])
        print(f"| {cell[0]} | {cell[1]:g} | {cell[2]} | " + " | ".join(cols)
              + f" | {rate['scheduled'] / rate['fixed_g7']:.2f} | {rate['scheduled'] / rate['none']:.2f}"
              f" | {rate['scheduled'] / best:.2f} |")
    print("\n| domain | T | batch | " + " | ".join(f"{s} schedule ms / share of round" for s in SCHEDULED) + " |")
    print("|---|---|---|" + "---|" * len(SCHEDULED))
    phases = ("draft_ms_per_round", "schedule_ms_per_round", "verify_ms_per_round", "other_ms_per_round")
    for cell in cells:
        by = {r["family"]: r for r in rows if (r["domain"], r["temperature"], r["batch_size"]) == cell}
        shares = [f"{by[s]['schedule_ms_per_round']:.2f} / {by[s]['schedule_ms_per_round'] / sum(by[s][k] for k in phases):.1%}"
                  for s in SCHEDULED]
        print(f"| {cell[0]} | {cell[1]:g} | {cell[2]} | " + " | ".join(shares) + " |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench_out/scheduling/bench.json")
