"""Load a target or draft model from a Hugging Face checkpoint directory or an in-memory model.

Llama / Qwen2 / Qwen3 become a :class:`NativeCausalLM`; any other architecture is wrapped by the
slower :class:`HFCausalLM` adapter. Weights load through safetensors, or ``torch.load`` with
``weights_only=True`` for ``.bin`` checkpoints; ``trust_remote_code`` stays off unless asked for.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from dspark.models.native import (
    ModelArgs,
    NativeCausalLM,
    UnsupportedArchitectureError,
    rope_inverse_frequencies,
)

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


class CheckpointError(ValueError):
    """A checkpoint directory is missing files, or tensors are missing or mis-shaped (named in the message)."""


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"float32"`` etc. → ``torch.dtype`` (error lists the allowed names)."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; allowed: {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str | torch.device) -> torch.device:
    """``"auto"`` → ``cuda`` when available, else ``cpu``; anything else as given — refused
    (``ValueError``, before any model is built) when torch does not know it, or it is a CUDA
    device this machine does not have."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {str(name)!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(name)!r} asked for, but CUDA is not available here (torch "
                             f"{torch.__version__}); use device auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(name)!r} asked for, but this machine has {torch.cuda.device_count()} "
                             "CUDA device(s)")
    return device


def resolve_checkpoint(source):
    """An embedded model name (``dspark-tiny`` …) → its shipped directory; anything else unchanged."""
    from dspark.assets import is_embedded_name, resolve_model

    if isinstance(source, str) and is_embedded_name(source):
        return resolve_model(source)
    return source


def load_model(source, *, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu",
               backend: str = "auto", trust_remote_code: bool = False):
    """Build a dspark language model from ``source``.

    Args:
        source: a checkpoint directory (``config.json`` + safetensors), an embedded model name
            (``dspark-tiny``, ``dspark-tiny-draft``), a ``transformers``
            ``PreTrainedModel``, or an existing dspark model (returned moved to dtype/device).
        dtype: parameter dtype name or ``torch.dtype``.
        device: ``"cpu"``, ``"cuda"``, ``"auto"`` …
        backend: ``"native"`` (error if unsupported), ``"hf"`` (always the adapter) or ``"auto"``.
        trust_remote_code: passed to ``transformers`` for architectures with custom code.

    Returns:
        :class:`NativeCausalLM` or :class:`~dspark.models.hf_adapter.HFCausalLM`.
    """
    if backend not in ("auto", "native", "hf"):
        raise ValueError(f"target.backend must be one of auto, native, hf; got {backend!r}")
    torch_dtype, torch_device = resolve_dtype(dtype), resolve_device(device)
    source = resolve_checkpoint(source)
    if getattr(source, "is_dspark_model", False):
        return source.to(dtype=torch_dtype, device=torch_device).requires_grad_(False)

    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        config = _read_config(path, trust_remote_code)
        state_dict_fn = lambda: read_checkpoint_tensors(path)  # noqa: E731 - deferred until we know the backend
        hf_model_fn = lambda: _hf_from_pretrained(path, torch_dtype, trust_remote_code)  # noqa: E731
    elif hasattr(source, "config") and hasattr(source, "state_dict"):
        config = source.config
        state_dict_fn = source.state_dict
        hf_model_fn = lambda: source  # noqa: E731
    else:
        raise TypeError(f"cannot load a model from {type(source).__name__}; give a checkpoint directory or a transformers model")

    if backend != "hf":
        try:
            args = ModelArgs.from_hf_config(config)
        except UnsupportedArchitectureError:
            if backend == "native":
                raise
            log.warning("%s: no native implementation, using the transformers adapter (the slow path: "
                        "batch-uniform cache layout, no static cache)", getattr(config, "model_type", "?"))
        else:
            inv_freq, scaling = rope_inverse_frequencies(config, args.head_dim)
            model = NativeCausalLM(args, inv_freq, scaling)
            load_hf_weights(model, state_dict_fn())
            model.hf_config = config
            model.generation_config = _generation_config(source)
            # the checkpoint directory or transformers model it came from (a plain reference, not a submodule)
            object.__setattr__(model, "hf_source", source)
            return model.to(dtype=torch_dtype, device=torch_device).eval().requires_grad_(False)

    from dspark.models.hf_adapter import HFCausalLM

    return HFCausalLM(hf_model_fn()).to(dtype=torch_dtype, device=torch_device).eval().requires_grad_(False)


def model_skeleton(source, *, trust_remote_code: bool = False) -> NativeCausalLM | None:
    """The native model ``source`` (a checkpoint directory or embedded name) would load, on the
    meta device: its architecture and real rotary frequencies, no weights read — enough to check a
    drafter against it first. ``None`` for anything else (a model object, an architecture without
    a native implementation)."""
    source = resolve_checkpoint(source)
    if not isinstance(source, (str, os.PathLike)):
        return None
    config = _read_config(Path(source), trust_remote_code)
    try:
        args = ModelArgs.from_hf_config(config)
    except UnsupportedArchitectureError:
        return None
    inv_freq, scaling = rope_inverse_frequencies(config, args.head_dim)
    with torch.device("meta"):
        model = NativeCausalLM(args, inv_freq, scaling)
    model.inv_freq = inv_freq  # rope checks compare the real frequencies
    return model


def _read_config(path: Path, trust_remote_code: bool):
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {str(path)!r} does not exist")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"checkpoint directory {str(path)!r} has no config.json")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ValueError, OSError) as err:  # includes json.JSONDecodeError for a corrupt file
        raise CheckpointError(f"cannot read {path / 'config.json'}: {err}") from err


def _generation_config(source):
    """The source's ``GenerationConfig`` (EOS ids live there), or ``None``."""
    if isinstance(source, (str, os.PathLike)):
        if not (Path(source) / "generation_config.json").is_file():
            return None
        from transformers import GenerationConfig

        return GenerationConfig.from_pretrained(source)
    return getattr(source, "generation_config", None)


def _hf_from_pretrained(path: Path, dtype: torch.dtype, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)


def read_checkpoint_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: ``model.safetensors``, a sharded safetensors index, or
    ``pytorch_model.bin`` (read with ``weights_only=True``; never unpickles arbitrary objects)."""
    path = Path(path)
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file() or index.is_file():
        from safetensors.torch import load_file

        def read(file: Path) -> dict[str, torch.Tensor]:
            try:
                return load_file(file)
            except Exception as err:  # safetensors raises its own error types for corrupt headers/data
                raise CheckpointError(f"cannot read {file}: {err} (the file is corrupt or truncated)") from err

        if single.is_file():
            return read(single)
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"cannot read {index}: {err}") from err
        tensors: dict[str, torch.Tensor] = {}
        for shard in shards:
            if not (path / shard).is_file():
                raise CheckpointError(f"{index} names shard {shard!r}, which is missing")
            tensors.update(read(path / shard))
        return tensors
    if (path / "pytorch_model.bin").is_file():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise CheckpointError(f"no weights in {str(path)!r}: expected model.safetensors, a safetensors index or pytorch_model.bin")


def expected_hf_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """The Hugging Face tensor names and shapes a checkpoint of this architecture must contain."""
    h, hd = args.hidden_size, args.head_dim
    q, kv, ff = args.num_heads * hd, args.num_kv_heads * hd, args.intermediate_size
    shapes = {"model.embed_tokens.weight": (args.vocab_size, h), "model.norm.weight": (h,)}
    if not args.tie_word_embeddings:
        shapes["lm_head.weight"] = (args.vocab_size, h)
    for i in range(args.num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (ff, h), p + "mlp.up_proj.weight": (ff, h), p + "mlp.down_proj.weight": (h, ff),
        }
        if args.qkv_bias:
            shapes |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,), p + "self_attn.v_proj.bias": (kv,)}
        if args.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (h,)
        if args.mlp_bias:
            shapes |= {p + "mlp.gate_proj.bias": (ff,), p + "mlp.up_proj.bias": (ff,), p + "mlp.down_proj.bias": (h,)}
        if args.qk_norm:
            shapes |= {p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)}
    return shapes


def load_hf_weights(model: NativeCausalLM, hf_tensors: dict[str, torch.Tensor]) -> None:
    """Copy Hugging Face-named tensors into ``model`` (fusing q/k/v and gate/up).

    Raises :class:`CheckpointError` naming every missing or mis-shaped tensor before copying anything.
    """
    args = model.args
    expected = expected_hf_shapes(args)
    missing = [name for name in expected if name not in hf_tensors]
    misshaped = [f"{name}: expected {tuple(shape)}, found {tuple(hf_tensors[name].shape)}"
                 for name, shape in expected.items() if name in hf_tensors and tuple(hf_tensors[name].shape) != shape]
    if missing or misshaped:
        parts = []
        if missing:
            parts.append(f"missing tensors: {', '.join(missing[:20])}" + (f" (+{len(missing) - 20} more)" if len(missing) > 20 else ""))
        if misshaped:
            parts.append(f"mis-shaped tensors: {'; '.join(misshaped[:20])}")
        raise CheckpointError(f"checkpoint does not match its config ({args.model_type}): " + " | ".join(parts))
    ignored = sorted(set(hf_tensors) - set(expected) - {"lm_head.weight"})
    ignored = [n for n in ignored if not n.endswith("rotary_emb.inv_freq")]
    if ignored:
        log.warning("ignoring %d checkpoint tensors the architecture does not use: %s", len(ignored), ", ".join(ignored[:10]))

    t = hf_tensors
    native: dict[str, torch.Tensor] = {"embed_tokens.weight": t["model.embed_tokens.weight"], "norm": t["model.norm.weight"]}
    native["lm_head.weight"] = t["model.embed_tokens.weight"] if args.tie_word_embeddings else t["lm_head.weight"]
    for i in range(args.num_layers):
        p, n = f"model.layers.{i}.", f"layers.{i}."
        native[n + "attention_norm"] = t[p + "input_layernorm.weight"]
        native[n + "ffn_norm"] = t[p + "post_attention_layernorm.weight"]
        native[n + "wqkv.weight"] = torch.cat([t[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        native[n + "wo.weight"] = t[p + "self_attn.o_proj.weight"]
        native[n + "w13.weight"] = torch.cat([t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"]])
        native[n + "w2.weight"] = t[p + "mlp.down_proj.weight"]
        if args.qkv_bias:
            native[n + "wqkv.bias"] = torch.cat([t[p + f"self_attn.{x}_proj.bias"] for x in "qkv"])
        if args.o_bias:
            native[n + "wo.bias"] = t[p + "self_attn.o_proj.bias"]
        if args.mlp_bias:
            native[n + "w13.bias"] = torch.cat([t[p + "mlp.gate_proj.bias"], t[p + "mlp.up_proj.bias"]])
            native[n + "w2.bias"] = t[p + "mlp.down_proj.bias"]
        if args.qk_norm:
            native[n + "qk_norm"] = torch.cat([t[p + "self_attn.q_norm.weight"].expand(args.num_heads, -1),
                                                          t[p + "self_attn.k_norm.weight"].expand(args.num_kv_heads, -1)])
    with torch.no_grad():
        params = model.state_dict()
        assert set(native) == set(params), sorted(set(native) ^ set(params))  # the mapping covers every parameter
        for name, tensor in native.items():
            params[name].copy_(tensor)


def random_hf_model(spec: dict, *, seed: int = 0):
    """A randomly initialised ``transformers`` causal LM from an architecture spec (no download).

    ``spec`` holds ``model_type`` (``llama``, ``qwen2``, ``qwen3``, …) and config keyword arguments
    (``hidden_size``, ``num_hidden_layers`` …). Used by tests, benchmarks and the quick start.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(spec)
    model_type = spec.pop("model_type", None)
    if model_type is None:
        raise ValueError("target.random needs model_type (e.g. qwen3, llama, qwen2)")
    unknown = _unknown_config_keys(model_type, spec)
    if unknown:  # (transformers' configs keep any keyword: a typo would silently leave a default)
        raise ValueError(f"random model spec: {unknown} are not {model_type} config keys (e.g. hidden_size, "
                         "num_hidden_layers, num_attention_heads, vocab_size)")
    config = AutoConfig.for_model(model_type, **spec)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def _unknown_config_keys(model_type: str, spec: dict) -> list[str]:
    """The keys of ``spec`` that a ``model_type`` config does not know: not among its attributes,
    not read into a nested one, and changing nothing but themselves when given (legacy keys such
    as ``rope_theta`` are read into ``rope_parameters``)."""
    from transformers import AutoConfig

    default = AutoConfig.for_model(model_type)
    base = default.to_dict()
    unknown = []
    for key, value in spec.items():
        if hasattr(default, key):
            continue
        given = AutoConfig.for_model(model_type, **{key: value}).to_dict()
        read_into = any(isinstance(v, dict) and key in v for v in given.values())  # (rope_parameters)
        if not read_into and not {k for k in {*given, *base} if k != key and given.get(k) != base.get(k)}:
            unknown.append(key)
    return sorted(unknown)
