"""Per-position confidence temperatures that a drafter applies to its confidences (Sequential
Temperature Scaling, fitted by ``dspark calibrate``: :mod:`dspark.scheduling.recipes`), read from
``calibration.json`` beside the drafter's checkpoint or from a file the config names."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CALIBRATION_FILE = "calibration.json"


def load_calibration(path, positions: int) -> torch.Tensor:
    """The first ``positions`` temperatures ``[positions]`` (float64) of a calibration file (JSON
    ``{"temperatures": [...]}``, one per draft position), checked: at least ``positions`` of them,
    all positive."""
    try:
        temperatures = json.loads(Path(path).read_text())["temperatures"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"cannot read confidence temperatures from {str(path)!r}: {err}") from err
    if not isinstance(temperatures, list) or len(temperatures) < positions or not all(
            isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0 for t in temperatures):
        raise ValueError(f"{path}: expected at least {positions} positive temperatures (one per draft position), "
                         f"got {temperatures}")
    return torch.tensor(temperatures[:positions], dtype=torch.float64)


def find_calibration(source: str | None, checkpoint, positions: int, device=None) -> torch.Tensor | None:
    """The temperatures ``[positions]`` a drafter's ``calibration`` key asks for, on ``device``:
    ``None`` keeps the raw confidences; ``"auto"`` reads ``calibration.json`` beside ``checkpoint``
    (a directory or embedded name; a network passed in memory has none) when there is one; any
    other string is a file to read."""
    from dspark.models.loading import resolve_checkpoint

    if source is None:
        return None
    if source == "auto":
        if not isinstance(checkpoint, (str, Path)):
            return None
        source = Path(resolve_checkpoint(checkpoint)) / CALIBRATION_FILE
        if not source.is_file():
            return None
    return load_calibration(source, positions).to(device)
