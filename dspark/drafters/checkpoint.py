"""Checkpoints of drafter networks that ride on a target (DSpark / DFlash block drafters, EAGLE-3
heads): ``config.json`` (the architecture under one key, plus the target it was trained for) and
``model.safetensors`` (the drafter's own weights; the target's embedding and LM head are shared,
never stored). Loading checks the checkpoint against the target before building anything."""

from __future__ import annotations

import difflib
import json
import logging
from dataclasses import MISSING, asdict, dataclass, fields
from numbers import Integral
from pathlib import Path
from typing import get_args, get_origin, get_type_hints

import torch
from torch import nn

from dspark.models.native import ModelArgs

log = logging.getLogger(__name__)

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
# the TargetShape fields checked on load (a checkpoint for another target is refused naming them)
CHECKED_FIELDS = ("hidden_size", "vocab_size", "num_heads", "num_kv_heads", "head_dim", "target_num_layers")
# the keys of a transformers config that decide its rotary embedding (drafters trained elsewhere
# are checked to rotate as their target does)
ROPE_KEYS = ("hidden_size", "num_attention_heads", "head_dim", "max_position_embeddings", "rope_theta", "rope_scaling",
             "rope_parameters", "partial_rotary_factor")


def read_foreign_config(directory, architectures: tuple[str, ...]) -> dict | None:
    """``config.json`` of ``directory`` when its ``architectures`` name one of ``architectures``
    (a drafter trained by another project), else ``None``."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except ValueError:
        return None
    named = config.get("architectures") if isinstance(config, dict) else None
    return config if isinstance(named, list) and any(a in architectures for a in named) else None


def joined_parts(tensors: dict[str, torch.Tensor], parts: dict[str, list[str]], where: str) -> dict[str, torch.Tensor]:
    """``{name: the tensors parts[name] names, concatenated along dim 0}`` (fused projections from
    separate ones); ``CheckpointError`` naming the pieces' shapes when they do not join."""
    from dspark.models.loading import CheckpointError

    joined = {}
    for name, pieces in parts.items():
        try:
            joined[name] = torch.cat([tensors[p] for p in pieces])
        except RuntimeError as err:
            shapes = ", ".join(f"{p} {tuple(tensors[p].shape)}" for p in pieces)
            raise CheckpointError(f"{where}: {shapes} do not join into {name} ({err})") from None
    return joined


def per_head_rows(norm: torch.Tensor, heads: int, name: str, where: str) -> torch.Tensor:
    """A q or k norm shared by the heads ``[D]`` as one row per head ``[heads, D]``."""
    from dspark.models.loading import CheckpointError

    if norm.dim() != 1:
        raise CheckpointError(f"{where}: {name} has shape {tuple(norm.shape)}, expected one weight per head dimension")
    return norm.expand(heads, -1)


def check_size(name: str, value, minimum: int = 1, why: str = "") -> None:
    """Raise ``ValueError`` naming ``name`` and the allowed range unless ``value`` is an integer
    (not a bool) of at least ``minimum``; ``why`` is said in parentheses."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{f' ({why})' if why else ''}, got {value!r}")


def rope_mismatch(config: dict, head_dim: int, target) -> str | None:
    """``None`` when the rotary embedding ``config`` (a ``transformers`` config dict) describes is
    the target's, else a description of it for an error message."""
    from transformers import LlamaConfig

    from dspark.models.native import rope_inverse_frequencies

    rope_config = LlamaConfig(**{k: config[k] for k in ROPE_KEYS if k in config})
    inv_freq, scaling = rope_inverse_frequencies(rope_config, head_dim)
    same = inv_freq.shape == target.inv_freq.shape and torch.allclose(inv_freq, target.inv_freq.cpu(), rtol=1e-6)
    if same and abs(scaling - target.attention_scaling) <= 1e-9:
        return None
    return f"rope {dict(rope_config.rope_parameters)} (not the target's rotary embedding)"


@dataclass(frozen=True)
class TargetShape:
    """The part of a drafter's architecture taken from its target (its layers have the target's
    width and head layout), recorded in the checkpoint to refuse one built for another target.

    Attributes:
        hidden_size, num_heads, num_kv_heads, head_dim, rms_norm_eps, qk_norm: the target's.
        vocab_size, target_num_layers: the target's vocabulary and depth.
    """

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    qk_norm: bool
    vocab_size: int
    target_num_layers: int

    @staticmethod
    def fields_of(target) -> dict:
        """These fields, read from a native ``target``."""
        t = target.args
        return dict(hidden_size=t.hidden_size, num_heads=t.num_heads, num_kv_heads=t.num_kv_heads, head_dim=t.head_dim,
                    rms_norm_eps=t.rms_norm_eps, qk_norm=t.qk_norm, vocab_size=t.vocab_size,
                    target_num_layers=t.num_layers)

    def check_target_layers(self, layers) -> None:
        """Raise ``ValueError`` naming the layer ids outside the target's depth."""
        bad = [i for i in layers if not 0 <= i < self.target_num_layers]
        if bad:
            raise ValueError(f"target_layers {bad} are outside the target's layers 0..{self.target_num_layers - 1}")

    def decoder_layer_args(self, model_type: str, intermediate_size: int, num_layers: int) -> ModelArgs:
        """Target-shaped decoder layers (for the drafter's own layers)."""
        return ModelArgs(model_type=model_type, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                         intermediate_size=intermediate_size, num_layers=num_layers, num_heads=self.num_heads,
                         num_kv_heads=self.num_kv_heads, head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps,
                         max_position_embeddings=0, qk_norm=self.qk_norm)

    def to_dict(self) -> dict:
        """JSON-ready (for the checkpoint's ``config.json``)."""
        data = asdict(self)
        if "target_layers" in data:
            data["target_layers"] = list(data["target_layers"])
        return data


def save_drafter(net: nn.Module, directory: str | Path, key: str, extra: dict | None = None) -> None:
    """Write ``config.json`` (``{key: net.args.to_dict(), **extra}``) and ``model.safetensors``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps({key: net.args.to_dict(), **(extra or {})}, indent=2) + "\n")
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, directory / WEIGHTS_FILE)


def read_drafter_spec(source, key: str) -> tuple[Path, dict]:
    """The checkpoint directory of ``source`` (directory or embedded name) and its ``config.json[key]``.

    Raises :class:`~dspark.models.CheckpointError` when the file is missing, unreadable, not a
    JSON object or holds another kind of drafter (naming the kinds it does hold)."""
    from dspark.models.loading import CheckpointError, resolve_checkpoint

    directory = Path(resolve_checkpoint(source))
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"drafter checkpoint {str(directory)!r} has no {CONFIG_FILE}")
    try:
        config = json.loads(path.read_text())
    except ValueError as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(config).__name__} {_clip(config)}")
    if key not in config:
        kinds = [k for k in config if isinstance(config[k], dict)]
        raise CheckpointError(f"{path} holds no {key!r} drafter (found: {kinds or 'none'})")
    if not isinstance(config[key], dict):
        raise CheckpointError(f"{path}: {key!r} must be a JSON object (the drafter's architecture), "
                              f"got {type(config[key]).__name__} {_clip(config[key])}")
    return directory, dict(config[key])


def read_drafter_args(source, key: str, args_class: type) -> tuple[Path, TargetShape]:
    """The checkpoint directory of ``source`` and the architecture ``args_class`` its
    ``config.json[key]`` holds (not yet validated). A hand-edited or damaged spec is refused
    before anything is built: :class:`~dspark.models.CheckpointError` naming the file, the
    missing and unknown keys (with a near miss), values of the wrong type and the allowed keys."""
    from dspark.models.loading import CheckpointError

    directory, spec = read_drafter_spec(source, key)
    hints = get_type_hints(args_class)
    required = [f.name for f in fields(args_class) if f.default is MISSING]
    optional = [f.name for f in fields(args_class) if f.default is not MISSING]
    missing = [k for k in required if k not in spec]
    problems = [f"missing keys {missing}"] if missing else []
    for name in spec:
        if name not in hints:
            close = difflib.get_close_matches(name, required + optional, n=1, cutoff=0.8)
            problems.append(f"unknown key {name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        elif not _json_fits(spec[name], hints[name]):
            problems.append(f"{name} must be {_json_kind(hints[name])}, got {_clip(spec[name])}")
    if problems:
        raise CheckpointError(f"{directory / CONFIG_FILE}: the {key!r} drafter architecture is invalid: "
                              + "; ".join(problems)
                              + f"; allowed keys: {', '.join(required)} (optional: {', '.join(optional)})")
    return directory, args_class(**{**spec, "target_layers": tuple(spec["target_layers"])})


def _json_fits(value, hint) -> bool:
    """Whether a ``config.json`` value suits a field annotated ``hint`` (a number for a float, a
    list for a tuple; a bool is no integer)."""
    if get_origin(hint) is tuple:
        return isinstance(value, list) and all(_json_fits(v, get_args(hint)[0]) for v in value)
    if not isinstance(hint, type):  # (an annotation this check does not know: left to validate())
        return True
    if isinstance(value, bool):
        return hint is bool
    return isinstance(value, (int, float) if hint is float else hint)


def _json_kind(hint) -> str:
    if get_origin(hint) is tuple:
        return "a list of integers"  # (the only tuples: layer ids)
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(hint, str(hint))


def _clip(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_fits_target(args: TargetShape, target, directory) -> None:
    """Raise ``ValueError`` naming every checked field where ``args`` (a drafter's) and ``target`` differ."""
    expected = TargetShape.fields_of(target)
    wrong = [f"{field} {getattr(args, field)} (target: {expected[field]})" for field in CHECKED_FIELDS
             if getattr(args, field) != expected[field]]
    if wrong:
        raise ValueError(f"drafter checkpoint {str(directory)!r} was trained for another target: " + ", ".join(wrong))


def target_identity(target, samples: int = 1024) -> str | None:
    """The target's :func:`~dspark.models.fingerprint.weights_fingerprint` whatever dtype it is
    loaded in (the dtype a model is served in does not change which model it is), different for
    another training run of the same shape; recorded in a drafter checkpoint (``target_identity``).
    ``None`` for a target whose weights are not loaded (on the meta device)."""
    from dspark.models.fingerprint import weights_fingerprint

    return weights_fingerprint(target, samples, any_dtype=True)


def checkpoint_args(source, key: str, args_class: type, target):
    """The architecture ``args_class`` of the dspark drafter checkpoint ``source`` (``config.json[key]``),
    checked against ``target`` (``ValueError`` naming what differs) and validated. A checkpoint
    that records the identity of the target it was trained for (:func:`target_identity`) and
    another target of the same shape gets a warning: decoding stays lossless, but the drafts
    were learnt from another model's distributions (a base model's drafter on its instruct
    variant, say) and are accepted less."""
    from dspark.models.loading import CheckpointError

    directory, args = read_drafter_args(source, key, args_class)
    check_fits_target(args, target, directory)
    recorded = json.loads((directory / CONFIG_FILE).read_text()).get("target_identity")
    if isinstance(recorded, str) and recorded != (target_identity(target) or recorded):
        log.warning("drafter checkpoint %r was trained for another target of the same shape (its target_identity "
                    "differs from this target's): decoding stays lossless, but expect fewer drafts accepted",
                    str(directory))
    try:
        return args.validate()
    except ValueError as err:
        raise CheckpointError(f"{directory / CONFIG_FILE}: {err}") from None


def drafter_network(kind: str, net_class: type, load, build, *, target, draft_model, path, requested=None):
    """The network a target-reading drafter runs: ``draft_model`` when it already is one, else the
    checkpoint ``draft_model`` or ``path`` names (``load(source, target)``), else ``build()`` (random init).

    ``requested`` holds the architecture keys the drafter config sets (``None`` = not set): they
    shape a random network; a trained one brings its own, and one that contradicts them is refused
    (``ValueError`` naming the key, both values and what to do) rather than silently ignored.
    Raises ``TypeError`` when the target cannot return hidden states (not a native model)."""
    if not hasattr(target, "cache_shape"):
        raise TypeError(f"the {kind} drafter needs a native target (Llama / Qwen2 / Qwen3) for its hidden states")
    if isinstance(draft_model, net_class):
        net, source = draft_model, "the network passed as draft_model"
    elif draft_model is not None or path is not None:
        source = draft_model if draft_model is not None else path
        net = load(source, target)
        source = f"the checkpoint {str(source)!r}"
    else:
        return build()
    for key, value in (requested or {}).items():
        actual = getattr(net.args, key)
        wanted = tuple(value) if isinstance(value, (list, tuple)) else value
        if value is not None and wanted != actual:
            raise ValueError(f"drafter.{key}={_show(value)} contradicts {source}, which has {key}={_show(actual)}: "
                             f"architecture keys build a randomly initialised {kind} drafter (drafter.path=null); "
                             "drop the key, or load a checkpoint built that way")
    return net


def equal_at_coarser_precision(copy: torch.Tensor, own: torch.Tensor) -> bool:
    """Whether ``copy`` (a checkpoint's copy of a target tensor) equals ``own`` once both are rounded
    to the coarser of their two dtypes (a bfloat16 copy of a float32 target is its rounding)."""
    own = own.detach()
    coarser = max(copy.dtype, own.dtype, key=lambda d: torch.finfo(d).eps)
    return copy.shape == own.shape and torch.equal(copy.to(own.device, coarser), own.to(coarser))


def _show(value) -> str:
    return repr(list(value)) if isinstance(value, tuple) else repr(value)


def load_weights(net: nn.Module, directory: Path) -> nn.Module:
    """Fill ``net`` from ``directory/model.safetensors``; a missing or mis-shaped tensor is named."""
    from dspark.models.loading import CheckpointError, read_checkpoint_tensors

    tensors = read_checkpoint_tensors(directory)
    expected = net.state_dict()
    missing = sorted(set(expected) - set(tensors))
    misshaped = [f"{k}: expected {tuple(v.shape)}, found {tuple(tensors[k].shape)}"
                 for k, v in expected.items() if k in tensors and tensors[k].shape != v.shape]
    if missing or misshaped:
        raise CheckpointError(f"drafter checkpoint {str(directory)!r} does not match its config: "
                              f"missing {missing} {'; '.join(misshaped)}")
    with torch.no_grad():
        net.load_state_dict({k: tensors[k] for k in expected})
    return net
