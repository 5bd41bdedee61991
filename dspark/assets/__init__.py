"""Files shipped inside the package: the embedded tokenizer and models, and the prompt sets.

Models are found by name: ``resolve_model("dspark-tiny")`` is the target checkpoint directory,
``resolve_model("dspark-tiny-draft")`` its distilled draft model (both ordinary Hugging Face
checkpoint directories: ``config.json``, ``model.safetensors``, tokenizer files), and
``dspark-tiny-dspark`` / ``dspark-tiny-dspark-rnn`` / ``dspark-tiny-dflash`` the block drafters
and ``dspark-tiny-eagle3`` the EAGLE-3 head trained for it (``config.json`` + ``model.safetensors``, no tokenizer of their own).
"""

from __future__ import annotations

import json
from pathlib import Path

ASSETS = Path(__file__).resolve().parent
EMBEDDED_MODELS = {"dspark-tiny": "dspark-tiny/target", "dspark-tiny-draft": "dspark-tiny/draft",
                   "dspark-tiny-dspark": "dspark-tiny/dspark", "dspark-tiny-dspark-rnn": "dspark-tiny/dspark-rnn",
                   "dspark-tiny-dflash": "dspark-tiny/dflash", "dspark-tiny-eagle3": "dspark-tiny/eagle3"}
BLOCK_DRAFTERS = ("dspark-tiny-dspark", "dspark-tiny-dspark-rnn", "dspark-tiny-dflash")
TARGET_DRAFTERS = (*BLOCK_DRAFTERS, "dspark-tiny-eagle3")  # heads that read the target's hidden states
PROMPT_SETS = ("code", "prose", "calibration")
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
DRAFTER_FILES = ("config.json", "model.safetensors")  # block drafters use the target's tokenizer


class MissingAssetError(FileNotFoundError):
    """A shipped file is missing or unreadable (the message names it)."""


def resolve_model(name: str) -> Path:
    """The checkpoint directory of an embedded model; raises if a required file is missing."""
    if name not in EMBEDDED_MODELS:
        raise KeyError(f"unknown embedded model {name!r}; embedded models: {', '.join(EMBEDDED_MODELS)}")
    path = ASSETS / EMBEDDED_MODELS[name]
    for file in (DRAFTER_FILES if name in TARGET_DRAFTERS else MODEL_FILES):
        if not (path / file).is_file():
            raise MissingAssetError(f"embedded model {name!r} is incomplete: {path / file} is missing "
                                    "(reinstall dspark, or rebuild it with `dspark train` — see docs)")
    return path


def is_embedded_name(name: str | None) -> bool:
    """Whether ``name`` names an embedded model (rather than a path)."""
    return name in EMBEDDED_MODELS


def prompt_set_path(name: str) -> Path:
    """The JSONL file of a shipped prompt set (``code``, ``prose`` or ``calibration``)."""
    if name not in PROMPT_SETS:
        raise KeyError(f"unknown prompt set {name!r}; shipped sets: {', '.join(PROMPT_SETS)}")
    path = ASSETS / "eval" / f"{name}.jsonl"
    if not path.is_file():
        raise MissingAssetError(f"prompt set {name!r} is missing: {path}")
    return path


def manifest() -> dict:
    """The corpus/tokenizer/training record of the embedded models (``dspark-tiny/manifest.json``)."""
    path = ASSETS / "dspark-tiny" / "manifest.json"
    if not path.is_file():
        raise MissingAssetError(f"{path} is missing")
    return json.loads(path.read_text())
