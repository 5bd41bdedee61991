"""The target's measured cost curve: verification steps per second against the number of tokens
in the verify forward, SPS(B). The hardware-aware scheduler reads it; ``profile_target`` measures
it on this machine, and it is saved as a small JSON cost table with what it was measured for."""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch


@dataclass
class ThroughputProfile:
    """SPS(B) at measured token counts, with linear interpolation between them and constant
    *time per token* beyond the largest (SPS(B) = SPS(B_max) · B_max / B).

    Attributes:
        token_counts: increasing token counts ``B`` (≥ 1) that were measured.
        steps_per_second: verify forwards per second at each count.
        model, dtype, device, threads, context_length: what the table was measured for; a table for
            another model or dtype is refused by :meth:`check_matches`.
    """

    token_counts: list[int]
    steps_per_second: list[float]
    model: str = ""
    dtype: str = ""
    device: str = ""
    threads: int = 0
    context_length: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        counts, sps = list(self.token_counts), list(self.steps_per_second)
        if not counts or len(counts) != len(sps):
            raise ValueError(f"a throughput profile needs equally many token counts and steps/s values, got "
                             f"{len(counts)} and {len(sps)}")
        if any(b < 1 for b in counts) or any(b2 <= b1 for b1, b2 in zip(counts, counts[1:])):
            raise ValueError(f"token_counts must be increasing integers >= 1, got {counts}")
        if any(not s > 0 for s in sps):
            raise ValueError(f"steps_per_second must be positive, got {sps}")
        self._tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # not a field: never saved

    def sps(self, tokens: torch.Tensor) -> torch.Tensor:
        """SPS at token counts ``tokens`` (any shape, on any device) → float64, same shape."""
        return interpolate_sps(tokens, *self.table(tokens.device))

    def table(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The measured counts and steps/s as float64 ``[N]`` tensors on ``device``, built once per
        device (a round's scheduling copies nothing from the host)."""
        device = torch.device(device)
        key = str(device)
        if key not in self._tables:
            self._tables[key] = (torch.tensor(self.token_counts, dtype=torch.float64, device=device),
                                 torch.tensor(self.steps_per_second, dtype=torch.float64, device=device))
        return self._tables[key]

    def check_matches(self, model: str, dtype: str) -> None:
        """Raise ``ValueError`` when the table was measured for another model or dtype."""
        wrong = [f"{name} {mine!r} (this run: {theirs!r})" for name, mine, theirs in
                 (("model", self.model, model), ("dtype", self.dtype, dtype)) if mine and theirs and mine != theirs]
        if wrong:
            raise ValueError("the throughput profile was measured for another set-up: " + ", ".join(wrong)
                             + "; measure it again with `dspark profile`")

    def save(self, path: str | Path) -> None:
        """Write the table as JSON."""
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ThroughputProfile":
        """Read a table written by :meth:`save` (plain JSON; nothing is executed)."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read the throughput profile {str(path)!r}: {err}") from err
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown throughput-profile keys {sorted(unknown)}")
        return cls(**data)


def interpolate_sps(tokens: torch.Tensor, counts: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """SPS at token counts ``tokens`` (any shape) from a table of measured ``counts`` and steps/s
    ``values`` (float64 ``[N]``, counts increasing) → float64, same shape as ``tokens``: linear
    between measured counts, SPS(counts[0]) below them, constant time per token beyond them."""
    b = tokens.double()
    inside_b = b.clamp(counts[0], counts[-1])
    if counts.numel() == 1:
        inside = values.expand_as(b)
    else:
        upper = torch.searchsorted(counts, inside_b).clamp(1, counts.numel() - 1)
        lo, hi = counts[upper - 1], counts[upper]
        w = ((inside_b - lo) / (hi - lo)).clamp(0, 1)
        inside = values[upper - 1] * (1 - w) + values[upper] * w
    beyond = values[-1] * counts[-1] / b.clamp(min=1.0)
    return torch.where(b > counts[-1], beyond, inside)


def profile_target(target, token_counts=(1, 2, 4, 8, 16, 32, 64), *, context_length: int = 256, repeats: int = 5,
                   model_name: str = "") -> ThroughputProfile:
    """Measure SPS(B) of ``target``'s verify forward: ``B`` new tokens spread over ``B`` requests of
    one token each (the decode-time shape of a batch), each attending to ``context_length`` cached
    positions; the median of ``repeats`` timed forwards after a warm-up."""
    from dspark.cache import StaticKVCache

    device = target.device
    sps = []
    with torch.inference_mode():
        for count in token_counts:
            cache = StaticKVCache.for_model(target, count, context_length + 1)
            tokens = torch.randint(3, target.vocab_size, (count, 1), device=device)
            times = []
            for i in range(repeats + 1):
                cache.reset()
                cache.advance(torch.full((count,), context_length, device=device))
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                target(tokens, cache, kv_len=context_length + 1)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i:
                    times.append(time.perf_counter() - start)
            sps.append(1.0 / sorted(times)[len(times) // 2])
    return ThroughputProfile(list(token_counts), sps, model=model_name, dtype=str(target.dtype).removeprefix("torch."),
                             device=str(device), threads=torch.get_num_threads(), context_length=context_length,
                             extra={"machine": platform.processor() or platform.machine()})
