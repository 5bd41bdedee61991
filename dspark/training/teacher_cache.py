"""The frozen target's outputs over training sequences, cached on disk for reuse.

Training a drafter runs the frozen target over every training sequence to get the hidden states
it conditions on and the distributions it learns to match. Runs on the same data with the same
seed see the same sequences — the drafters of an ablation (DSpark with either head, DFlash,
EAGLE-3), a resumed run, every validation pass — so the target's pass can be computed once and
read back afterwards (``teacher_cache.dir`` in a ``drafter`` training config).

One entry per sequence, keyed by the SHA-256 of its token ids, in a safetensors file holding the
outputs of the cached decoder layers ``[T, H]`` each. The last layer is always among them: the
target's logits are recomputed from it with the target's own final norm and LM head
(:meth:`~dspark.models.native.NativeCausalLM.logits_of`), ``H`` numbers a position instead of ``V``.
Stored in float32 an entry gives back exactly what the target computed, so a run that reads the
cache trains the same weights as one that runs the target; bfloat16 halves the disk and rounds the
features. ``meta.json`` records the target (architecture and a fingerprint of its weights), the
layers, the dtype and the training precision; a run with another target, precision or dtype, or
that needs a layer the cache lacks, is refused before any work, naming what differs.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from dspark.drafters.checkpoint import TargetShape
from dspark.models.fingerprint import weights_fingerprint

FORMAT = 1
META_FILE = "meta.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

#: ``compute(tokens [B, T], layers) -> (hidden states [B, T, H] per layer, logits [B, T, V])``
TargetPass = Callable[[torch.Tensor, tuple[int, ...]], tuple[list[torch.Tensor], torch.Tensor]]


@dataclass
class TeacherCacheConfig:
    """Config section ``teacher_cache`` of a ``drafter`` training run.

    Attributes:
        dir: the cache directory (created if missing; ``null`` = no cache: the target runs on every
            batch). Reuse it for every run with the same target, data and precision.
        dtype: ``float32`` (exact: reading the cache trains the same weights as running the target)
            or ``bfloat16`` (half the disk; the cached features are rounded).
    """

    dir: str | None = None
    dtype: str = "float32"

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"teacher_cache.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


def target_fingerprint(target, samples: int = 4096) -> str:
    """The target's :func:`~dspark.models.fingerprint.weights_fingerprint`, dtypes included (cached
    outputs computed in one dtype are not another's)."""
    return weights_fingerprint(target, samples)


def sequence_key(tokens: torch.Tensor) -> str:
    """The cache key of one sequence ``[T]`` of token ids: SHA-256 of its int64 bytes."""
    return hashlib.sha256(tokens.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()).hexdigest()


class TeacherCache:
    """Reads and writes the target's outputs per training sequence (see the module docstring).

    Args:
        directory: the cache directory.
        target: the frozen native target (its weights are fingerprinted; its final norm and LM
            head turn the cached last layer into logits).
        layers: the target layers a run needs; the cache also keeps the last one.
        dtype: ``float32`` or ``bfloat16`` (stored features).
        precision: the training precision (e.g. ``bf16-mixed``): the target's outputs depend on it.
    """

    def __init__(self, directory: str | Path, target, *, layers, dtype: str = "float32", precision: str):
        TeacherCacheConfig(dir=str(directory), dtype=dtype)  # validates dtype
        self.directory = Path(directory)
        self.target = target
        self.dtype = DTYPES[dtype]
        self.last_layer = target.num_layers - 1
        wanted = {
            "format": FORMAT,
            "target": {**TargetShape.fields_of(target), "fingerprint": target_fingerprint(target)},
            "layers": sorted({int(i) for i in layers} | {self.last_layer}),
            "dtype": dtype,
            "precision": precision,
        }
        meta_path = self.directory / META_FILE
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            self._check(meta, wanted, layers)
        else:
            self.directory.mkdir(parents=True, exist_ok=True)
            _write_atomically(meta_path, (json.dumps(wanted, indent=2) + "\n").encode())
            meta = wanted
        self.layers: tuple[int, ...] = tuple(meta["layers"])  # what every entry holds
        self.hits = self.misses = 0

    def _check(self, meta: dict, wanted: dict, layers) -> None:
        """Refuse a cache written for another target, precision or dtype, or lacking a needed layer."""
        where = f"teacher cache {str(self.directory)!r}"
        if meta.get("format") != FORMAT:
            raise ValueError(f"{where} has format {meta.get('format')!r}; this version reads format {FORMAT}")
        for key in ("dtype", "precision"):
            if meta.get(key) != wanted[key]:
                raise ValueError(f"{where} was written with {key} {meta.get(key)!r}, this run uses {wanted[key]!r}; "
                                 "use another directory (or delete this one)")
        stored, target = meta.get("target", {}), wanted["target"]
        differ = [k for k in target if stored.get(k) != target[k]]
        if differ:
            detail = ", ".join(f"{k}: {stored.get(k)!r} there, {target[k]!r} here" for k in differ if k != "fingerprint")
            if "fingerprint" in differ:
                detail = (detail + "; " if detail else "") + "the weights differ"
            raise ValueError(f"{where} was written for another target ({detail}); use another directory "
                             "(or delete this one)")
        missing = sorted({int(i) for i in layers} - set(meta.get("layers", [])))
        if missing:
            raise ValueError(f"{where} holds target layers {meta.get('layers')}, this run needs {missing} too; "
                             "use another directory for this set of layers")

    def entry_path(self, key: str) -> Path:
        """The file of the sequence with key ``key`` (:func:`sequence_key`)."""
        return self.directory / "entries" / key[:2] / f"{key}.safetensors"

    def fetch(self, tokens: torch.Tensor, layers, compute: TargetPass) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The target's outputs over ``tokens`` ``[B, T]``: hidden states ``[B, T, H]`` (float32) of
        ``layers`` and logits ``[B, T, V]`` (float32). Read from the cache when every sequence is
        there; otherwise ``compute`` runs on the whole batch (so a batch's numbers never depend on
        what was cached) and the missing sequences are written."""
        keys = [sequence_key(row) for row in tokens]
        paths = [self.entry_path(k) for k in keys]
        present = [p.is_file() for p in paths]
        if all(present):
            rows = [self._read(p, tokens.device) for p in paths]
            by_layer = {i: torch.stack([r[f"layer_{i}"] for r in rows]).float() for i in self.layers}
            self.hits += len(keys)
            return [by_layer[int(i)] for i in layers], self._logits(by_layer[self.last_layer])
        hidden, logits = compute(tokens, self.layers)
        for b, path in enumerate(paths):
            if not present[b]:
                self._write(path, {f"layer_{i}": h[b] for i, h in zip(self.layers, hidden)})
        self.misses += len(keys) - sum(present)
        self.hits += sum(present)
        by_layer = dict(zip(self.layers, hidden))
        if self.dtype != torch.float32:  # train on what later runs will read back
            by_layer = {i: h.to(self.dtype).float() for i, h in by_layer.items()}
            logits = self._logits(by_layer[self.last_layer])
        return [by_layer[int(i)] for i in layers], logits

    def _read(self, path: Path, device) -> dict[str, torch.Tensor]:
        """One entry; an unreadable one (or one without every cached layer) is named, not guessed around."""
        from safetensors.torch import load_file

        try:
            entry = load_file(path, device=str(device))
        except Exception as err:  # safetensors raises its own error types
            raise ValueError(f"teacher cache entry {str(path)!r} is unreadable ({err}); delete it and it is "
                             "computed again") from err
        missing = [i for i in self.layers if f"layer_{i}" not in entry]
        if missing:
            raise ValueError(f"teacher cache entry {str(path)!r} lacks target layers {missing}; delete it and it is "
                             "computed again")
        return entry

    def _logits(self, last: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.target.logits_of(last.to(next(self.target.parameters()).dtype)).float()

    def _write(self, path: Path, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save

        path.parent.mkdir(parents=True, exist_ok=True)
        data = save({k: v.detach().to("cpu", self.dtype).contiguous() for k, v in tensors.items()})
        _write_atomically(path, data)

    def disk_bytes(self) -> int:
        """Bytes of the cached entries."""
        return sum(p.stat().st_size for p in (self.directory / "entries").glob("*/*.safetensors"))

    def entry_bytes(self, seq_len: int) -> int:
        """Bytes one sequence of ``seq_len`` tokens takes (all cached layers)."""
        return len(self.layers) * seq_len * self.target.args.hidden_size * torch.finfo(self.dtype).bits // 8


def _write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary file, then rename: concurrent writers (ddp processes) never leave a torn file."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
