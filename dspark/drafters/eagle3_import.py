"""Published EAGLE-3 heads, read into an :class:`~dspark.drafters.eagle_model.Eagle3Head` for a
native target. Two formats describe the same network under other names:

**EAGLE / SpecForge** (``architectures: ["LlamaForCausalLMEagle3"]``), the heads vLLM and SGLang
serve (also in vLLM's ``speculators`` layout, ``Eagle3Speculator``: the same fields, the draft
layer's config under ``transformer_layer_config``, the layer's tensors under ``layers.0.``):

* ``config.json``: Llama fields of the one draft layer (``hidden_size``, ``intermediate_size``,
  ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``, ``rms_norm_eps``, rope), the
  target's ``vocab_size``, ``draft_vocab_size``, optionally ``target_hidden_size``,
  ``norm_before_residual`` and ``eagle_aux_hidden_state_layer_ids`` (top level or under
  ``eagle_config``).
* weights (``model.safetensors``, or ``pytorch_model.bin`` read with ``weights_only=True``):
  ``fc`` (the fusion), ``midlayer.*`` (or ``layers.0.*``): ``self_attn.{q,k,v,o}_proj``,
  ``mlp.{gate,up,down}_proj``, ``input_layernorm`` (normalises the token embedding),
  ``hidden_norm`` (the feature), ``post_attention_layernorm``; then ``norm``, ``lm_head`` (over
  the draft vocabulary), ``d2t`` (draft id → target id as an *offset*: ``target = draft +
  d2t[draft]``), ``t2d`` (unused here) and optionally ``embed_tokens`` (a copy of the target's).
* Aux layer ids count as vLLM and SGLang count them: id ``j`` is the *input* of target layer
  ``j`` (the output of layer ``j − 1``; ``0`` would be the embedding), default ``(2, L // 2,
  L − 3)``. dspark names a layer by its output, so ``j`` becomes ``j − 1``.

**DeepSpec** (``architectures: ["Qwen3Eagle3Model"]``), the heads DeepSeek released beside its
DSpark drafters (e.g. ``deepseek-ai/eagle3_qwen3_4b_ttt7``): a copy of the target's Qwen3 config
with ``target_layer_ids`` (layer *outputs*, usually five), ``ttt_length`` (the γ it was trained
to unroll) and ``num_hidden_layers`` 1; the same tensor names under ``layers.0.``, plus per-layer
``q_norm`` / ``k_norm`` (Qwen3's, shared by the heads), a full-vocabulary ``lm_head`` and
``embed_tokens`` (copies of the target's: shared when equal; an LM head that differs is kept as
the head's own, over the whole vocabulary).

What dspark's head cannot represent is refused, naming it, before any weight is read: several
draft layers, a draft layer of another width than the target or with another rope, attention
biases, an embedding of its own that differs from the target's.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from dspark.drafters.checkpoint import (TargetShape, equal_at_coarser_precision, joined_parts, per_head_rows,
                                       read_foreign_config, rope_mismatch)
from dspark.drafters.deepspec_import import layer_ids_problem
from dspark.drafters.eagle_model import Eagle3Args, Eagle3Head

#: ``architectures`` entries that mark a published EAGLE-3 head: the EAGLE / SpecForge format (and
#: vLLM's ``speculators`` layout of it), DeepSpec's
ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM", "Eagle3Speculator")
DEEPSPEC_ARCHITECTURES = ("Qwen3Eagle3Model",)
#: draft steps an imported head is said to unroll when the caller gives none (the format keeps none)
DEFAULT_GAMMA = 7


def read_published_config(directory: str | Path) -> dict | None:
    """``config.json`` of ``directory`` when it declares a published EAGLE-3 head, else ``None``
    (vLLM's ``speculators`` layout flattened: its ``transformer_layer_config`` is the draft
    layer's config, the EAGLE-3 fields stay at the top; the layout holds one draft layer)."""
    config = read_foreign_config(directory, ARCHITECTURES + DEEPSPEC_ARCHITECTURES)
    if config is not None and isinstance(config.get("transformer_layer_config"), dict):
        layer = config["transformer_layer_config"]
        top = {k: v for k, v in config.items() if k not in ("transformer_layer_config", "speculators_config")}
        config = {**layer, **top, "num_hidden_layers": 1}
        config.setdefault("head_dim", layer["hidden_size"] // layer["num_attention_heads"])
    return config


def is_deepspec(config: dict) -> bool:
    """Whether a published head's ``config`` is in DeepSpec's format."""
    return any(a in DEEPSPEC_ARCHITECTURES for a in config["architectures"])


def default_aux_layer_ids(num_layers: int) -> tuple[int, int, int]:
    """vLLM's and SGLang's default aux ids for a target of ``num_layers`` (inputs of these layers)."""
    return 2, num_layers // 2, num_layers - 3


def published_args(config: dict, target, *, gamma: int = DEFAULT_GAMMA, where: str = "the checkpoint") -> Eagle3Args:
    """:class:`Eagle3Args` of a published head's ``config`` for ``target``; ``ValueError`` naming
    every setting dspark's head cannot represent, or that does not fit ``target``. ``gamma`` is
    used when the format does not record one. The head has its own LM head (over the whole
    vocabulary without a draft vocabulary) until the weights show it is a copy of the target's."""
    t, deepspec = target.args, is_deepspec(config)
    hidden = config.get("hidden_size")
    heads = config.get("num_attention_heads")
    head_dim = config.get("head_dim") or (hidden // heads if hidden and heads else None)
    problems = []
    if config.get("num_hidden_layers", 1) != 1:
        problems.append(f"num_hidden_layers {config.get('num_hidden_layers')} (dspark's head has one draft layer)")
    if hidden != t.hidden_size:
        problems.append(f"hidden_size {hidden} (target: {t.hidden_size}; the head shares the target's embedding)")
    if config.get("target_hidden_size", t.hidden_size) != t.hidden_size:
        problems.append(f"target_hidden_size {config['target_hidden_size']} (target: {t.hidden_size})")
    if config.get("vocab_size") != t.vocab_size:
        problems.append(f"vocab_size {config.get('vocab_size')} (target: {t.vocab_size})")
    if head_dim != t.head_dim:
        problems.append(f"head_dim {head_dim} (target: {t.head_dim}; the head uses the target's rotary embedding)")
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config['hidden_act']!r} (only 'silu')")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            problems.append(f"{key} true (no biases)")
    if deepspec:
        layers = list(config.get("target_layer_ids") or [])
        if problem := layer_ids_problem(layers, t.num_layers):
            problems.append(problem)
    else:
        eagle_config = config.get("eagle_config") or {}
        if eagle_config.get("use_aux_hidden_state") is False:
            problems.append("eagle_config.use_aux_hidden_state false (an EAGLE-1/2-style head without fused layers)")
        aux = config.get("eagle_aux_hidden_state_layer_ids") or eagle_config.get("eagle_aux_hidden_state_layer_ids")
        aux = tuple(aux) if aux else default_aux_layer_ids(t.num_layers)
        if len(aux) != 3 or not all(isinstance(j, int) and 1 <= j <= t.num_layers for j in aux):
            problems.append(f"eagle_aux_hidden_state_layer_ids {list(aux)} (three ids in 1..{t.num_layers}: "
                            f"the inputs of target layers, 0 being the embedding, which dspark does not return)")
        layers = [j - 1 for j in aux]
    if not problems and (rope := rope_mismatch(config, head_dim, target)):
        problems.append(rope)
    if problems:
        raise ValueError(f"{where} is an EAGLE-3 head dspark cannot run on this target: " + "; ".join(problems))
    shape = TargetShape.fields_of(target)
    shape.update(num_heads=heads, num_kv_heads=config.get("num_key_value_heads") or heads, head_dim=head_dim,
                 rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)), qk_norm=deepspec)
    if deepspec:
        gamma = int(config.get("ttt_length") or gamma)
    return Eagle3Args(**shape, gamma=gamma, target_layers=tuple(layers), intermediate_size=config["intermediate_size"],
                      draft_vocab_size=config.get("draft_vocab_size") or t.vocab_size,
                      norm_before_residual=bool(config.get("norm_before_residual", False))).validate()


def _layer_key(tensors: dict) -> str:
    return "layers.0." if any(k.startswith("layers.0.") for k in tensors) else "midlayer."


def published_state_dict(tensors: dict[str, torch.Tensor], head: Eagle3Head, target, where: str) -> dict:
    """``head``'s state dict from a published head's tensors (prefixes ``model.`` stripped);
    ``CheckpointError`` naming missing, unexpected and mis-shaped tensors, ``ValueError`` for an
    embedding that is not the target's."""
    from dspark.models.loading import CheckpointError

    a = head.args
    layer = _layer_key(tensors)
    attn, mlp = layer + "self_attn.", layer + "mlp."
    parts = {  # dspark name: the published tensors it is made of (concatenated along rows)
        "fc.weight": ["fc.weight"],
        "layer.wqkv.weight": [attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"],
        "layer.wo.weight": [attn + "o_proj.weight"],
        "layer.w13.weight": [mlp + "gate_proj.weight", mlp + "up_proj.weight"],
        "layer.w2.weight": [mlp + "down_proj.weight"],
        "layer.embedding_norm": [layer + "input_layernorm.weight"],
        "layer.attention_norm": [layer + "hidden_norm.weight"],
        "layer.ffn_norm": [layer + "post_attention_layernorm.weight"],
        "norm": ["norm.weight"],
    }
    if a.draft_vocab_size:
        parts["lm_head.weight"] = ["lm_head.weight"]
    qk_norms = [attn + "q_norm.weight", attn + "k_norm.weight"] if a.qk_norm else []
    required = {name for names in parts.values() for name in names} | set(qk_norms)
    optional = {"d2t", "t2d", "embed_tokens.weight", "lm_head.weight", "rotary_emb.inv_freq"}
    missing, unexpected = sorted(required - set(tensors)), sorted(set(tensors) - required - optional)
    if missing or unexpected:
        raise CheckpointError(f"{where} is not an EAGLE-3 head dspark can read: missing {missing}, "
                              f"unexpected {unexpected}")
    state = joined_parts(tensors, parts, where)
    if a.qk_norm:  # one norm per head dimension, shared by the heads: one row per head here
        state["layer.qk_norm"] = torch.cat([per_head_rows(tensors[qk_norms[0]], a.num_heads, qk_norms[0], where),
                                            per_head_rows(tensors[qk_norms[1]], a.num_kv_heads, qk_norms[1], where)])
    if a.draft_vocab_size:
        offsets = tensors.get("d2t")
        if offsets is None and a.draft_vocab_size != a.vocab_size:
            raise CheckpointError(f"{where} has a draft vocabulary of {a.draft_vocab_size} tokens but no d2t map")
        if offsets is not None and offsets.shape != (a.draft_vocab_size,):
            raise CheckpointError(f"{where}: d2t has shape {tuple(offsets.shape)}, expected ({a.draft_vocab_size},) "
                                  "(one offset per draft token)")
        state["d2t"] = torch.arange(a.draft_vocab_size) + (0 if offsets is None else offsets.long())
    expected = head.state_dict()
    misshaped = [f"{k}: expected {tuple(expected[k].shape)}, found {tuple(v.shape)}"
                 for k, v in state.items() if v.shape != expected[k].shape]
    if misshaped:
        raise CheckpointError(f"{where} does not match its config: {'; '.join(misshaped)}")
    embedding = tensors.get("embed_tokens.weight")
    if embedding is not None and not equal_at_coarser_precision(embedding, target.embed_tokens.weight):
        raise ValueError(f"{where} carries an embedding (embed_tokens) that is not the target's: dspark's head "
                         "shares the target's embedding; use the target this head was trained for")
    return state


def copies_target_lm_head(tensors: dict[str, torch.Tensor], args: Eagle3Args, target, *, deepspec: bool) -> bool:
    """Whether a published head's LM head is the target's over the whole vocabulary (a DeepSpec
    head without one uses the target's)."""
    lm_head, offsets = tensors.get("lm_head.weight"), tensors.get("d2t")
    if deepspec and lm_head is None:
        return True
    if lm_head is None or args.draft_vocab_size != args.vocab_size or (offsets is not None and offsets.any()):
        return False
    return equal_at_coarser_precision(lm_head, target.lm_head.weight)


def import_eagle3(directory: str | Path, config: dict, target, *, gamma: int = DEFAULT_GAMMA) -> Eagle3Head:
    """A published EAGLE-3 head (``directory`` holding ``config`` and its weights) as an
    :class:`Eagle3Head` for ``target`` (float32, on the CPU; the drafter moves it)."""
    from dspark.models.loading import read_checkpoint_tensors

    where = f"EAGLE-3 checkpoint {str(directory)!r}"
    args = published_args(config, target, gamma=gamma, where=where)  # refuses before reading weights
    tensors = {k.removeprefix("model."): v for k, v in read_checkpoint_tensors(directory).items()}
    if copies_target_lm_head(tensors, args, target, deepspec=is_deepspec(config)):  # shared, not loaded twice
        args = replace(args, draft_vocab_size=0)
    with torch.device("meta"):  # no random initialisation of weights about to be replaced
        head = Eagle3Head(args)
    state = published_state_dict(tensors, head, target, where)
    copied = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype, copy=True).contiguous()
              for k, v in state.items()}  # nothing aliases the checkpoint or the target
    head.load_state_dict(copied, assign=True)
    if args.draft_vocab_size:
        head.set_draft_vocabulary(head.d2t.clone())  # validates the map
    return head
