"""``dspark data regenerate``: drafter training data written by the target itself.

A drafter is judged on the text its target writes, not on the corpus the target was trained on.
The DSpark paper therefore keeps only the prompts of its training set and has each target
regenerate the responses; this module does the same for the embedded corpus: prompts are
windows of the train split, continuations are decoded by the target (through dspark's own
engine, batched) at each configured temperature, and the result is one token stream —
``prompt + continuation + EOS`` per sample — that ``dspark train drafter ... train_data=PATH``
trains on instead of the corpus.

The file is safetensors (``tokens`` ``[N]`` int32, ``sample_offsets`` ``[S + 1]`` int64: sample
``i`` is ``tokens[offsets[i]:offsets[i + 1]]``) with the target's name, vocabulary size and the
config in its metadata, so a training run can refuse data written by another target.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dspark.config import check_output_file, load_structured
from dspark.data.build import CorpusConfig

log = logging.getLogger(__name__)

FORMAT = "dspark-regenerated-v1"


@dataclass
class RegenerateConfig:
    """Config of ``dspark data regenerate`` (``configs/data/regenerate.yaml``).

    Attributes:
        target: the target that writes the continuations (embedded name or checkpoint directory).
        dtype: the target's dtype while generating.
        prompt_tokens: tokens per prompt (a window of the train split at a seeded random offset).
        new_tokens: tokens each continuation may add (fewer when the target writes EOS).
        samples_per_temperature: prompts decoded at each temperature (a multiple of ``batch_size``:
            every batch has the same shape, so the compiled forward is built once).
        temperatures: sampling temperatures (0 = greedy); each gets its own prompts.
        batch_size: requests decoded together. compile: ``engine.compile`` while generating.
        seed: prompt offsets and sampling seeds. output: the safetensors file written.
        corpus: how the stdlib corpus is split (must match the target's training).
    """

    target: str = "dspark-tiny"
    dtype: str = "float32"
    prompt_tokens: int = 64
    new_tokens: int = 448
    samples_per_temperature: int = 1024
    temperatures: list[float] = field(default_factory=lambda: [0.0, 1.0])
    batch_size: int = 64
    compile: bool = True
    seed: int = 0
    output: str = "runs/data/regenerated.safetensors"
    corpus: CorpusConfig = field(default_factory=CorpusConfig)

    def __post_init__(self):
        from dspark.models.loading import resolve_dtype
        from dspark.records import SamplingParams

        for name in ("prompt_tokens", "new_tokens", "samples_per_temperature", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"regenerate.{name} must be >= 1, got {getattr(self, name)}")
        if self.samples_per_temperature % self.batch_size:
            raise ValueError(f"regenerate.samples_per_temperature ({self.samples_per_temperature}) must be a multiple "
                             f"of batch_size ({self.batch_size}): every batch keeps one shape")
        if not self.temperatures or any(t < 0 for t in self.temperatures):
            raise ValueError(f"regenerate.temperatures must be a non-empty list of values >= 0, got {self.temperatures}")
        for temperature in self.temperatures:  # (as generate checks them, before the corpus is built)
            SamplingParams(temperature).validate()
        check_output_file("regenerate.output", self.output, "the safetensors file")
        resolve_dtype(self.dtype)


def load_regenerate_config(path=None, overrides=()) -> RegenerateConfig:
    """Structured config: unknown keys are errors."""
    return load_structured(RegenerateConfig, path, overrides)


def regenerate(cfg: RegenerateConfig, *, documents=None, progress: bool = True) -> dict:
    """Decode the continuations and write ``cfg.output``; return the report (also in the file's metadata).

    ``documents`` (a prepared corpus, for tests) replaces the stdlib corpus.
    """
    from safetensors.torch import save_file

    from dspark.data.corpus import build_corpus
    from dspark.models.loading import resolve_checkpoint
    from dspark.pipeline import build_pipeline
    from dspark.training.data import RandomBlocks, token_stream

    started = time.time()
    checkpoint = resolve_checkpoint(cfg.target)
    if not (Path(checkpoint) / "config.json").is_file():  # (before the corpus is built)
        raise FileNotFoundError(f"regenerate.target {cfg.target!r} has no config.json: give a checkpoint directory "
                                "or an embedded model name (dspark-tiny)")
    documents = documents if documents is not None else build_corpus(**vars(cfg.corpus))
    pipe = build_pipeline("ar", overrides=[
        f"target.path={checkpoint}", f"target.dtype={cfg.dtype}", f"engine.max_batch_size={cfg.batch_size}",
        f"engine.compile={str(cfg.compile).lower()}", f"cache.max_len={cfg.prompt_tokens + cfg.new_tokens + 1}"])  # + the one-token lookahead
    tokenizer = pipe.tokenizer
    stream = token_stream([d for d in documents if d.split == "train"], tokenizer)
    eos = tokenizer.eos_token_id

    pieces, generated, ended = [], 0, 0
    for index, temperature in enumerate(cfg.temperatures):
        windows = RandomBlocks(stream, cfg.prompt_tokens, cfg.samples_per_temperature, cfg.seed * 1_000 + index)
        prompts = [windows[i].tolist() for i in range(len(windows))]
        log.info("temperature %.2f: %d prompts of %d tokens", temperature, len(prompts), cfg.prompt_tokens)
        out = pipe.generate(prompts, max_new_tokens=cfg.new_tokens, temperature=temperature,
                            seed=cfg.seed * 1_000_003 + index * cfg.samples_per_temperature, progress=progress)
        for prompt, continuation in zip(prompts, out.token_ids):
            closed = bool(continuation) and continuation[-1] == eos
            ended, generated = ended + closed, generated + len(continuation)
            pieces.append(prompt + continuation + ([] if closed else [eos]))

    lengths = torch.tensor([0] + [len(p) for p in pieces])
    tokens = torch.tensor([t for p in pieces for t in p], dtype=torch.int32)
    report = {"format": FORMAT, "target": cfg.target, "vocab_size": len(tokenizer), "samples": len(pieces),
              "tokens": len(tokens), "generated_tokens": generated, "ended_with_eos": ended,
              "seconds": round(time.time() - started, 1), "config": asdict(cfg)}
    out_path = Path(cfg.output)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"tokens": tokens, "sample_offsets": lengths.cumsum(0)}, str(out_path),
              metadata={"dspark": json.dumps(report)})
    return report


def _same_checkpoint(a: str, b: str) -> bool:
    """Whether two target names (embedded names or directories) name the same checkpoint."""
    from dspark.models.loading import resolve_checkpoint

    return a == b or Path(resolve_checkpoint(a)).resolve() == Path(resolve_checkpoint(b)).resolve()


def load_regenerated(path, *, target: str, vocab_size: int) -> torch.Tensor:
    """The token stream ``[N]`` int64 of a ``dspark data regenerate`` file, checked against the
    target it will train a drafter for (the same name and vocabulary, ids in range)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"train_data {str(path)!r} does not exist; write it with "
                                "`dspark data regenerate --config configs/data/regenerate.yaml`")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("dspark", "{}"))
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a `dspark data regenerate` file (format {meta.get('format')!r}, "
                             f"expected {FORMAT!r})")
        tokens = f.get_tensor("tokens").long()
    if not _same_checkpoint(meta["target"], target) or meta["vocab_size"] != vocab_size:
        raise ValueError(f"{path} was written by target {meta['target']!r} (vocabulary {meta['vocab_size']}); "
                         f"this run trains for {target!r} (vocabulary {vocab_size})")
    if len(tokens) and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise ValueError(f"{path} holds token ids outside [0, {vocab_size})")
    return tokens
