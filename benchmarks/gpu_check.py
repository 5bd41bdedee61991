"""One-call GPU check: the verification kernels against their torch twins, and decoding rounds with
and without CUDA graphs, timed with CUDA events (medians of alternating runs).

    python benchmarks/gpu_check.py --out DIR [--repeats 30]

Run through ``scripts/gpu_check.sh`` (which first runs the GPU-marked tests). Writes
``DIR/gpu_check.json`` (every number and the environment) and ``DIR/gpu_check.md`` (the tables).
Sections:

* kernels — ``verify_chain`` (float32 distributions), ``verify_greedy`` (bf16 logits) and
  ``commit_tokens`` at batch 1 and 64, γ = 7, vocabulary 151,936: median ms per call of the Triton
  kernel and of the twin, their ratio, and whether both returned the same tokens;
* profile — ``torch.profiler`` over one EAGLE-3 ``generate`` call with CUDA graphs: the ops by
  host and by device time (where a graphed round still spends its time);
* rounds — batch-1 greedy decoding with the ``ngram`` drafter (γ = 7) and plain decoding, eager
  vs ``engine.cuda_graphs=true`` (and ``engine.compile=true`` for the small model), for the
  embedded target and a random-weight Qwen3 of about 0.5B parameters in bf16: median ms per
  round (decoding time without the prefill, over rounds) and the outputs' agreement.

A lent GPU is short of minutes, not memory: ``--deadline-s`` bounds the rounds (a group of them
not started by then is recorded as skipped), ``--sections`` picks what runs, and the JSON is
rewritten after every group, so a run cut short still leaves what it measured.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import dspark
from dspark.kernels import commit_tokens, use_backend, verify_chain, verify_greedy
from dspark.models import random_hf_model

QWEN3_05B = dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                 num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=8, head_dim=64,
                 max_position_embeddings=4096, tie_word_embeddings=True)


def cuda_ms(fn, repeats: int) -> list[float]:
    """Milliseconds per call, one CUDA-event pair per call."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def alternate(variants: dict, repeats: int, inner: int) -> dict[str, list[float]]:
    """Alternate the variants (A B A B …) after a warm-up; each sample is the mean of ``inner`` calls."""
    for fn in variants.values():
        fn()
    torch.cuda.synchronize()
    samples = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            samples[name].append(statistics.fmean(cuda_ms(fn, inner)))
    return samples


def summary(samples: list[float]) -> dict:
    return {"median_ms": statistics.median(samples), "min_ms": min(samples), "max_ms": max(samples)}


def differing_requests(kernel, twin) -> int:
    """Requests (rows) whose outputs differ between the kernel and the twin.

    On float32 distributions that are not dyadic the two can differ where ``u · total`` falls
    within rounding of a CDF boundary (the kernel sums by tiles, the twin's cumsum in its own
    order); the GPU-marked tests compare them on dyadic distributions, where every sum is exact."""
    kernel, twin = (kernel, twin) if isinstance(kernel, tuple) else ((kernel,), (twin,))
    rows = torch.zeros(kernel[0].shape[0], dtype=torch.bool, device=kernel[0].device)
    for a, b in zip(kernel, twin):
        rows |= (a != b).view(a.shape[0], -1).any(1)
    return int(rows.sum())


def kernels_section(repeats: int) -> list[dict]:
    rows, vocab, gamma = [], 151936, 7
    g = torch.Generator(device="cuda").manual_seed(0)
    for batch in (1, 64):
        p = torch.softmax(torch.randn(batch, gamma + 1, vocab, device="cuda", generator=g) * 3, -1)
        q = torch.softmax(torch.randn(batch, gamma, vocab, device="cuda", generator=g) * 3, -1)
        drafts = torch.multinomial(q.view(-1, vocab), 1, generator=g).view(batch, gamma)
        num = torch.full((batch,), gamma, device="cuda")
        u = torch.rand(batch, gamma + 1, device="cuda", generator=g)
        logits = torch.randn(batch, gamma + 1, vocab, device="cuda", generator=g).bfloat16()
        tokens = torch.zeros(batch, 4096, dtype=torch.long, device="cuda")
        emitted = torch.randint(0, vocab, (batch, gamma + 1), device="cuda", generator=g)
        eos = torch.tensor([151643, 151645], device="cuda")

        def commit_args():
            return (tokens, torch.full((batch,), 100, device="cuda"), torch.full((batch,), 100, device="cuda"),
                    torch.zeros(batch, dtype=torch.bool, device="cuda"), emitted, num + 1, eos, 1000)

        ops = {"verify_chain": lambda: verify_chain(p, drafts, q, num, u),
               "verify_chain (deterministic drafts)": lambda: verify_chain(p, drafts, None, num, u),
               "verify_greedy": lambda: verify_greedy(logits, drafts, num),
               "commit_tokens": lambda: commit_tokens(*commit_args())}
        for op, fn in ops.items():
            outputs = {}
            for backend in ("triton", "torch"):
                with use_backend(backend):
                    outputs[backend] = fn()
            differing = differing_requests(outputs["triton"], outputs["torch"])
            same = differing == 0

            def run(backend, fn=fn):
                with use_backend(backend):
                    fn()

            samples = alternate({"triton": lambda: run("triton"), "torch": lambda: run("torch")}, repeats, 5)
            kernel, twin = summary(samples["triton"]), summary(samples["torch"])
            rows.append({"op": op, "batch": batch, "gamma": gamma, "vocab": vocab, "kernel": kernel, "twin": twin,
                         "speedup": twin["median_ms"] / kernel["median_ms"], "same_outputs": same,
                         "differing_requests": differing})
            print(f"{op:38s} B={batch:3d}  kernel {kernel['median_ms']:.4f} ms  twin {twin['median_ms']:.4f} ms  "
                  f"x{rows[-1]['speedup']:.2f}  requests differing {differing}/{batch}", flush=True)
    return rows


#: (label, model source, dtype, variants): the variants of one group are alternated and compared with
#: its "eager" variant; the groups run in this order (the issue's 0.5B figure first)
ROUND_GROUPS = (
    ("qwen3-0.5B random (bf16)", "qwen3-0.5b", "bfloat16", ("eager", "cuda_graphs")),
    ("dspark-tiny (fp32)", "dspark-tiny", "float32", ("eager", "cuda_graphs")),
    ("dspark-tiny (fp32)", "dspark-tiny", "float32", ("eager", "compile", "compile+cuda_graphs")),
)
VARIANT_OVERRIDES = {"eager": [], "cuda_graphs": ["engine.cuda_graphs=true"], "compile": ["engine.compile=true"],
                     "compile+cuda_graphs": ["engine.compile=true", "engine.cuda_graphs=true"]}


def rounds_section(repeats: int, new_tokens: int, deadline: float, rows: list[dict], save) -> None:
    """Append one row per (group, drafter, variant) to ``rows``, calling ``save()`` after each group."""
    models = {}
    for label, source, dtype, variants in ROUND_GROUPS:
        for drafter in ({"name": "none"}, {"name": "ngram", "num_speculative_tokens": 7}):
            if time.monotonic() > deadline:
                rows.append({"model": label, "drafter": drafter["name"], "variants": list(variants), "skipped": "deadline"})
                save()
                continue
            if source == "qwen3-0.5b" and source not in models:
                models[source] = random_hf_model(QWEN3_05B, seed=0)
            target = models.get(source)
            base = {"target": {"path": None if target is not None else source, "device": "cuda", "dtype": dtype,
                               "tokenizer": None}, "drafter": drafter}
            pipes = {name: dspark.build_pipeline(base, target_model=target, overrides=VARIANT_OVERRIDES[name])
                     for name in variants}
            vocab = pipes["eager"].engine.target.vocab_size
            prompt = torch.randint(0, vocab, (1, 128), generator=torch.Generator().manual_seed(1)).tolist()
            outputs, per_round, tau, warmup_s = {}, {name: [] for name in pipes}, {}, {}
            for name, pipe in pipes.items():  # warm-up: compilation and graph capture
                start = time.perf_counter()
                outputs[name] = pipe.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True).token_ids
                warmup_s[name] = time.perf_counter() - start
            for _ in range(repeats):
                for name, pipe in pipes.items():
                    stats = pipe.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True).stats
                    per_round[name].append(1000 * (stats.wall_time_s - stats.prefill_time_s) / stats.rounds)
                    tau[name] = stats.mean_accepted_length
            eager_ms = statistics.median(per_round["eager"])
            for name in pipes:
                rows.append({"model": label, "drafter": drafter["name"], "variant": name,
                             "ms_per_round": summary(per_round[name]), "tau": tau[name],
                             "speedup_vs_eager": eager_ms / statistics.median(per_round[name]),
                             "same_tokens_as_eager": outputs[name] == outputs["eager"],
                             "first_call_s": warmup_s[name]})
                print(f"{label:26s} {drafter['name']:6s} {name:20s} {statistics.median(per_round[name]):8.3f} ms/round"
                      f"  x{rows[-1]['speedup_vs_eager']:.2f}  same={rows[-1]['same_tokens_as_eager']}"
                      f"  first call {warmup_s[name]:.1f} s", flush=True)
            del pipes
            torch.cuda.empty_cache()
            save()


def profile_section(config: str = "eagle3", new_tokens: int = 64, device: str = "cuda") -> str:
    """Where a graphed decoding call's time goes: ``torch.profiler`` over one greedy ``generate``
    of a shipped pipeline (``engine.cuda_graphs=true``, batch 1, after a warm-up call that
    captures the graphs), ops ranked by host time and by device time."""
    from torch.profiler import ProfilerActivity, profile

    overrides = [f"target.device={device}"] + (["engine.cuda_graphs=true"] if device == "cuda" else [])
    pipe = dspark.build_pipeline(config, overrides=overrides)
    prompt = ["def fibonacci(n):"]
    pipe.generate(prompt, max_new_tokens=new_tokens)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        stats = pipe.generate(prompt, max_new_tokens=new_tokens).stats
    averages = prof.key_averages()
    tables = [f"{config}, {stats.rounds} rounds, {stats.wall_time_s * 1000:.1f} ms under the profiler",
              averages.table(sort_by="self_cpu_time_total", row_limit=30)]
    if device == "cuda":
        tables.append(averages.table(sort_by="self_device_time_total", row_limit=15))
    return "\n".join(tables)


def markdown(report: dict) -> str:
    lines = [f"# GPU check — {report['environment']['device']}, {report['environment']['date']}", "",
             "| op | batch | kernel ms | twin ms | twin / kernel | requests differing |", "|---|---|---|---|---|---|"]
    for r in report.get("kernels", []):
        lines.append(f"| {r['op']} | {r['batch']} | {r['kernel']['median_ms']:.4f} | {r['twin']['median_ms']:.4f} | "
                     f"{r['speedup']:.2f}× | {r.get('differing_requests', '?')} / {r['batch']} |")
    lines += ["", "| model | drafter | variant | ms / round (median) | τ | vs eager | same tokens |",
              "|---|---|---|---|---|---|---|"]
    for r in report.get("rounds", []):
        if "skipped" in r:
            lines.append(f"| {r['model']} | {r['drafter']} | {', '.join(r['variants'])} | skipped ({r['skipped']}) | | | |")
            continue
        lines.append(f"| {r['model']} | {r['drafter']} | {r['variant']} | {r['ms_per_round']['median_ms']:.3f} | "
                     f"{r['tau']:.2f} | {r['speedup_vs_eager']:.2f}× | {r['same_tokens_as_eager']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--repeats", type=int, default=30, help="alternating samples per kernel variant")
    parser.add_argument("--round-repeats", type=int, default=5, help="alternating generate calls per round variant")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--deadline-s", type=float, default=270.0,
                        help="no group starts after this many seconds (it is recorded as skipped)")
    parser.add_argument("--sections", default="kernels,profile,rounds",
                        help="comma-separated: kernels, profile, rounds")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA device")
    import triton

    deadline = time.monotonic() + args.deadline_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"environment": {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
                              "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
                              "python": platform.python_version()}}

    def save() -> None:  # after every group: a run cut short keeps what it measured
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
        (out / "gpu_check.md").write_text(markdown(report))

    sections = set(args.sections.split(","))
    if "kernels" in sections:
        report["kernels"] = kernels_section(args.repeats)
        save()
    if "profile" in sections:  # printed to the log (the files that come back are few)
        try:
            report["profile"] = profile_section()
        except Exception as err:  # a profiler failure must not cost the rounds
            report["profile"] = f"failed: {type(err).__name__}: {err}"
        print(report["profile"], flush=True)
        save()
    if "rounds" in sections:
        report["rounds"] = []
        rounds_section(args.round_repeats, args.new_tokens, deadline, report["rounds"], save)
    save()
    print(markdown(report))


if __name__ == "__main__":
    main()
