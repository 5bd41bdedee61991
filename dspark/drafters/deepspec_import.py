"""DSpark and DFlash drafters released with DeepSeek's DeepSpec (``architectures:
["Qwen3DSparkModel"]``, e.g. ``deepseek-ai/dspark_qwen3_4b_block7`` for ``Qwen/Qwen3-4B``), read
into a :class:`~dspark.drafters.block_model.BlockDrafter` for a native target.

The format describes the network of :mod:`dspark.drafters.block_model` under other names:

* ``config.json``: a copy of the target's Qwen3 config with the drafter's ``num_hidden_layers``,
  ``block_size`` (γ), ``target_layer_ids`` (layer outputs, as dspark counts them; ``-1``, the
  embedding, is not supported, nor is the last layer, which DeepSpec never reads), ``mask_token_id`` (the mask position's input is that token's
  embedding), ``num_target_layers``, ``markov_rank`` and ``markov_head_type`` (``vanilla`` =
  dspark's ``markov``, ``rnn``; ``gated`` gates each of ``W1``'s dimensions, which dspark's
  ``gated_markov`` does not, and is refused), ``enable_confidence_head`` and
  ``confidence_head_with_markov``.
* weights: ``fc`` and ``hidden_norm`` (the context features), ``layers.i.*`` (Qwen3 decoder
  layers; their ``q_norm`` / ``k_norm`` are shared by all heads), ``norm``, ``markov_head.*``
  (``markov_w1`` = ``W1``, ``markov_w2`` = ``W2``, ``joint_proj`` = the RNN), ``confidence_head.proj``,
  and copies of the target's ``embed_tokens`` and ``lm_head`` (checked equal to the target's, then
  shared).
* Context features enter each layer's keys/values without the layer's input norm
  (``context_input_norm: false``); the confidence head reads ``[h_k; W1[x_{k-1}]]`` or ``h_k``
  alone, or is absent (DFlash).

z-lab's own DFlash drafters (``architectures: ["DFlashDraftModel"]``, e.g. block size 16) are the
same network as DeepSpec's DFlash with one difference: the block is ``[anchor, mask × (B−1)]`` and
each mask position drafts its own token (B − 1 drafts; the anchor's output is unused), where
DeepSpec's position k − 1 drafts ``x_k`` (``anchor_predicts: false``). Their ``dflash_config``
holds ``target_layer_ids`` (else z-lab's default spread over layers 1..L−3) and ``mask_token_id``;
a ``causal_head`` is refused.

What dspark cannot run is refused before any weight is read, naming it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dspark.drafters.block_model import BlockDrafter, BlockDrafterArgs
from dspark.drafters.checkpoint import (CONFIG_FILE, TargetShape, equal_at_coarser_precision, joined_parts,
                                       per_head_rows, read_foreign_config, rope_mismatch)

#: ``architectures`` entries that mark a DeepSpec block drafter, and z-lab's DFlash
ARCHITECTURES = ("Qwen3DSparkModel",)
ZLAB_ARCHITECTURES = ("DFlashDraftModel",)
#: DeepSpec's ``markov_head_type`` → dspark's sequential head
HEAD_TYPES = {"vanilla": "markov", "rnn": "rnn"}


def read_deepspec_config(directory: str | Path) -> dict | None:
    """``config.json`` of ``directory`` when it declares a DeepSpec block drafter, else ``None``."""
    if read_foreign_config(directory, ("Gemma4DSparkModel",)) is not None:
        raise ValueError(f"{Path(directory) / CONFIG_FILE} is a DeepSpec drafter for a Gemma 4 target, which dspark "
                         "does not run natively (native targets: Llama, Qwen2, Qwen3)")
    config = read_foreign_config(directory, ARCHITECTURES + ZLAB_ARCHITECTURES)
    if config is not None and is_zlab(config):  # its fields under dflash_config; no sequential or confidence head
        dflash = config.get("dflash_config") or {}
        layers = dflash.get("target_layer_ids") or zlab_default_layer_ids(config.get("num_target_layers", 0),
                                                                            config.get("num_hidden_layers", 1))
        config = {**config, "target_layer_ids": layers, "mask_token_id": dflash.get("mask_token_id"),
                  "markov_rank": 0, "enable_confidence_head": False}
    return config


def is_zlab(config: dict) -> bool:
    """Whether a drafter's ``config`` is z-lab's DFlash (each mask position drafts its own token)."""
    return any(a in ZLAB_ARCHITECTURES for a in config["architectures"])


def zlab_default_layer_ids(num_target_layers: int, num_draft_layers: int) -> list[int]:
    """z-lab's DFlash default: the middle layer for one draft layer, else as many ids as draft
    layers spread evenly (rounded) over target layers 1..L−3."""
    if num_draft_layers == 1:
        return [num_target_layers // 2]
    start, end = 1, num_target_layers - 3
    return [int(round(start + i * (end - start) / (num_draft_layers - 1))) for i in range(num_draft_layers)]


def layer_ids_problem(layer_ids, num_layers: int) -> str | None:
    """Why DeepSpec ``target_layer_ids`` (layer outputs) cannot be read from a target of
    ``num_layers`` layers, or ``None``."""
    if layer_ids and all(isinstance(i, int) and 0 <= i < num_layers - 1 for i in layer_ids):
        return None
    return (f"target_layer_ids {list(layer_ids)} (ids of target layers 0..{num_layers - 2}: -1, the embedding, is not "
            "returned by dspark's targets, and DeepSpec never reads the last layer, whose transformers hidden state "
            "is the normalised one)")


def deepspec_args(config: dict, target, where: str = "the checkpoint") -> BlockDrafterArgs:
    """:class:`BlockDrafterArgs` of a DeepSpec drafter's ``config`` for ``target``; ``ValueError``
    naming every setting dspark cannot run, or that does not fit ``target``."""
    t, zlab = target.args, is_zlab(config)
    gamma = config.get("block_size", 0) - (1 if zlab else 0)  # z-lab's anchor position drafts nothing
    heads = config.get("num_attention_heads")
    head_dim = config.get("head_dim") or (config.get("hidden_size", 0) // heads if heads else None)
    expected = {"hidden_size": t.hidden_size, "num_attention_heads": t.num_heads,
                "num_key_value_heads": t.num_kv_heads, "vocab_size": t.vocab_size,
                "num_target_layers": t.num_layers}
    problems = [f"{key} {config.get(key)} (target: {value})" for key, value in expected.items()
                if config.get(key) != value]
    if head_dim != t.head_dim:
        problems.append(f"head_dim {head_dim} (target: {t.head_dim})")
    if config.get("attention_bias"):
        problems.append("attention_bias true (no biases)")
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config['hidden_act']!r} (only 'silu')")
    layer_ids = list(config.get("target_layer_ids") or [])
    if problem := layer_ids_problem(layer_ids, t.num_layers):
        problems.append(problem)
    rank = int(config.get("markov_rank", 0))
    head_type = str(config.get("markov_head_type", "")).lower()
    if rank and head_type not in HEAD_TYPES:
        problems.append(f"markov_head_type {head_type!r} (dspark runs {', '.join(HEAD_TYPES)}; DeepSpec's 'gated' "
                        "gates each dimension of W1[x], dspark's gated_markov the whole bias)")
    if zlab and (config.get("dflash_config") or {}).get("causal_head"):
        problems.append("dflash_config.causal_head true (a block drafter attends within its block both ways)")
    if zlab and (config.get("dflash_config") or {}).get("target_hidden_size", t.hidden_size) != t.hidden_size:
        problems.append(f"dflash_config.target_hidden_size {config['dflash_config']['target_hidden_size']} "
                        f"(target: {t.hidden_size})")
    if gamma < 1:
        problems.append(f"block_size {config.get('block_size')} (at least one draft per block)")
    mask = config.get("mask_token_id")
    if not isinstance(mask, int) or not 0 <= mask < t.vocab_size:
        problems.append(f"mask_token_id {mask!r} (a token id in [0, {t.vocab_size}))")
    if not problems and (rope := rope_mismatch(config, head_dim, target)):
        problems.append(rope)
    if problems:
        raise ValueError(f"{where} is a DeepSpec drafter dspark cannot run on this target: " + "; ".join(problems))
    if not config.get("enable_confidence_head", False):
        confidence = "none"
    else:
        confidence = "token" if config.get("confidence_head_with_markov", False) else "hidden"
    shape = TargetShape.fields_of(target)
    shape.update(rms_norm_eps=float(config.get("rms_norm_eps", t.rms_norm_eps)), qk_norm=True)
    return BlockDrafterArgs(**shape, gamma=int(gamma), num_layers=int(config["num_hidden_layers"]),
                            intermediate_size=int(config["intermediate_size"]), target_layers=tuple(layer_ids),
                            head=HEAD_TYPES[head_type] if rank else "none", rank=rank, context_input_norm=False,
                            confidence=confidence, anchor_predicts=not zlab).validate()


def deepspec_state_dict(tensors: dict[str, torch.Tensor], net: BlockDrafter, config: dict, target,
                        where: str) -> dict:
    """``net``'s state dict from a DeepSpec drafter's tensors; ``CheckpointError`` naming missing,
    unexpected and mis-shaped tensors, ``ValueError`` for an embedding or LM head that is not the
    target's."""
    from dspark.models.loading import CheckpointError

    a = net.args
    tensors = {k.removeprefix("model."): v for k, v in tensors.items()}
    parts = {"context_proj.weight": ["fc.weight"], "context_norm": ["hidden_norm.weight"], "norm": ["norm.weight"]}
    for i in range(a.num_layers):
        attn, mlp = f"layers.{i}.self_attn.", f"layers.{i}.mlp."
        parts.update({
            f"layers.{i}.wqkv.weight": [attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"],
            f"layers.{i}.wo.weight": [attn + "o_proj.weight"],
            f"layers.{i}.w13.weight": [mlp + "gate_proj.weight", mlp + "up_proj.weight"],
            f"layers.{i}.w2.weight": [mlp + "down_proj.weight"],
            f"layers.{i}.attention_norm": [f"layers.{i}.input_layernorm.weight"],
            f"layers.{i}.ffn_norm": [f"layers.{i}.post_attention_layernorm.weight"],
        })
    if a.rank:
        parts["token_embedding.weight"] = ["markov_head.markov_w1.weight"]
    if a.head != "none":
        parts["bias_projection.weight"] = ["markov_head.markov_w2.weight"]
    if a.head == "rnn":
        parts.update({"recurrent.weight": ["markov_head.joint_proj.weight"],
                      "recurrent.bias": ["markov_head.joint_proj.bias"]})
    if a.confidence != "none":
        parts.update({"confidence.weight": ["confidence_head.proj.weight"],
                      "confidence.bias": ["confidence_head.proj.bias"]})
    qk_norms = [f"layers.{i}.self_attn.{n}_norm.weight" for i in range(a.num_layers) for n in ("q", "k")]
    required = {name for names in parts.values() for name in names} | set(qk_norms)
    optional = {"embed_tokens.weight", "lm_head.weight", "rotary_emb.inv_freq"}
    missing, unexpected = sorted(required - set(tensors)), sorted(set(tensors) - required - optional)
    if missing or unexpected:
        raise CheckpointError(f"{where} is not a DeepSpec drafter dspark can read: missing {missing}, "
                              f"unexpected {unexpected}")
    state = joined_parts(tensors, parts, where)
    for i in range(a.num_layers):  # one norm per head dimension, shared by the heads: one row per head here
        q_norm, k_norm = (f"layers.{i}.self_attn.{n}_norm.weight" for n in ("q", "k"))
        state[f"layers.{i}.qk_norm"] = torch.cat([per_head_rows(tensors[q_norm], a.num_heads, q_norm, where),
                                                  per_head_rows(tensors[k_norm], a.num_kv_heads, k_norm, where)])
    for name, own in (("embed_tokens.weight", target.embed_tokens.weight), ("lm_head.weight", target.lm_head.weight)):
        copy = tensors.get(name)
        if copy is not None and not equal_at_coarser_precision(copy, own):
            raise ValueError(f"{where} carries a {name.split('.')[0]} that is not the target's: dspark's block "
                             "drafter shares the target's; use the target this drafter was trained for")
    embedding = tensors.get("embed_tokens.weight", target.embed_tokens.weight.detach())
    state["mask_embedding"] = embedding[config["mask_token_id"]]
    expected = net.state_dict()
    misshaped = [f"{k}: expected {tuple(expected[k].shape)}, found {tuple(v.shape)}"
                 for k, v in state.items() if v.shape != expected[k].shape]
    if misshaped:
        raise CheckpointError(f"{where} does not match its config: {'; '.join(misshaped)}")
    return state


def import_deepspec(directory: str | Path, config: dict, target) -> BlockDrafter:
    """A DeepSpec block drafter (``directory`` holding ``config`` and its weights) as a
    :class:`BlockDrafter` for ``target`` (float32, on the CPU; the drafter moves it)."""
    from dspark.models.loading import read_checkpoint_tensors

    where = f"DeepSpec checkpoint {str(directory)!r}"
    args = deepspec_args(config, target, where)
    with torch.device("meta"):  # no random initialisation of weights about to be replaced
        net = BlockDrafter(args)
    state = deepspec_state_dict(read_checkpoint_tensors(directory), net, config, target, where)
    net.load_state_dict({k: v.detach().to("cpu", torch.float32, copy=True).contiguous() for k, v in state.items()},
                        assign=True)  # copies: nothing aliases the checkpoint or the target
    return net
