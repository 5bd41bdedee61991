"""The native Llama/Qwen2/Qwen3 model against transformers, and its ragged / masked forward."""

import pytest
import torch

from dspark.models import CheckpointError, load_model
from dspark.models.native import UnsupportedArchitectureError

from helpers import tiny_hf_model


def test_logits_match_transformers(family):
    hf = tiny_hf_model(family, scale=3.0)
    model = load_model(hf)
    ids = torch.randint(0, hf.config.vocab_size, (3, 11))
    with torch.no_grad():
        expected = hf(ids).logits
    out = model(ids, model.new_cache(3, 16))
    assert out.logits.shape == expected.shape
    assert (out.logits - expected).abs().max() <= 1e-4


def test_incremental_forward_matches_full_forward(family):
    model = load_model(tiny_hf_model(family, scale=3.0))
    ids = torch.randint(0, model.vocab_size, (2, 12))
    full = model(ids, model.new_cache(2, 16)).logits
    cache = model.new_cache(2, 16)
    parts = [model(ids[:, a:b], cache).logits for a, b in ((0, 5), (5, 6), (6, 12))]
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)
    assert cache.lengths.tolist() == [12, 12]


def test_ragged_batch_equals_each_row_alone(family):
    """Rows with different cached lengths and numbers of new tokens (right padding) in one forward."""
    model = load_model(tiny_hf_model(family, scale=3.0), dtype="float64")
    prompts = [torch.randint(0, model.vocab_size, (n,)) for n in (4, 7, 2)]
    new = [torch.randint(0, model.vocab_size, (n,)) for n in (3, 1, 2)]
    cache = model.new_cache(3, 16)
    batch_prompt = torch.zeros(3, 7, dtype=torch.long)
    batch_new = torch.zeros(3, 3, dtype=torch.long)
    for b in range(3):
        batch_prompt[b, : len(prompts[b])] = prompts[b]
        batch_new[b, : len(new[b])] = new[b]
    model(batch_prompt, cache, torch.tensor([4, 7, 2]))
    logits = model(batch_new, cache, torch.tensor([3, 1, 2])).logits
    assert cache.lengths.tolist() == [7, 8, 4]
    for b in range(3):
        alone = model.new_cache(1, 16)
        expected = model(torch.cat([prompts[b], new[b]]).unsqueeze(0), alone).logits[0, len(prompts[b]):]
        assert torch.allclose(logits[b, : len(new[b])], expected, atol=1e-10)


def test_custom_attention_mask_among_new_tokens():
    """A causal custom mask equals the default; a block-diagonal one isolates the blocks."""
    model = load_model(tiny_hf_model("qwen3", scale=3.0), dtype="float64")
    prompt = torch.randint(0, model.vocab_size, (1, 5))
    branch_a, branch_b = torch.randint(0, model.vocab_size, (1, 2)), torch.randint(0, model.vocab_size, (1, 2))
    new = torch.cat([branch_a, branch_b], 1)

    def run(tokens, mask):
        cache = model.new_cache(1, 16)
        model(prompt, cache)
        return model(tokens, cache, attention_mask=mask).logits

    causal = torch.ones(4, 4, dtype=torch.bool).tril().unsqueeze(0)
    assert torch.allclose(run(new, causal), run(new, None), atol=1e-12)

    # tokens 0,1 form branch a and tokens 2,3 branch b; each sees the prompt and its own branch only
    blocks = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool).unsqueeze(0)
    logits = run(new, blocks)
    assert torch.allclose(logits[:, :2], run(branch_a, None), atol=1e-12)  # branch a sits where it would alone
    other_a = (branch_a + 1) % model.vocab_size
    changed = run(torch.cat([other_a, branch_b], 1), blocks)
    assert torch.equal(changed[:, 2:], logits[:, 2:])  # branch b cannot see branch a
    assert not torch.equal(changed[:, :2], logits[:, :2])


def test_hidden_states_are_decoder_layer_outputs(family):
    hf = tiny_hf_model(family, scale=3.0)
    model = load_model(hf)
    ids = torch.randint(0, hf.config.vocab_size, (2, 6))
    captured = {}
    hooks = [layer.register_forward_hook(lambda m, i, o, k=k: captured.__setitem__(k, o[0] if isinstance(o, tuple) else o))
             for k, layer in enumerate(hf.model.layers)]
    with torch.no_grad():
        hf(ids)
    for h in hooks:
        h.remove()
    layers = tuple(range(hf.config.num_hidden_layers))
    out = model(ids, model.new_cache(2, 8), hidden_layers=layers[::-1])
    for k, hidden in zip(layers[::-1], out.hidden_states):
        assert (hidden - captured[k]).abs().max() <= 1e-4


def test_keys_values_alone_equal_the_full_projection(family):
    """``project_kv`` (context injection) skips the queries but must give the same keys/values:
    Qwen2's q/k/v bias and Qwen3's per-head q/k norm slice with the weight."""
    model = load_model(tiny_hf_model(family, scale=3.0), dtype="float64")
    x = torch.randn(2, 5, model.args.hidden_size, dtype=torch.float64)
    rope = model.rotary(torch.arange(3, 8).expand(2, -1), x.dtype)
    for block in model.layers:
        if block.qk_norm is not None:  # a distinct scale per head, so that a wrong slice shows
            block.qk_norm.data = torch.randn_like(block.qk_norm)
        expected = block.project(x, rope)[1]
        assert torch.allclose(block.project_kv(x, rope), expected, rtol=0, atol=1e-12)


def test_hidden_layer_out_of_range_is_an_error():
    model = load_model(tiny_hf_model("llama"))
    with pytest.raises(ValueError, match=r"hidden layer id 2 is outside this model's layers 0\.\.1"):
        model(torch.zeros(1, 2, dtype=torch.long), model.new_cache(1, 4), hidden_layers=(2,))


def test_logits_positions_select_rows():
    model = load_model(tiny_hf_model("llama", scale=3.0))
    ids = torch.randint(0, model.vocab_size, (2, 6))
    full = model(ids, model.new_cache(2, 8)).logits
    picked = model(ids, model.new_cache(2, 8), logits_positions=torch.tensor([[5], [2]])).logits
    assert torch.allclose(picked[:, 0], torch.stack([full[0, 5], full[1, 2]]), atol=1e-6)


def test_bfloat16_keeps_float32_rotary_frequencies():
    model = load_model(tiny_hf_model("qwen3"), dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and model.inv_freq.dtype == torch.float32
    out = model(torch.randint(0, model.vocab_size, (1, 4)), model.new_cache(1, 8))
    assert torch.isfinite(out.logits).all()


def test_checkpoint_directory_roundtrip(tmp_path, family):
    hf = tiny_hf_model(family, scale=3.0)
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    ids = torch.randint(0, hf.config.vocab_size, (1, 7))
    with torch.no_grad():
        expected = hf(ids).logits
    assert (model(ids, model.new_cache(1, 8)).logits - expected).abs().max() <= 1e-4
    assert model.generation_config.eos_token_id == 100


def test_pytorch_bin_checkpoint_loads_with_weights_only(tmp_path):
    hf = tiny_hf_model("llama", scale=3.0)
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    model = load_model(tmp_path)
    ids = torch.randint(0, 101, (1, 5))
    with torch.no_grad():
        assert (model(ids, model.new_cache(1, 8)).logits - hf(ids).logits).abs().max() <= 1e-4


def test_missing_and_misshaped_tensors_are_named(tmp_path):
    from safetensors.torch import save_file

    hf = tiny_hf_model("qwen3")
    hf.config.save_pretrained(tmp_path)
    tensors = {k: v.clone() for k, v in hf.state_dict().items()}
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.k_norm.weight"] = torch.ones(7)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path)
    message = str(err.value)
    assert "missing tensors: model.layers.1.mlp.up_proj.weight" in message
    assert "model.layers.0.self_attn.k_norm.weight: expected (32,), found (7,)" in message


def test_checkpoint_directory_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_model(tmp_path)
    tiny_hf_model("llama").config.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no weights in"):
        load_model(tmp_path)


def test_native_backend_refuses_unsupported_architecture():
    from dspark.models import random_hf_model

    gpt2 = random_hf_model(dict(model_type="gpt2", vocab_size=50, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    with pytest.raises(UnsupportedArchitectureError, match="model_type 'gpt2' has no native implementation"):
        load_model(gpt2, backend="native")
