"""``dspark bench``: acceptance and speed of dspark pipelines beside transformers' generate."""

from dspark.bench.config import BenchConfig, PeerConfig, PipelineSpec, load_bench_config
from dspark.bench.report import markdown_table, summarize, write_report
from dspark.bench.runner import build_variants, greedy_mismatches, run_matrix


def run_bench(cfg: BenchConfig, progress: bool = True) -> dict:
    """Build the variants, measure the matrix, write the report; return the report dict."""
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    variants, tokenizer = build_variants(cfg)
    results = run_matrix(cfg, variants, tokenizer, progress=progress)
    return write_report(cfg, results, greedy_mismatches(results) if cfg.check_greedy else [])


__all__ = ["BenchConfig", "PeerConfig", "PipelineSpec", "build_variants", "greedy_mismatches", "load_bench_config",
           "markdown_table", "run_bench", "run_matrix", "summarize", "write_report"]
