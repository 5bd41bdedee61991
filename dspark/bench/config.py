"""The ``dspark bench`` config: which pipelines, prompts and settings to measure side by side."""

from __future__ import annotations

from dataclasses import dataclass, field

from dspark.config import check_output_dir, load_structured
from dspark.records import SamplingParams


@dataclass
class PipelineSpec:
    """One dspark pipeline in the matrix.

    Attributes:
        label: name in the tables (``none``, ``ngram``, ``draft_model`` …).
        config: pipeline config (YAML path or bare name in ``configs/``; ``null`` = built-in defaults).
        overrides: dotlist overrides for this pipeline.
        speculative: whether the γ sweep applies (``false`` for the ``none`` baseline).
    """

    label: str = "none"
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    speculative: bool = True


@dataclass
class PeerConfig:
    """Hugging Face ``generate`` peers, run on the same models, prompts and settings.

    ``assisted`` uses the draft model of the first ``draft_model`` pipeline, ``prompt_lookup``
    the first ``ngram`` pipeline's n-gram size and ``early_exit`` the first ``early_exit``
    pipeline's exit layer (``generate(assistant_early_exit=...)``), each at every γ; all three
    only at batch size 1 (``transformers`` supports no more).
    """

    plain: bool = True
    assisted: bool = True
    prompt_lookup: bool = True
    early_exit: bool = True

    @property
    def any(self) -> bool:
        """Whether any peer runs."""
        return self.plain or self.assisted or self.prompt_lookup or self.early_exit


@dataclass
class BenchConfig:
    """Config of ``dspark bench`` (``configs/bench/default.yaml``).

    Attributes:
        pipelines: the dspark pipelines; one labelled ``none`` is the baseline for speedups.
        domains: shipped prompt sets (``code``, ``prose``, ``calibration``) or JSONL files of ``{"prompt": ...}``.
        num_prompts: prompts per domain (the first ones of each set; a multiple of every batch size).
        temperatures, batch_sizes, gammas: the matrix (γ applies to speculative pipelines).
        max_new_tokens: tokens generated per prompt (EOS ignored, so every variant does the same work).
        repeats, warmup: measured and discarded passes; passes alternate over the variants (with
            ``warmup: 0`` the first measured pass includes compilation and first-call costs: a warning).
        common_overrides: dotlist overrides applied to every pipeline (e.g. ``target.device=cpu``).
        peers: the ``transformers`` peers. check_greedy: compare every pipeline's greedy outputs with
            ``transformers``' plain generate at batch 1 (dspark ``none`` when that peer is off), and with
            dspark ``none`` at the same batch size in larger batches.
        output_dir: where ``bench.json``, ``bench.md`` and the PNGs go.
        seed: sampling seed; threads: torch CPU threads (``null`` = default).
        repetition_penalty, presence_penalty, frequency_penalty, no_repeat_ngram_size: penalties for
            every variant (off: 1, 0, 0, 0; :mod:`dspark.samplers.penalties`). The ``transformers``
            peers take the repetition penalty and the n-gram size too; they have no presence or
            frequency penalty, so those need the peers off.
    """

    pipelines: list[PipelineSpec] = field(default_factory=lambda: [PipelineSpec("none", None, ["drafter=none"], False)])
    domains: list[str] = field(default_factory=lambda: ["code", "prose"])
    num_prompts: int = 8
    temperatures: list[float] = field(default_factory=lambda: [0.0, 1.0])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    gammas: list[int] = field(default_factory=lambda: [4])
    max_new_tokens: int = 128
    repeats: int = 3
    warmup: int = 1
    common_overrides: list[str] = field(default_factory=list)
    peers: PeerConfig = field(default_factory=PeerConfig)
    check_greedy: bool = True
    output_dir: str = "bench_out"
    seed: int = 0
    threads: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    no_repeat_ngram_size: int = 0

    @property
    def penalties(self) -> dict[str, float]:
        """The penalties as ``generate`` keyword arguments."""
        return dict(repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
                    frequency_penalty=self.frequency_penalty, no_repeat_ngram_size=self.no_repeat_ngram_size)

    def validate(self) -> "BenchConfig":
        """Raise ``ValueError`` naming the bad setting (``FileNotFoundError`` for a prompt set)."""
        from dspark.bench.runner import read_prompts
        from dspark.config import load_config

        if not self.pipelines:
            raise ValueError("bench needs at least one pipeline")
        labels = [p.label for p in self.pipelines]
        if len(set(labels)) != len(labels):
            raise ValueError(f"pipeline labels must be unique, got {labels}")
        if any(p.label == "none" and p.speculative for p in self.pipelines):
            raise ValueError("the pipeline labelled `none` is the baseline every speedup divides by: it must be plain "
                             "decoding (speculative: false, drafter=none)")
        for name, values, low in (("batch_sizes", self.batch_sizes, 1), ("gammas", self.gammas, 1)):
            if not values or any(v < low for v in values):
                raise ValueError(f"{name} must be a non-empty list of integers >= {low}, got {values}")
        if any(t < 0 for t in self.temperatures) or not self.temperatures:
            raise ValueError(f"temperatures must be a non-empty list of numbers >= 0, got {self.temperatures}")
        for name in ("num_prompts", "max_new_tokens", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("domains", "temperatures", "batch_sizes", "gammas"):  # (a repeat would share one cell's rows)
            values = list(getattr(self, name))
            if len(set(values)) != len(values):
                raise ValueError(f"{name} lists a value twice: {values}")
        if max(self.batch_sizes) > self.num_prompts:
            raise ValueError(f"batch size {max(self.batch_sizes)} needs at least as many prompts: num_prompts is "
                             f"{self.num_prompts} (a batch of fewer requests would run under that label)")
        uneven = [b for b in self.batch_sizes if self.num_prompts % b]
        if uneven:
            raise ValueError(f"num_prompts ({self.num_prompts}) must be a multiple of every batch size: at batch size "
                             f"{uneven[0]} the last batch would run {self.num_prompts % uneven[0]} requests under "
                             "that label")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        check_output_dir("output_dir", self.output_dir)  # (mkdir failed with a traceback once every variant had run)
        for spec in self.pipelines:  # (a misspelt key in a pipeline's overrides, before any model loads)
            try:
                composed = load_config(spec.config, [*self.common_overrides, *spec.overrides])
            except ValueError as err:
                raise ValueError(f"pipeline {spec.label!r}: {err}") from err
            if spec.label == "none" and composed.drafter.name != "none":
                raise ValueError(f"the pipeline labelled `none` is the baseline every speedup divides by: it must be "
                                 f"plain decoding (drafter=none), got drafter {composed.drafter.name!r}")
        for domain in self.domains:  # (a missing or short prompt set, before any model loads)
            read_prompts(domain, self.num_prompts)
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be an integer >= 1 (null = torch's default), got {self.threads}")
        for temperature in self.temperatures:  # (e.g. 1e-9: refused by generate once the models had loaded)
            SamplingParams(temperature, **self.penalties).validate()
        if self.peers.any and (self.presence_penalty or self.frequency_penalty):
            raise ValueError("transformers' generate has no presence_penalty or frequency_penalty: turn the peers off "
                             "(peers.plain=false peers.assisted=false peers.prompt_lookup=false peers.early_exit=false) "
                             "to bench with them")
        return self


def load_bench_config(path=None, overrides=()) -> BenchConfig:
    """Structured bench config from YAML + dotlist overrides (a misspelled key is an error)."""
    return load_structured(BenchConfig, path, overrides).validate()
