"""Write a dspark EAGLE-3 head in the EAGLE / SpecForge format (``LlamaForCausalLMEagle3``), the
one vLLM and SGLang serve with ``method: eagle3``: train with dspark, serve with either.

The format is described in :mod:`dspark.drafters.eagle3_import`, which reads it back. It has no
place for per-head q/k norms (dspark gives a head those when its target has them, as Qwen3 does;
train with ``model.qk_norm=false`` for a head that exports) and fuses exactly three target layers.
Layer ids are written as the inputs of layers (dspark's output id ``i`` is id ``i + 1``), the draft
vocabulary map as offsets, and the rope as the target's config states it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dspark.drafters.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from dspark.drafters.eagle_model import Eagle3Args, Eagle3Head


def export_problems(a: Eagle3Args) -> list[str]:
    """Why a head of architecture ``a`` cannot be written in the format (empty when it can)."""
    problems = []
    if a.qk_norm:
        problems.append("its draft layer normalises q and k per head (it was built for a target that does, e.g. "
                        "Qwen3), which the format has no place for; train one with model.qk_norm=false")
    if len(a.target_layers) != 3:
        problems.append(f"it fuses {len(a.target_layers)} target layers; the format fuses three")
    return problems


def rope_fields(target_config: dict) -> dict:
    """``rope_theta`` and ``rope_scaling`` (the keys every reader knows) from a target's config
    (``transformers`` 5 writes ``rope_parameters``, earlier versions the two keys)."""
    params = dict(target_config.get("rope_parameters") or {})
    if not params:
        return {"rope_theta": target_config.get("rope_theta", 10000.0), "rope_scaling": target_config.get("rope_scaling")}
    theta = params.pop("rope_theta", target_config.get("rope_theta", 10000.0))
    return {"rope_theta": theta, "rope_scaling": None if params.get("rope_type", "default") == "default" else params}


def export_eagle3(head: Eagle3Head, target, target_config: dict, directory: str | Path, *,
                  dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write ``head`` (built for ``target``, whose ``transformers`` config is ``target_config``) to
    ``directory``: ``config.json`` and ``model.safetensors`` in ``dtype``. ``ValueError`` naming why
    when the format cannot hold the head (:func:`export_problems`)."""
    from safetensors.torch import save_file

    problems = export_problems(head.args)
    if problems:
        raise ValueError("this EAGLE-3 head cannot be written in the EAGLE / SpecForge format: " + "; ".join(problems))
    a = head.args
    aux = [i + 1 for i in a.target_layers]  # the input of layer i + 1 is the output of layer i
    draft_vocab = a.draft_vocab_size or a.vocab_size
    config = {
        "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_size": a.hidden_size,
        "intermediate_size": a.intermediate_size, "num_attention_heads": a.num_heads,
        "num_key_value_heads": a.num_kv_heads, "head_dim": a.head_dim, "num_hidden_layers": 1,
        "rms_norm_eps": a.rms_norm_eps, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "vocab_size": a.vocab_size, "draft_vocab_size": draft_vocab, "target_hidden_size": a.hidden_size,
        "max_position_embeddings": target_config.get("max_position_embeddings", target.max_position_embeddings),
        **rope_fields(target_config), "tie_word_embeddings": False, "torch_dtype": str(dtype).removeprefix("torch."),
        "eagle_aux_hidden_state_layer_ids": aux,
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": aux, "use_aux_hidden_state": True},
    }
    if a.norm_before_residual:
        config["norm_before_residual"] = True
    layer, heads_dim, kv_dim = head.layer, a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
    q, k, v = layer.wqkv.weight.split([heads_dim, kv_dim, kv_dim])
    gate, up = layer.w13.weight.chunk(2)
    tensors = {
        "fc.weight": head.fc.weight, "midlayer.self_attn.q_proj.weight": q, "midlayer.self_attn.k_proj.weight": k,
        "midlayer.self_attn.v_proj.weight": v, "midlayer.self_attn.o_proj.weight": layer.wo.weight,
        "midlayer.mlp.gate_proj.weight": gate, "midlayer.mlp.up_proj.weight": up,
        "midlayer.mlp.down_proj.weight": layer.w2.weight,
        "midlayer.input_layernorm.weight": layer.embedding_norm, "midlayer.hidden_norm.weight": layer.attention_norm,
        "midlayer.post_attention_layernorm.weight": layer.ffn_norm, "norm.weight": head.norm,
        "lm_head.weight": head.lm_head.weight if a.draft_vocab_size else target.lm_head.weight,
    }
    tensors = {name: t.detach().to("cpu", dtype).contiguous() for name, t in tensors.items()}
    ids = head.d2t.cpu() if a.draft_vocab_size else torch.arange(draft_vocab)
    tensors["d2t"] = ids - torch.arange(draft_vocab)  # offsets
    tensors["t2d"] = torch.zeros(a.vocab_size, dtype=torch.bool).index_fill(0, ids, True)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, directory / WEIGHTS_FILE)
    return directory
