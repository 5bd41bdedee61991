"""Checkpoints of drafter networks that ride on a target (DSpark / DFlash block drafters, EAGLE-3
heads): ``config.json`` (the architecture under one key, plus the target it was trained for) and
``model.safetensors`` (the drafter's own weights; the target's embedding and LM head are shared,
never stored). Loading checks the checkpoint against the target before building anything."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
# architecture fields every drafter records from its target, checked on load
TARGET_FIELDS = {"hidden_size": "hidden_size", "vocab_size": "vocab_size", "num_heads": "num_heads",
                 "num_kv_heads": "num_kv_heads", "head_dim": "head_dim", "target_num_layers": "num_layers"}


def save_drafter(net: nn.Module, directory: str | Path, key: str, extra: dict | None = None) -> None:
    """Write ``config.json`` (``{key: net.args.to_dict(), **extra}``) and ``model.safetensors``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps({key: net.args.to_dict(), **(extra or {})}, indent=2) + "\n")
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, directory / WEIGHTS_FILE)


def read_drafter_spec(source, key: str) -> tuple[Path, dict]:
    """The checkpoint directory of ``source`` (directory or embedded name) and its ``config.json[key]``.

    Raises :class:`~dspark.models.CheckpointError` when the file is missing, unreadable or holds
    another kind of drafter (naming the kinds it does hold)."""
    from dspark.models.loading import CheckpointError, resolve_checkpoint

    directory = Path(resolve_checkpoint(source))
    if not (directory / CONFIG_FILE).is_file():
        raise CheckpointError(f"drafter checkpoint {str(directory)!r} has no {CONFIG_FILE}")
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
    except ValueError as err:
        raise CheckpointError(f"cannot read {directory / CONFIG_FILE}: {err}") from err
    if key not in config:
        kinds = [k for k in config if isinstance(config[k], dict)]
        raise CheckpointError(f"{directory / CONFIG_FILE} holds no {key!r} drafter (found: {kinds or 'none'})")
    return directory, dict(config[key])


def check_fits_target(args, target, directory) -> None:
    """Raise ``ValueError`` naming every field where ``args`` (a drafter's) and ``target`` differ."""
    t = target.args
    wrong = [f"{field} {getattr(args, field)} (target: {getattr(t, name)})" for field, name in TARGET_FIELDS.items()
             if getattr(args, field) != getattr(t, name)]
    if wrong:
        raise ValueError(f"drafter checkpoint {str(directory)!r} was trained for another target: " + ", ".join(wrong))


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
