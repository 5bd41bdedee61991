"""Per-position maps that a drafter applies to its confidences, ``c_k ← σ(logit(c_k) / T_k + b_k)``
(Sequential Temperature Scaling, ``b = 0``, or sequential Platt scaling: fitted by ``dspark
calibrate``, :mod:`dspark.scheduling.recipes`), read from ``calibration.json`` beside the drafter's
checkpoint or from a file the config names.

File layout: ``{"temperatures": [...], "biases": [...], "greedy": {"temperatures": [...],
"biases": [...]}, "drafter": "dspark"}``. The top-level map applies when sampling; the ``greedy`` one
at temperature 0, where acceptance is a different event (the draft equals the target's argmax) —
without it the top-level map applies to both; without a top-level map sampled confidences stay raw.
``biases`` may be left out (STS). ``drafter`` (written by ``dspark calibrate``) names the drafter the
maps were fitted for: another drafter refuses the file (however it is built); one without it applies to any.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from dspark.scheduling.calibration import apply_temperatures

CALIBRATION_FILE = "calibration.json"
Map = tuple[torch.Tensor, torch.Tensor]  # (temperatures [γ], biases [γ]) float64


@dataclass
class Calibration:
    """The maps of one calibration file, each ``(temperatures [γ], biases [γ])`` or ``None`` (raw).

    Attributes:
        sampled: applied when sampling (temperature > 0).
        greedy: applied at temperature 0.
        drafter: the drafter the maps were fitted for (``None``: the file does not say); path: the file.
    """

    sampled: Map | None
    greedy: Map | None
    drafter: str | None = None
    path: str | None = None

    def check_drafter(self, name: str) -> None:
        """Refuse to calibrate drafter ``name`` with maps fitted for another one."""
        if self.drafter is not None and self.drafter != name:
            raise ValueError(f"{self.path}: its confidence maps were fitted for drafter {self.drafter!r}, not for "
                             f"this {name!r} drafter (each drafter needs its own: `dspark calibrate --config {name} "
                             "--output FILE` fits one; drafter.calibration=null keeps the raw confidences)")

    def apply(self, confidence: torch.Tensor, start: int, stop: int, params) -> torch.Tensor:
        """Calibrated confidences of positions ``start+1..stop`` ``[B, stop − start]`` (same dtype),
        each request's by the map of its decoding (``params``: the batch's sampling settings; greedy
        and sampled requests may share a batch)."""
        if params.greedy_rows is not None:
            return torch.where(params.greedy_rows.unsqueeze(1), self._mapped(confidence, start, stop, self.greedy),
                               self._mapped(confidence, start, stop, self.sampled))
        return self._mapped(confidence, start, stop, self.greedy if params.greedy else self.sampled)

    @staticmethod
    def _mapped(confidence: torch.Tensor, start: int, stop: int, chosen: Map | None) -> torch.Tensor:
        if chosen is None:
            return confidence
        temperatures, biases = chosen
        return apply_temperatures(confidence, temperatures[start:stop], biases[start:stop]).to(confidence.dtype)

    @property
    def positions(self) -> int:
        """The draft positions every map covers."""
        return min(len(m[0]) for m in (self.sampled, self.greedy) if m is not None)

    def to(self, device) -> "Calibration":
        move = lambda m: None if m is None else (m[0].to(device), m[1].to(device))  # noqa: E731
        sampled = move(self.sampled)
        return replace(self, sampled=sampled, greedy=sampled if self.greedy is self.sampled else move(self.greedy))


def _read_map(entry, path, positions: int, where: str) -> Map:
    temperatures, biases = entry.get("temperatures"), entry.get("biases")
    number = lambda t: isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t)  # noqa: E731
    if not isinstance(temperatures, list) or len(temperatures) < positions or not all(
            number(t) and t > 0 for t in temperatures):
        raise ValueError(f"{path}: expected at least {positions} positive temperatures (one per draft position)"
                         f"{where}, got {temperatures}")
    if biases is None:
        biases = [0.0] * len(temperatures)
    if not isinstance(biases, list) or len(biases) != len(temperatures) or not all(number(b) for b in biases):
        raise ValueError(f"{path}: expected {len(temperatures)} finite biases (one per temperature){where}, "
                         f"got {biases}")
    return torch.tensor(temperatures, dtype=torch.float64), torch.tensor(biases, dtype=torch.float64)


def load_calibration(path, positions: int) -> Calibration:
    """The maps of a calibration file, checked: at least ``positions`` positive temperatures per
    map, as many finite biases (if given). Positions past ``positions`` are kept, never read."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read confidence temperatures from {str(path)!r}: {err}") from err
    greedy = data.get("greedy") if isinstance(data, dict) else None
    if not isinstance(data, dict) or ("temperatures" not in data and not isinstance(greedy, dict)):
        raise ValueError(f"cannot read confidence temperatures from {str(path)!r}: no 'temperatures' "
                         "(and no 'greedy' entry with them)")
    sampled = _read_map(data, path, positions, "") if "temperatures" in data else None
    if greedy is not None and not isinstance(greedy, dict):
        raise ValueError(f"{path}: 'greedy' must be an object with 'temperatures' (and 'biases'), got {greedy!r}")
    drafter = data.get("drafter", (greedy or {}).get("drafter"))  # (a file with a greedy map alone records it there)
    if drafter is not None and not isinstance(drafter, str):
        raise ValueError(f"{path}: 'drafter' must be the name of the drafter the maps were fitted for, got {drafter!r}")
    return Calibration(sampled, _read_map(greedy, path, positions, " in 'greedy'") if greedy is not None else sampled,
                       drafter, str(path))


def find_calibration(source: str | None, checkpoint, positions: int, device=None, *,
                     drafter: str) -> Calibration | None:
    """The calibration a drafter's ``calibration`` key asks for, on ``device``: ``None`` keeps the
    raw confidences; ``"auto"`` reads ``calibration.json`` beside ``checkpoint`` (a directory or
    embedded name; a network passed in memory has none) when there is one that covers
    ``positions`` (one fitted at a smaller γ is skipped with a warning); any other string is a
    file to read, which must cover them. A file fitted for a drafter other than ``drafter`` (the
    asking drafter's config name) is refused (:meth:`Calibration.check_drafter`)."""
    from dspark.models.loading import resolve_checkpoint

    if source is None:
        return None
    if source == "auto":
        if not isinstance(checkpoint, (str, Path)):
            return None
        source = Path(resolve_checkpoint(checkpoint)) / CALIBRATION_FILE
        if not source.is_file():
            return None
        calibration = load_calibration(source, 1)
    else:
        calibration = load_calibration(source, positions)  # (a file named must cover them)
    calibration.check_drafter(drafter)
    if calibration.positions < positions:  # found beside the checkpoint, fitted at a smaller γ: not the user's error
        warnings.warn(f"{source} calibrates {calibration.positions} draft positions, fewer than the {positions} "
                      f"drafted: the confidences stay raw (run `dspark calibrate` at this γ, or name a file with "
                      f"drafter.calibration)", stacklevel=2)
        return None
    return calibration.to(device)
