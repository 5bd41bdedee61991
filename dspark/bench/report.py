"""Bench output: one JSON with every number and the environment, a Markdown table, PNG plots."""

from __future__ import annotations

import datetime
import json
import os
import platform
from dataclasses import asdict
from pathlib import Path

import torch

from dspark.bench.runner import CellResult, greedy_pairs, median
from dspark.records import SamplingParams
from dspark.stats import METRICS, GenerationStats, metrics_markdown

# which transformers peer a dspark pipeline family is compared with
PEER_OF = {"none": "hf_plain", "draft_model": "hf_assisted", "ngram": "hf_prompt_lookup", "early_exit": "hf_early_exit"}


def environment() -> dict:
    """CPU, threads and versions of this run."""
    import transformers

    import dspark

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "cpu": cpu,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "dspark": dspark.__version__}


def summarize(results: list[CellResult]) -> list[dict]:
    """One row per (cell, variant) with every metric; speedups are ratios of medians in the same cell."""
    rows = []
    for r in results:
        tps = median(r.tokens_per_s)
        row = dict(domain=r.domain, temperature=r.temperature, batch_size=r.batch_size, variant=r.variant,
                   kind=r.kind, family=r.family, gamma=r.gamma, tokens_per_s=tps,
                   tokens_per_s_min=min(r.tokens_per_s), tokens_per_s_max=max(r.tokens_per_s), repeats=len(r.tokens_per_s))
        if r.stats:
            s = GenerationStats.merge(r.stats)
            timed = r.phase_stats or s  # the pass whose rounds were split into phases
            timed_rounds = max(timed.rounds, 1)
            row |= dict(tau=s.mean_accepted_length, predicted_tau=s.predicted_tau,
                        acceptance_by_position=s.acceptance_by_position,
                        drafted_per_round=s.drafted_tokens / max(s.target_forwards, 1),
                        verified_per_round=s.verified_tokens / max(s.target_forwards, 1),
                        accepted_per_round=s.accepted_tokens / max(s.target_forwards, 1),
                        draft_ms_per_round=1e3 * timed.draft_time_s / timed_rounds,
                        schedule_ms_per_round=1e3 * timed.schedule_time_s / timed_rounds,
                        verify_ms_per_round=1e3 * timed.verify_time_s / timed_rounds,
                        other_ms_per_round=1e3 * timed.other_time_s / timed_rounds,
                        phases_timed_apart=r.phase_stats is not None, prefill_s=s.prefill_time_s / len(r.stats))
        rows.append(row)
    for row in rows:
        same_cell = [x for x in rows if (x["domain"], x["temperature"], x["batch_size"]) ==
                     (row["domain"], row["temperature"], row["batch_size"])]
        base = next((x for x in same_cell if x["family"] == "none"), None)
        row["speedup_vs_none"] = row["tokens_per_s"] / base["tokens_per_s"] if base else None
        peer_family = PEER_OF.get(row["family"]) if row["kind"] == "dspark" else None
        peer = next((x for x in same_cell if x["family"] == peer_family and x["gamma"] == row["gamma"]), None)
        row["peer"] = peer["variant"] if peer else None
        row["ratio_vs_peer"] = row["tokens_per_s"] / peer["tokens_per_s"] if peer else None
    return rows


def markdown_table(rows: list[dict]) -> str:
    """The rows as a Markdown table (one line per cell and variant)."""
    head = ("| domain | T | batch | variant | tok/s (median [min..max]) | τ | acceptance by position | "
            "speedup vs none | vs transformers peer | draft / schedule / verify / other ms per round |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        acc = r.get("acceptance_by_position") or []
        acc_text = " ".join("-" if a is None else f"{a:.2f}" for a in acc) or "-"
        split = (f"{r['draft_ms_per_round']:.2f} / {r['schedule_ms_per_round']:.2f} / {r['verify_ms_per_round']:.2f}"
                 f" / {r['other_ms_per_round']:.2f}"
                 if "draft_ms_per_round" in r else "-")
        peer = f"{r['ratio_vs_peer']:.2f}x ({r['peer']})" if r.get("ratio_vs_peer") else "-"
        speed = f"{r['speedup_vs_none']:.2f}x" if r.get("speedup_vs_none") else "-"
        tau = f"{r['tau']:.2f}" if "tau" in r else "-"
        lines.append(f"| {r['domain']} | {r['temperature']:g} | {r['batch_size']} | {r['variant']} | "
                     f"{r['tokens_per_s']:.1f} [{r['tokens_per_s_min']:.1f}..{r['tokens_per_s_max']:.1f}] | {tau} | "
                     f"{acc_text} | {speed} | {peer} | {split} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], output_dir: Path) -> list[Path]:
    """``acceptance_by_position.png`` (per drafter and domain), ``speedup_by_batch.png``, and with
    several batch sizes the serving picture: ``throughput_frontier.png`` (aggregate against
    per-request tokens/s, one point per batch size) and ``verification_budget.png`` (drafts
    verified per request-round against batch size)."""
    domains = sorted({r["domain"] for r in rows})
    smallest_batch = min(r["batch_size"] for r in rows)
    longest = max((len(r.get("acceptance_by_position") or []) for r in rows), default=1)
    sizes = sorted({r["batch_size"] for r in rows})
    variants = sorted({r["variant"] for r in rows})
    # one colour per variant in every figure (line style: solid T = 0, dashed otherwise)
    color = {v: f"C{i % 10}" for i, v in enumerate(variants)}

    def acceptance(ax, domain):
        for r in rows:
            if r["domain"] == domain and r.get("acceptance_by_position") and r["batch_size"] == smallest_batch:
                acc = [a if a is not None else float("nan") for a in r["acceptance_by_position"]]
                ax.plot(range(1, len(acc) + 1), acc, marker="o", linestyle="-" if r["temperature"] == 0 else "--",
                        color=color[r["variant"]], label=f"{r['variant']} T={r['temperature']:g}")
        ax.set(title=f"{domain}: conditional acceptance", xlabel="draft position k",
               ylabel="P(accept k | 1..k-1 accepted)", ylim=(0, 1.02))
        ax.set_xticks(range(1, longest + 1))

    def speedup(ax, domain):
        keys = sorted({(r["variant"], r["temperature"]) for r in rows if r["domain"] == domain and r["kind"] == "dspark"})
        for variant, temperature in keys:
            points = sorted((r["batch_size"], r["speedup_vs_none"]) for r in rows if r["domain"] == domain
                            and r["variant"] == variant and r["temperature"] == temperature and r["speedup_vs_none"])
            if points:
                ax.plot(*zip(*points), marker="o", linestyle="-" if temperature == 0 else "--",
                        color=color[variant], label=f"{variant} T={temperature:g}")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set(title=f"{domain}: speedup over autoregressive", xlabel="batch size", ylabel="tokens/s ÷ none")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(b) for b in sizes])

    def series(domain, key):
        keys = sorted({(r["variant"], r["temperature"]) for r in rows if r["domain"] == domain and r["kind"] == "dspark"})
        for variant, temperature in keys:
            points = sorted((r["batch_size"], r) for r in rows if r["domain"] == domain and r["variant"] == variant
                            and r["temperature"] == temperature and key(r) is not None)
            if points:
                yield (f"{variant} T={temperature:g}", dict(linestyle="-" if temperature == 0 else "--",
                                                              color=color[variant]), points)

    def frontier(ax, domain):
        for label, style, points in series(domain, lambda r: r["tokens_per_s"]):
            ax.plot([r["tokens_per_s"] / b for b, r in points], [r["tokens_per_s"] for _, r in points], marker="o",
                    label=label, **style)
            for b, r in points:
                ax.annotate(str(b), (r["tokens_per_s"] / b, r["tokens_per_s"]), fontsize=6)
        ax.set(title=f"{domain}: aggregate vs per-request speed (labels: batch)",
               xlabel="tokens/s per request", ylabel="aggregate tokens/s")

    def budget(ax, domain):
        for label, style, points in series(domain, lambda r: r.get("verified_per_round")):
            ax.plot([b for b, _ in points], [r["verified_per_round"] for _, r in points], marker="o", label=label,
                    **style)
        ax.set(title=f"{domain}: verification budget", xlabel="batch size (concurrent requests)",
               ylabel="drafts verified per request-round")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(b) for b in sizes])

    paths = [_figure_per_domain(domains, acceptance, output_dir / "acceptance_by_position.png"),
             _figure_per_domain(domains, speedup, output_dir / "speedup_by_batch.png")]
    if len(sizes) > 1:
        paths += [_figure_per_domain(domains, frontier, output_dir / "throughput_frontier.png"),
                  _figure_per_domain(domains, budget, output_dir / "verification_budget.png")]
    return paths


def _figure_per_domain(domains: list[str], draw, path: Path) -> Path:
    """One panel per domain, drawn by ``draw(ax, domain)``, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(domains), figsize=(5.5 * len(domains), 4), squeeze=False)
    for ax, domain in zip(axes[0], domains):
        draw(ax, domain)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(cfg, results: list[CellResult], mismatches: list[dict]) -> dict:
    """Write ``bench.json``, ``bench.md`` and the plots into ``cfg.output_dir``; return the JSON."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize(results)
    report = {"environment": environment(), "config": asdict(cfg), "rows": rows, "greedy_mismatches": mismatches,
              "metrics": {name: definition for name, definition, _ in METRICS}}
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown_table(rows)
    pairs = greedy_pairs(results)
    references = sorted({"transformers' generate" if ref.family == "hf_plain" else
                         f"dspark's plain decoding (none) at batch {ref.batch_size}" for _, ref in pairs})
    reference = " / ".join(references)
    status = ("greedy outputs not checked (check_greedy: false)" if not cfg.check_greedy else
              "greedy outputs not checked (no temperature-0 cell with a reference to compare with)"
              if not pairs else
              f"all greedy outputs match {reference} ({len(pairs)} cells compared)" if not mismatches else
              f"**{len(mismatches)} greedy outputs differ from {reference}** (see bench.json)")
    env = report["environment"]
    if SamplingParams(1.0, **cfg.penalties).penalized:
        status += " · penalties: " + ", ".join(f"{name} {value:g}" for name, value in cfg.penalties.items())
    (out / "bench.md").write_text(f"# dspark bench\n\n{env['date']} · {env['cpu']} · {env['torch_threads']} threads · "
                                  f"torch {env['torch']} · transformers {env['transformers']}\n\n{status}\n\n{table}"
                                  f"\n## Metrics\n\n{metrics_markdown()}")
    report["plots"] = [str(p) for p in plot(rows, out)]
    return report
