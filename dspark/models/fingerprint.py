"""A cheap fingerprint of a model's weights: which model it is, without hashing every value."""

from __future__ import annotations

import hashlib

import torch


def weights_fingerprint(model, samples: int, *, any_dtype: bool = False) -> str | None:
    """SHA-256 over the model's parameter names and shapes and up to ``samples`` evenly spaced
    values of each: cheap for any model size, and distinct for distinct checkpoints in practice (a
    different training run changes every sampled value). ``any_dtype``: the values rounded to
    bfloat16 and the dtypes left out, so one checkpoint loaded in float32, bfloat16 or float16
    gives one fingerprint; else the dtypes count (outputs computed in one dtype are not
    another's). ``None`` for a model whose weights are not loaded (on the meta device)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if tensor.is_meta:
            return None
        flat = tensor.detach().reshape(-1)
        values = flat[::max(1, flat.numel() // samples)][:samples]
        digest.update(f"{name}:{tuple(tensor.shape)}{'' if any_dtype else f':{tensor.dtype}'};".encode())
        if any_dtype and values.is_floating_point():
            values = values.to(torch.bfloat16)
        digest.update(values.float().cpu().numpy().tobytes())
    return digest.hexdigest()
