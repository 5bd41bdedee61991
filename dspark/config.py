"""Config composition: YAML (or dict) + dotlist overrides, checked against structured schemas.

A config has seven sections — ``target``, ``drafter``, ``scheduler``, ``verifier``, ``sampler``,
``cache``, ``engine``. The schema of ``target`` and ``engine`` is fixed; the schema of each component section
is the ``config_class`` of the component it names (``name:`` or ``_target_:``), so every key is
checked against what that component accepts and a misspelled key is an error. A component
section may be written as a bare name: ``drafter: none`` means ``drafter: {name: none}``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dspark.engine import EngineConfig


class ConfigError(ValueError):
    """A config has an unknown section or key, or a value of the wrong type (the message says which)."""


@dataclass
class TargetConfig:
    """Config section ``target``.

    The model is the first of: ``build_pipeline(target_model=...)``, ``path``, ``random``, ``name``.

    Attributes:
        name: an embedded model shipped with dspark (``dspark-tiny``, the default).
        path: Hugging Face checkpoint directory of the target model.
        random: an architecture spec for a randomly initialised model (``model_type`` plus
            ``transformers`` config keys, and an optional ``seed``) — for tests and benchmarks.
        tokenizer: tokenizer directory, or ``bytes`` for a built-in byte-level tokenizer (256 byte
            tokens + EOS); ``null``: the target checkpoint's own tokenizer files when it has them,
            else none (token-id prompts only).
        backend: ``auto`` (native when the architecture allows), ``native`` or ``hf``.
        dtype: ``float32``, ``bfloat16``, ``float16`` or ``float64``.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1`` …
        trust_remote_code: allow ``transformers`` to run code shipped with the target's checkpoint and its
            tokenizer (off by default; a draft model has its own ``drafter.trust_remote_code``).
    """

    name: str | None = "dspark-tiny"
    path: str | None = None
    random: dict[str, Any] | None = None
    tokenizer: str | None = None
    backend: str = "auto"
    dtype: str = "float32"
    device: str = "auto"
    trust_remote_code: bool = False


SECTIONS = ("target", "drafter", "scheduler", "verifier", "sampler", "cache", "engine")
FIXED_SCHEMAS = {"target": TargetConfig, "engine": EngineConfig}


def _component_registries():
    from dspark.cache import CACHES
    from dspark.drafters import DRAFTERS
    from dspark.samplers import SAMPLERS
    from dspark.scheduling import SCHEDULERS
    from dspark.verifiers import VERIFIERS

    return {"drafter": DRAFTERS, "scheduler": SCHEDULERS, "verifier": VERIFIERS, "sampler": SAMPLERS, "cache": CACHES}


def config_dirs() -> list[Path]:
    """Where bare config names (``ar``, ``ngram`` …) are looked up: ``$DSPARK_CONFIG_PATH``, then the repo's ``configs/``."""
    dirs = [Path(p) for p in os.environ.get("DSPARK_CONFIG_PATH", "").split(os.pathsep) if p]
    return dirs + [Path(__file__).resolve().parent.parent / "configs"]


def find_config(name: str) -> Path | None:
    """``configs/<name>.yaml`` from :func:`config_dirs`, or ``None`` (then built-in defaults apply)."""
    for directory in config_dirs():
        if (directory / f"{name}.yaml").is_file():
            return directory / f"{name}.yaml"
    return None


def config_file(config) -> Path:
    """The YAML file ``config`` names: a file, or one under :func:`config_dirs` — by bare name
    (``ar``, ``bench/default``), within a directory (``bench/default.yaml``) or as a path from
    the repository (``configs/bench/default.yaml``) — so that commands find the shipped configs
    from any working directory. ``FileNotFoundError`` names it and where it was looked for."""
    given = Path(config)
    if given.is_file():
        return given
    if not given.is_absolute():
        for directory in config_dirs():
            inside = Path(*given.parts[1:]) if given.parts and given.parts[0] == directory.name else given
            for candidate in (directory / inside, directory / f"{inside}.yaml"):
                if candidate.is_file():
                    return candidate
    raise FileNotFoundError(f"config file {str(config)!r} not found (searched also: "
                            f"{', '.join(str(d) for d in config_dirs())})")


def _read(config) -> DictConfig:
    if isinstance(config, DictConfig):
        return config.copy()
    if isinstance(config, dict):
        return OmegaConf.create(config)
    if isinstance(config, (str, os.PathLike)):
        path = config_file(config)
        loaded = OmegaConf.load(path)
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
        return loaded
    raise TypeError(f"config must be a YAML path, a dict or a DictConfig, got {type(config).__name__}")


def load_config(config=None, overrides=()) -> DictConfig:
    """Compose and validate a config.

    Args:
        config: YAML path (or a bare name found in :func:`config_dirs`), dict, ``DictConfig`` or ``None``
            (all defaults).
        overrides: dotlist strings such as ``"drafter.num_speculative_tokens=5"``.

    Returns:
        A read-only ``DictConfig`` whose sections are typed by their schemas.

    Raises:
        ConfigError: unknown section or key (the message lists the allowed ones) or a badly typed value.
    """
    raw = _read(config) if config is not None else OmegaConf.create({})
    overrides = _override_list(overrides)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
    try:
        given = OmegaConf.from_dotlist([_named(item) for item in overrides])
        for section in SECTIONS:  # `drafter: ngram` is {name: ngram}: an override of one key keeps the name
            if isinstance(raw.get(section), str) and isinstance(given.get(section), DictConfig):
                raw[section] = {"name": raw[section]}
        for section in _switched_components(raw, given):  # another component: its own defaults, not the
            raw[section] = {}                             # last one's keys (drafter.path of a draft model…)
        raw = OmegaConf.merge(raw, given)
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot apply overrides {overrides}: {err}") from err

    unknown = [key for key in raw if key not in SECTIONS]
    if unknown:
        raise ConfigError(f"unknown config section(s) {unknown}; allowed sections: {', '.join(SECTIONS)}")

    registries = _component_registries()
    composed = {}
    for section in SECTIONS:
        value = raw.get(section)
        if isinstance(value, str):  # `drafter: none`
            value = OmegaConf.create({"name": value})
        if value is None:
            value = OmegaConf.create({})
        if not isinstance(value, DictConfig):
            raise ConfigError(f"config section {section!r} must be a mapping or a component name, got {value!r}")
        if section in FIXED_SCHEMAS:
            schema = FIXED_SCHEMAS[section]
        else:
            defaults = OmegaConf.structured(registries[section].base.config_class)
            name = value.get("name", defaults.get("name"))
            cls = registries[section].resolve(name, value.get("_target_"))
            schema = cls.config_class
            if "name" not in value and not value.get("_target_"):
                value.name = name
        composed[section] = _merge_section(section, schema, value)
    result = OmegaConf.create(composed)
    OmegaConf.set_readonly(result, True)
    return result


BARE_COMPONENT = re.compile(rf"^({'|'.join(s for s in SECTIONS if s not in FIXED_SCHEMAS)})=([A-Za-z_][\w.\-]*)$")
"""``drafter=ngram``: a component section switched by name alone."""


def _named(override: str) -> str:
    """``drafter=ngram`` as ``drafter.name=ngram``, so that key overrides of the same section
    (``drafter.num_speculative_tokens=3``) apply to it, before or after it — as one dotlist the two
    forms replaced each other, and whichever came last was silently all that remained."""
    match = BARE_COMPONENT.match(override)
    return f"{match[1]}.name={match[2]}" if match else override


def _override_list(overrides) -> list[str]:
    """``overrides`` as a list, refusing one string (it would be read character by character)."""
    if isinstance(overrides, str):
        raise ConfigError(f"overrides must be a list of section.key=value strings, got one string {overrides!r}: "
                          f"write [{overrides!r}]")
    return list(overrides)


def _component(value) -> tuple:
    """``(name, _target_)`` of a component section as written (a bare name, a mapping, or absent)."""
    if isinstance(value, str):
        return value, None
    if isinstance(value, DictConfig):
        return value.get("name"), value.get("_target_")
    return None, None


def _switched_components(raw: DictConfig, given: DictConfig) -> list[str]:
    """The component sections of ``raw`` whose component the overrides ``given`` replace by another
    (``drafter.name=ngram`` over a ``draft_model`` section): the overrides then apply to the new
    component's defaults alone — the old one's keys may mean nothing to it, or something else."""
    switched = []
    for section in SECTIONS:
        if section in FIXED_SCHEMAS or section not in raw or section not in given:
            continue
        old, new = _component(raw[section]), given[section]
        if isinstance(new, DictConfig) and ("name" in new or "_target_" in new):
            if (new.get("name", old[0]), new.get("_target_", old[1])) != old:
                switched.append(section)
    return switched


def _merge_section(section: str, schema: type, value: DictConfig) -> DictConfig:
    structured = OmegaConf.structured(schema)
    allowed = [f.name for f in fields(schema)]
    for key in value:
        if key not in allowed:
            raise ConfigError(f"unknown key {section}.{key} for {schema.__name__}; allowed keys: {', '.join(allowed)}")
    try:
        return OmegaConf.merge(structured, value)
    except OmegaConfBaseException as err:
        raise ConfigError(f"invalid value in section {section!r}: {err.msg if hasattr(err, 'msg') else err}") from err


def load_structured(schema: type, path=None, overrides=()):
    """A dataclass instance from a YAML file (or nothing) plus dotlist overrides, checked against
    ``schema``: unknown keys and badly typed values raise :class:`ConfigError` naming them.

    Used by the configs that are not pipelines (``dspark train``, ``dspark bench``, ``dspark data``).
    ``path``: as :func:`config_file` finds it.
    """
    user = OmegaConf.load(config_file(path)) if path else OmegaConf.create({})
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), user, OmegaConf.from_dotlist(_override_list(overrides)))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(f"invalid {schema.__name__}: {err}") from err


def section_object(cfg: DictConfig, section: str):
    """The dataclass instance of one composed section (what a component's constructor receives)."""
    return OmegaConf.to_object(cfg[section])


def to_yaml(cfg: DictConfig) -> str:
    """The composed config as YAML (for logs and reproducibility)."""
    return OmegaConf.to_yaml(cfg)


def check_output_file(name: str, path, what: str = "a file") -> None:
    """Refuse an output file path that cannot be written — a directory, or a path under a file —
    before any work is done (missing directories are created when it is written); ``name``: the
    setting or flag, ``what``: the file it should name."""
    given = Path(path)
    if given.is_dir():
        raise ValueError(f"{name} {str(path)!r} is a directory: name {what}")
    existing = next(p for p in given.parents if p.exists())
    if not existing.is_dir():
        raise ValueError(f"{name} {str(path)!r} cannot be written: {str(existing)!r} is a file, not a directory")


def check_output_dir(name: str, path) -> None:
    """Refuse an output directory path that is a file or lies under one, before any work is done
    (a missing directory is created when written)."""
    given = Path(path)
    existing = next(p for p in (given, *given.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"{name} {str(path)!r} must be a directory (created if missing), but {str(existing)!r} is a file")
