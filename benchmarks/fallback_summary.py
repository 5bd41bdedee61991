"""Issue 9's "never slower than plain decoding" table from a `dspark bench --config configs/bench/fallback.yaml` run.

    python benchmarks/fallback_summary.py bench_out/fallback/bench.json

Per cell: tokens/s of plain decoding (`none`) and of the default scheduler (`scheduled`) with their
ranges, drafts per request-round, the median ratio, and the steadier *phase split*: the
scheduler's extra draft + schedule + other milliseconds per round over plain decoding's, and the
ratio that extra alone would give (plain round ÷ (plain round + extra)). The verify phase is
left out of the split: both run the same target step in skipped rounds, and its run-to-run
scatter (±5%) would drown a 1% difference.
"""

from __future__ import annotations

import json
import sys

OVERHEAD = ("draft_ms_per_round", "schedule_ms_per_round", "other_ms_per_round")


def main(path: str) -> None:
    rows = json.load(open(path))["rows"]
    cells = sorted({(r["domain"], r["temperature"], r["batch_size"]) for r in rows})
    print("| domain | T | batch | none [min..max] | scheduled [min..max] | drafted per request-round "
          "| ÷ none (medians) | extra ms per round | ÷ none by the phase split |")
    print("|---|---|---|---|---|---|---|---|---|")
    for cell in cells:
        by = {r["family"]: r for r in rows if (r["domain"], r["temperature"], r["batch_size"]) == cell}
        plain, scheduled = by["none"], by["scheduled"]
        extra = sum(scheduled[k] for k in OVERHEAD) - sum(plain[k] for k in OVERHEAD)
        plain_round = sum(plain[k] for k in OVERHEAD) + plain["verify_ms_per_round"]
        span = lambda r: f"{r['tokens_per_s']:.0f} [{r['tokens_per_s_min']:.0f}..{r['tokens_per_s_max']:.0f}]"  # noqa: E731
        print(f"| {cell[0]} | {cell[1]:g} | {cell[2]} | {span(plain)} | {span(scheduled)} "
              f"| {scheduled['drafted_per_round']:.2f} | {scheduled['tokens_per_s'] / plain['tokens_per_s']:.2f} "
              f"| {extra:.2f} | {plain_round / (plain_round + extra):.3f} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench_out/fallback/bench.json")
