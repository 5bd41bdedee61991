"""The commands around decoding: ``train``, ``data build`` / ``data regenerate``, ``bench``,
``export``, ``calibrate`` and ``profile`` (each a thin call into its library module)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def train_command(args: argparse.Namespace) -> int:
    from dspark.training import load_train_config, train

    cfg = load_train_config(args.config, [*args.overrides, f"kind={args.kind}"])
    report = train(cfg)
    print(json.dumps(report["test"], indent=2))
    print(f"[dspark] exported {cfg.output_dir} ({report['parameters'] / 1e6:.2f}M parameters, "
          f"{report['train_seconds'] / 60:.1f} min)", file=sys.stderr)
    return 0


def data_build_command(args: argparse.Namespace) -> int:
    from dspark.data.build import build_data, load_data_config

    manifest = build_data(load_data_config(args.config, args.overrides))
    print(json.dumps(manifest, indent=2))
    return 0


def data_regenerate_command(args: argparse.Namespace) -> int:
    from dspark.data.regenerate import load_regenerate_config, regenerate

    cfg = load_regenerate_config(args.config, args.overrides)
    report = regenerate(cfg, progress=not args.no_progress)
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=2))
    print(f"[dspark] wrote {cfg.output}", file=sys.stderr)
    return 0


def bench_command(args: argparse.Namespace) -> int:
    from dspark.bench import load_bench_config, run_bench

    cfg = load_bench_config(args.config, args.overrides)
    report = run_bench(cfg, progress=not args.no_progress)
    print(Path(cfg.output_dir, "bench.md").read_text())
    return 1 if report["greedy_mismatches"] else 0


def export_command(args: argparse.Namespace) -> int:
    from dspark.config import check_output_dir
    from dspark.drafters.checkpoint import read_drafter_args
    from dspark.drafters.eagle3 import CHECKPOINT_KEY, load_eagle3
    from dspark.drafters.eagle3_export import export_eagle3, export_problems
    from dspark.drafters.eagle_model import Eagle3Args
    from dspark.models import load_model
    from dspark.models.loading import resolve_checkpoint, resolve_dtype

    check_output_dir("--out", args.out)  # (mkdir raised FileExistsError once the target and head had loaded)
    config_file = Path(resolve_checkpoint(args.target)) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"--target {args.target!r} has no config.json: give the target's checkpoint "
                                "directory (or an embedded model name)")
    dtype = resolve_dtype(args.dtype)
    _, head_args = read_drafter_args(args.drafter, CHECKPOINT_KEY, Eagle3Args)  # refuse before loading the target
    problems = export_problems(head_args)
    if problems:
        raise ValueError("this EAGLE-3 head cannot be written in the EAGLE / SpecForge format: " + "; ".join(problems))
    target = load_model(args.target)
    head = load_eagle3(args.drafter, target)
    out = export_eagle3(head, target, json.loads(config_file.read_text()), args.out, dtype=dtype)
    print(f"[dspark] wrote the EAGLE-3 head {args.drafter} as LlamaForCausalLMEagle3 to {out} "
          f"(fused target layers {[i + 1 for i in head.args.target_layers]} as layer inputs)", file=sys.stderr)
    return 0


def calibrate_command(args: argparse.Namespace) -> int:
    from dspark.scheduling.recipes import calibrate

    report = calibrate(args.config, args.overrides, prompts=args.prompts, num_prompts=args.num_prompts,
                       max_new_tokens=args.max_new_tokens, temperature=args.temperature, method=args.method,
                       batch_size=args.batch_size, seed=args.seed, output=args.output, plot=args.plot)
    print("| position | events | ECE before | ECE after | Brier before | Brier after | AUROC | temperature | shift |")
    print("|---|---|---|---|---|---|---|---|---|")
    for before, after, t, b in zip(report["before"], report["after"], report["temperatures"], report["biases"]):
        print(f"| {before['position']} | {before['events']} | {before['ece']:.4f} | {after['ece']:.4f} | "
              f"{before['brier']:.4f} | {after['brier']:.4f} | {after['auroc']:.3f} | {t:.3f} | {b:.3f} |")
    print(f"[dspark] {report['request_rounds']} request-rounds; {report['method']} {report['map']} map saved to "
          f"{report['saved_to']}" + (f"; reliability diagram: {report['plot']}" if report.get("plot") else ""),
          file=sys.stderr)
    return 0


def token_counts(text: str) -> list[int]:
    """``--tokens 1,2,4``: the token counts of ``dspark profile`` (argparse reports a bad list as a usage error)."""
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes increasing integers >= 1 separated by commas, e.g. 1,2,4,8; "
                                         f"got {text!r}") from None


def profile_command(args: argparse.Namespace) -> int:
    from dspark.scheduling.recipes import profile

    table = profile(args.config, args.overrides, token_counts=args.tokens, context_length=args.context_length,
                    output=args.output)
    print("| tokens in the forward | steps/s | tokens/s |")
    print("|---|---|---|")
    for b, sps in zip(table.token_counts, table.steps_per_second):
        print(f"| {b} | {sps:.1f} | {b * sps:.0f} |")
    print(f"[dspark] cost table saved to {args.output} ({table.dtype}, {table.threads} threads)", file=sys.stderr)
    return 0
