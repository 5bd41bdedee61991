"""The released drafters at their real sizes, without their weights: configs as DeepSpec and the
EAGLE authors write them for Qwen3-4B and Llama-3.1-8B parse into the expected architecture, and
tensors named and shaped as those formats define them (written out here from the formats, on the
meta device) fill the network exactly — nothing missing, unexpected or mis-shaped."""

from dataclasses import replace

import torch
from transformers import LlamaConfig, Qwen3Config

from dspark.drafters.block_model import BlockDrafter
from dspark.drafters.deepspec_import import deepspec_args, deepspec_state_dict
from dspark.drafters.eagle3_import import published_args, published_state_dict
from dspark.drafters.eagle_model import Eagle3Head
from dspark.models.native import ModelArgs, NativeCausalLM, rope_inverse_frequencies

QWEN3_4B = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=2560, intermediate_size=9728,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, num_hidden_layers=36, rms_norm_eps=1e-6,
                rope_theta=1000000.0, rope_scaling=None, max_position_embeddings=40960, vocab_size=151936,
                tie_word_embeddings=True, hidden_act="silu", attention_bias=False)
LLAMA_31_8B = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=14336,
                   num_attention_heads=32, num_key_value_heads=8, num_hidden_layers=32, rms_norm_eps=1e-5,
                   rope_theta=500000.0, max_position_embeddings=131072, vocab_size=128256, tie_word_embeddings=False,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192}, hidden_act="silu")


def meta_target(config_class, fields):
    """The target's architecture with its real rotary frequencies and no weights (meta device)."""
    config = config_class(**fields)
    inv_freq, scaling = rope_inverse_frequencies(config, fields.get("head_dim") or fields["hidden_size"] // fields["num_attention_heads"])
    with torch.device("meta"):
        target = NativeCausalLM(ModelArgs.from_hf_config(config), inv_freq, scaling)
    target.inv_freq = inv_freq
    return config.to_dict(), target


def meta(*shape):
    return torch.empty(*shape, device="meta")


def qwen3_layer(prefix, hidden, heads, kv_heads, head_dim, inter, qkv_in=None):
    """A Qwen3 / Llama decoder layer's tensors as transformers names them (q/k norms added by the caller)."""
    qkv_in = qkv_in or hidden
    return {prefix + "self_attn.q_proj.weight": meta(heads * head_dim, qkv_in),
            prefix + "self_attn.k_proj.weight": meta(kv_heads * head_dim, qkv_in),
            prefix + "self_attn.v_proj.weight": meta(kv_heads * head_dim, qkv_in),
            prefix + "self_attn.o_proj.weight": meta(hidden, heads * head_dim),
            prefix + "mlp.gate_proj.weight": meta(inter, hidden), prefix + "mlp.up_proj.weight": meta(inter, hidden),
            prefix + "mlp.down_proj.weight": meta(hidden, inter),
            prefix + "input_layernorm.weight": meta(hidden), prefix + "post_attention_layernorm.weight": meta(hidden)}


def test_deepspec_dspark_for_qwen3_4b():
    target_config, target = meta_target(Qwen3Config, QWEN3_4B)
    config = {**target_config, "architectures": ["Qwen3DSparkModel"], "num_hidden_layers": 5, "num_target_layers": 36,
              "layer_types": ["full_attention"] * 5, "block_size": 7, "target_layer_ids": [1, 9, 17, 25, 33],
              "mask_token_id": 151669, "num_anchors": 512, "markov_rank": 256, "markov_head_type": "vanilla",
              "enable_confidence_head": True, "confidence_head_with_markov": True, "tie_word_embeddings": False}
    args = deepspec_args(config, target)
    assert (args.gamma, args.num_layers, args.target_layers, args.head, args.rank, args.confidence) == (
        7, 5, (1, 9, 17, 25, 33), "markov", 256, "token")
    tensors = {"fc.weight": meta(2560, 5 * 2560), "hidden_norm.weight": meta(2560), "norm.weight": meta(2560),
               "markov_head.markov_w1.weight": meta(151936, 256), "markov_head.markov_w2.weight": meta(151936, 256),
               "confidence_head.proj.weight": meta(1, 2560 + 256), "confidence_head.proj.bias": meta(1)}
    for i in range(5):
        tensors.update(qwen3_layer(f"layers.{i}.", 2560, 32, 8, 128, 9728))
        tensors.update({f"layers.{i}.self_attn.q_norm.weight": meta(128), f"layers.{i}.self_attn.k_norm.weight": meta(128)})
    with torch.device("meta"):
        net = BlockDrafter(args)
    state = deepspec_state_dict(tensors, net, config, target, "the checkpoint")
    assert set(state) == set(net.state_dict())  # and every shape matched (else CheckpointError)


def test_eagle3_head_for_llama_31_8b():
    """The EAGLE authors' head for Llama-3.1-8B-Instruct: a 32,000-token draft vocabulary, the default
    aux layers (2, 16, 29) = outputs of layers 1, 15, 28, llama3 rope scaling."""
    target_config, target = meta_target(LlamaConfig, LLAMA_31_8B)
    config = {**target_config, "architectures": ["LlamaForCausalLMEagle3"], "num_hidden_layers": 1,
              "draft_vocab_size": 32000, "max_position_embeddings": 2048}
    args = published_args(config, target)
    assert (args.target_layers, args.draft_vocab_size, args.qk_norm) == ((1, 15, 28), 32000, False)
    tensors = {"fc.weight": meta(4096, 3 * 4096), "norm.weight": meta(4096), "lm_head.weight": meta(32000, 4096),
               "midlayer.hidden_norm.weight": meta(4096), "d2t": torch.zeros(32000, dtype=torch.long),
               "t2d": torch.zeros(128256, dtype=torch.bool),
               **qwen3_layer("midlayer.", 4096, 32, 8, 128, 14336, qkv_in=2 * 4096)}
    with torch.device("meta"):
        head = Eagle3Head(args)
    state = published_state_dict(tensors, head, target, "the checkpoint")
    assert set(state) == set(head.state_dict())


def test_deepspec_eagle3_head_for_qwen3_4b():
    target_config, target = meta_target(Qwen3Config, QWEN3_4B)
    config = {**target_config, "architectures": ["Qwen3Eagle3Model"], "num_hidden_layers": 1, "num_target_layers": 36,
              "layer_types": ["full_attention"], "target_layer_ids": [1, 9, 17, 25, 33], "ttt_length": 7,
              "step_loss_decay": 0.8, "draft_num_hidden_layers": 1, "tie_word_embeddings": False}
    args = replace(published_args(config, target), draft_vocab_size=0)  # its lm_head a copy of the target's: shared
    assert (args.gamma, args.target_layers, args.qk_norm) == (7, (1, 9, 17, 25, 33), True)
    tensors = {"fc.weight": meta(2560, 5 * 2560), "norm.weight": meta(2560), "layers.0.hidden_norm.weight": meta(2560),
               "layers.0.self_attn.q_norm.weight": meta(128), "layers.0.self_attn.k_norm.weight": meta(128),
               **qwen3_layer("layers.0.", 2560, 32, 8, 128, 9728, qkv_in=2 * 2560)}
    with torch.device("meta"):
        head = Eagle3Head(args)
    state = published_state_dict(tensors, head, target, "the checkpoint")
    assert set(state) == set(head.state_dict())
