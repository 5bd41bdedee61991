"""``dspark data build``: corpus → tokenizer → prompt sets → manifest, into the package assets."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from dspark.config import load_structured
from dspark.data.corpus import build_corpus, corpus_manifest
from dspark.data.eval_sets import build_eval_sets, write_jsonl
from dspark.data.tokenizer import train_tokenizer

log = logging.getLogger(__name__)


@dataclass
class CorpusConfig:
    """How the stdlib corpus is cut (see :mod:`dspark.data.corpus`); ``root``: the library to read
    (default: the running Python's standard library)."""

    root: str | None = None
    validation_percent: int = 5
    test_percent: int = 5
    min_docstring_chars: int = 200

    def __post_init__(self):
        for name in ("validation_percent", "test_percent", "min_docstring_chars"):
            if getattr(self, name) < 0:
                raise ValueError(f"corpus.{name} must be >= 0, got {getattr(self, name)}")
        if self.validation_percent + self.test_percent >= 100:  # (the train split would be empty)
            raise ValueError(f"corpus.validation_percent + corpus.test_percent must be below 100 (the rest is the "
                             f"train split), got {self.validation_percent} + {self.test_percent}")


@dataclass
class DataBuildConfig:
    """Config of ``dspark data build`` (``configs/data/stdlib.yaml``)."""

    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    vocab_size: int = 4096
    prompts_per_domain: int = 100
    calibration_prompts: int = 120
    tokenizer_dir: str = "dspark/assets/dspark-tiny/tokenizer"
    eval_dir: str = "dspark/assets/eval"
    manifest: str = "dspark/assets/dspark-tiny/manifest.json"

    def __post_init__(self):  # (each was met only once the corpus was built, or not at all)
        if not 512 <= self.vocab_size <= 65536:
            raise ValueError(f"vocab_size must be in [512, 65536], got {self.vocab_size}")
        for name in ("prompts_per_domain", "calibration_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def load_data_config(path=None, overrides=()) -> DataBuildConfig:
    """Structured config: unknown keys are errors."""
    return load_structured(DataBuildConfig, path, overrides)


def build_data(cfg: DataBuildConfig) -> dict:
    """Build and write the tokenizer, the prompt sets and the manifest; return the manifest."""
    documents = build_corpus(**vars(cfg.corpus))
    log.info("corpus: %d documents", len(documents))
    tokenizer = train_tokenizer((d.text for d in documents if d.split == "train"), cfg.vocab_size)
    tokenizer.save_pretrained(cfg.tokenizer_dir)
    sets = build_eval_sets(documents, tokenizer, per_domain=cfg.prompts_per_domain, calibration=cfg.calibration_prompts)
    for name, records in sets.items():
        write_jsonl(records, Path(cfg.eval_dir) / f"{name}.jsonl")
    manifest = {"corpus": corpus_manifest(documents), "tokenizer": {"vocab_size": len(tokenizer), "eos_id": tokenizer.eos_token_id,
                "pad_id": tokenizer.pad_token_id, "mask_id": tokenizer.mask_token_id},
                "prompt_sets": {name: len(records) for name, records in sets.items()}}
    path = Path(cfg.manifest)
    previous = json.loads(path.read_text()) if path.is_file() else {}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**previous, **manifest}, indent=2) + "\n")
    return manifest
