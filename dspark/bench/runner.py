"""Runs the bench matrix: every variant of a cell alternates with the others, after a warm-up."""

from __future__ import annotations

import logging
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dspark.bench.config import BenchConfig
from dspark.records import SamplingParams
from dspark.stats import GenerationStats

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """One pass of a variant over a cell's prompts."""

    seconds: float
    tokens: int
    outputs: list[list[int]]
    stats: GenerationStats | None = None


@dataclass
class Variant:
    """Something that generates: a dspark pipeline at one γ, or a ``transformers`` peer."""

    label: str
    kind: str  # "dspark" or "hf"
    family: str  # pipeline label or peer name ("none", "ngram", "draft_model", "hf_plain", ...)
    gamma: int | None
    run: Callable[[list[list[int]], float, int, int], RunResult]
    batch_sizes: tuple[int, ...] | None = None  # None = every batch size
    # dspark variants: turn the per-phase clock on or off (engine.time_phases); on CUDA it
    # synchronises three times a round, so the timed passes run without it and one extra pass
    # per cell measures the phases (``phase_pass``)
    time_phases: Callable[[bool], None] | None = None
    phase_pass: bool = False


@dataclass
class CellResult:
    """Measurements of one variant in one (domain, temperature, batch size) cell."""

    domain: str
    temperature: float
    batch_size: int
    variant: str
    kind: str
    family: str
    gamma: int | None
    tokens_per_s: list[float] = field(default_factory=list)
    stats: list[GenerationStats] = field(default_factory=list)
    outputs: list[list[int]] | None = None
    phase_stats: GenerationStats | None = None  # the untimed pass that split each round (CUDA)


def read_prompts(domain: str, count: int) -> list[str]:
    """The first ``count`` prompts of a shipped set or a JSONL file (checked before any model loads)."""
    from dspark.assets import PROMPT_SETS, prompt_set_path
    from dspark.data.eval_sets import read_jsonl

    path = prompt_set_path(domain) if domain in PROMPT_SETS else Path(domain)
    if not path.is_file():
        raise FileNotFoundError(f"prompt set {domain!r} is neither a shipped one ({', '.join(PROMPT_SETS)}) nor a file")
    records = read_jsonl(path)
    if len(records) < count:
        raise ValueError(f"num_prompts is {count} but prompt set {domain!r} has {len(records)} prompts")
    return [r["prompt"] for r in records[:count]]


def load_prompts(domain: str, tokenizer, count: int) -> list[list[int]]:
    """Token ids of the first ``count`` prompts of a shipped set or a JSONL file."""
    texts = read_prompts(domain, count)
    if tokenizer is None:
        raise ValueError("bench prompts are text: the pipelines need a tokenizer")
    return [tokenizer(text)["input_ids"] for text in texts]


def dspark_variant(label: str, family: str, gamma: int | None, pipe, seed: int, **penalties) -> Variant:
    """A variant that runs ``pipe.generate`` over the prompts in batches (with ``penalties``)."""
    def run(prompts, temperature, batch_size, max_new_tokens):
        outputs, parts = [], []
        started = time.perf_counter()
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            result = pipe.generate(chunk, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + start,
                                   ignore_eos=True, **penalties)
            outputs += result.token_ids
            parts.append(result.stats)
        seconds = time.perf_counter() - started
        return RunResult(seconds, sum(len(o) for o in outputs), outputs, GenerationStats.merge(parts))

    def time_phases(on: bool) -> None:
        pipe.engine.config.time_phases = on

    syncs = torch.device(pipe.engine.device).type == "cuda"
    time_phases(not syncs)  # (on the CPU the clock only reads the host's time)
    return Variant(label, "dspark", family, gamma, run, time_phases=time_phases, phase_pass=syncs)


def hf_variant(label: str, family: str, gamma: int | None, model, pad_id: int, seed: int, batch_sizes=None,
               **generate_kwargs) -> Variant:
    """A variant that runs ``transformers``' ``model.generate`` (left padding for batches) with the
    bench's settings alone: the checkpoint's own ``generation_config`` (a ``repetition_penalty``
    an instruct model ships, say) is set aside while it runs, since dspark does not read it."""
    from transformers import GenerationConfig

    def run(prompts, temperature, batch_size, max_new_tokens):
        shipped, model.generation_config = model.generation_config, GenerationConfig()
        try:
            return measure(prompts, temperature, batch_size, max_new_tokens)
        finally:
            model.generation_config = shipped

    def measure(prompts, temperature, batch_size, max_new_tokens):
        outputs = []
        started = time.perf_counter()
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk], device=model.device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=model.device)
            sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else \
                dict(do_sample=False)
            torch.manual_seed(seed + start)
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, min_new_tokens=None,
                                     eos_token_id=None, pad_token_id=pad_id, **sampling, **generate_kwargs)
            outputs += out[:, width:].tolist()
        seconds = time.perf_counter() - started
        return RunResult(seconds, sum(len(o) for o in outputs), outputs)
    return Variant(label, "hf", family, gamma, run, tuple(batch_sizes) if batch_sizes else None)


def build_variants(cfg: BenchConfig) -> tuple[list[Variant], object]:
    """The dspark pipelines (each speculative one at every γ) and the requested peers; and the tokenizer."""
    from dspark.pipeline import build_pipeline

    variants, tokenizer = [], None
    first_pipe, first_draft_model, first_ngram, first_early_exit = None, None, None, None
    for spec in cfg.pipelines:
        gammas = cfg.gammas if spec.speculative else [None]
        for gamma in gammas:
            overrides = [*cfg.common_overrides, *spec.overrides]
            if gamma is not None:
                overrides.append(f"drafter.num_speculative_tokens={gamma}")
            pipe = build_pipeline(spec.config, overrides=overrides)
            tokenizer = tokenizer or pipe.tokenizer
            first_pipe = first_pipe or pipe
            label = spec.label if gamma is None else f"{spec.label} g={gamma}"
            variants.append(dspark_variant(label, spec.label, gamma, pipe, cfg.seed, **cfg.penalties))
            # a peer is built from the pipeline it is compared with (the row labelled as its drafter:
            # report.PEER_OF), else from the first pipeline with that drafter
            drafter = pipe.config.drafter.name
            named = spec.label == drafter and gamma == gammas[0]
            if drafter == "draft_model" and (first_draft_model is None or named):
                first_draft_model = pipe
            if drafter == "ngram" and (first_ngram is None or named):
                first_ngram = pipe
            if drafter == "early_exit" and (first_early_exit is None or named):
                first_early_exit = pipe
    if cfg.peers.any:
        # the penalties transformers has, where on (validation refused the others with peers on)
        off = SamplingParams()
        penalty = {name: getattr(cfg, name) for name in ("repetition_penalty", "no_repeat_ngram_size")
                   if getattr(cfg, name) != getattr(off, name)}
        target_hf = hf_model_of(first_pipe.target)
        pad = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
        if cfg.peers.plain:
            variants.append(hf_variant("hf plain", "hf_plain", None, target_hf, pad, cfg.seed, **penalty))
        if cfg.peers.assisted and first_draft_model is not None:
            draft_hf = hf_model_of(first_draft_model.drafter.model)
            for gamma in cfg.gammas:
                variants.append(hf_variant(f"hf assisted g={gamma}", "hf_assisted", gamma, target_hf, pad, cfg.seed, (1,),
                                           assistant_model=draft_hf, num_assistant_tokens=gamma,
                                           num_assistant_tokens_schedule="constant", assistant_confidence_threshold=0.0,
                                           **penalty))
        if cfg.peers.prompt_lookup and first_ngram is not None:
            max_n = first_ngram.config.drafter.max_n
            for gamma in cfg.gammas:
                variants.append(hf_variant(f"hf prompt lookup g={gamma}", "hf_prompt_lookup", gamma, target_hf, pad,
                                           cfg.seed, (1,), prompt_lookup_num_tokens=gamma, max_matching_ngram_size=max_n,
                                           **penalty))
        if cfg.peers.early_exit and first_early_exit is not None:
            exit_layer = first_early_exit.drafter.model.num_layers
            for gamma in cfg.gammas:
                variants.append(hf_variant(f"hf early exit g={gamma}", "hf_early_exit", gamma, target_hf, pad, cfg.seed,
                                           (1,), assistant_early_exit=exit_layer, num_assistant_tokens=gamma,
                                           num_assistant_tokens_schedule="constant", assistant_confidence_threshold=0.0,
                                           **penalty))
    return variants, tokenizer


def hf_model_of(model):
    """A ``transformers`` model with the same weights as a dspark model (for the peers), on its
    device and in its dtype (an in-memory model is copied first if it has to move or convert:
    it is the caller's)."""
    import copy

    from transformers import AutoModelForCausalLM

    source = getattr(model, "hf_source", None)
    if source is None:
        raise ValueError("transformers peers need a model loaded by dspark.models.load_model")
    device = next(model.parameters()).device  # (the peers run where dspark does)
    if isinstance(source, (str, Path)):
        return AutoModelForCausalLM.from_pretrained(source, dtype=model.dtype).to(device).eval()
    if source.device != device or source.dtype != model.dtype:
        source = copy.deepcopy(source)
    return source.to(device, model.dtype).eval()


def run_matrix(cfg: BenchConfig, variants: list[Variant], tokenizer, progress: bool = True) -> list[CellResult]:
    """Measure every cell; passes alternate over the variants (rotating the order each pass)."""
    from tqdm.auto import tqdm

    if cfg.warmup == 0:
        log.warning("bench warmup is 0: the first measured pass of each variant includes compilation and "
                    "first-call costs")
    cells = [(d, t, b) for d in cfg.domains for t in cfg.temperatures for b in cfg.batch_sizes]
    prompts = {d: load_prompts(d, tokenizer, cfg.num_prompts) for d in cfg.domains}
    total = sum(len([v for v in variants if v.batch_sizes is None or b in v.batch_sizes]) for _, _, b in cells)
    phase_passes = sum(len([v for v in variants if v.phase_pass and (v.batch_sizes is None or b in v.batch_sizes)])
                       for _, _, b in cells)
    bar = tqdm(total=total * (cfg.warmup + cfg.repeats) + phase_passes, desc="bench", unit="run",
               disable=not progress)
    results: list[CellResult] = []
    for domain, temperature, batch in cells:
        active = [v for v in variants if v.batch_sizes is None or batch in v.batch_sizes]
        cell = {v.label: CellResult(domain, temperature, batch, v.label, v.kind, v.family, v.gamma) for v in active}
        for p in range(cfg.warmup + cfg.repeats):
            order = active[p % len(active):] + active[: p % len(active)]
            for variant in order:
                bar.set_postfix_str(f"{domain} T={temperature} B={batch} {variant.label}")
                result = variant.run(prompts[domain], temperature, batch, cfg.max_new_tokens)
                bar.update(1)
                if p < cfg.warmup:
                    continue
                record = cell[variant.label]
                record.tokens_per_s.append(result.tokens / result.seconds)
                if result.stats is not None:
                    record.stats.append(result.stats)
                if record.outputs is None:
                    record.outputs = result.outputs
        for variant in active:
            if variant.phase_pass:
                bar.set_postfix_str(f"{domain} T={temperature} B={batch} {variant.label} (phases)")
                variant.time_phases(True)
                try:
                    cell[variant.label].phase_stats = variant.run(prompts[domain], temperature, batch,
                                                                  cfg.max_new_tokens).stats
                finally:
                    variant.time_phases(False)
                bar.update(1)
        results += cell.values()
    bar.close()
    return results


def greedy_pairs(results: list[CellResult]) -> list[tuple[CellResult, CellResult]]:
    """``(dspark variant, reference)`` for every greedy dspark cell that has a reference to
    compare with. At batch 1: ``transformers``' plain generate when that peer ran, else dspark's
    ``none``; in larger batches dspark's ``none`` at the same batch size (the same requests decoded
    together: batch invariance — a request's greedy tokens alone against in a batch — is not
    what losslessness promises, and rounding may differ between the two shapes)."""
    pairs = []
    for r in results:
        if r.temperature != 0 or r.kind != "dspark":
            continue
        greedy = [x for x in results if x.domain == r.domain and x.temperature == 0 and x.outputs is not None]
        same_batch = [x for x in greedy if x.batch_size == r.batch_size]
        if r.batch_size == 1:
            reference = next((x for x in same_batch if x.family == "hf_plain"), None) or \
                next((x for x in same_batch if x.family == "none"), None)
        else:
            reference = next((x for x in same_batch if x.family == "none"), None)
        if reference is not None and reference is not r:
            pairs.append((r, reference))
    return pairs


def greedy_mismatches(results: list[CellResult]) -> list[dict]:
    """Prompts where a dspark variant's greedy output differs from its reference
    (:func:`greedy_pairs`), with the first differing position. Reported, never averaged away."""
    mismatches = []
    for r, reference in greedy_pairs(results):
        for i, (ours, theirs) in enumerate(zip(r.outputs, reference.outputs)):
            if ours != theirs:
                first = next((k for k, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
                mismatches.append(dict(domain=r.domain, batch_size=r.batch_size, variant=r.variant,
                                       reference=reference.variant, reference_batch_size=reference.batch_size,
                                       prompt=i, first_difference=first))
    for m in mismatches:
        print(f"GREEDY MISMATCH: {m}", file=sys.stderr)
    return mismatches


def median(values: list[float]) -> float:
    """Median (``nan`` for no values)."""
    return statistics.median(values) if values else float("nan")
