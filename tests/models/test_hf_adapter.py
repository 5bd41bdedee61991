"""The transformers adapter (slow path) honours the same contract as the native model.

(transformers computes RMSNorm and rotary tables in float32 even for float64 weights, hence 1e-5.)
"""

import torch

from dspark.models import load_model

from helpers import tiny_hf_model


def adapter_and_native(family="llama"):
    hf = tiny_hf_model(family, scale=3.0)
    return load_model(hf, backend="hf", dtype="float64"), load_model(hf, dtype="float64")


def test_ragged_forward_and_rollback_match_native(family):
    adapter, native = adapter_and_native(family)
    prompts = torch.randint(0, 101, (2, 7))
    drafts = torch.randint(0, 101, (2, 4))
    after = torch.randint(0, 101, (2, 2))
    results = []
    for model in (adapter, native):
        cache = model.new_cache(2, 32)
        model(prompts, cache, torch.tensor([7, 3]))
        model(drafts, cache, torch.tensor([4, 2]))
        cache.rollback(torch.tensor([3, 0]))  # row 0 keeps 1 draft, row 1 keeps both of its 2
        logits = model(after, cache, torch.tensor([2, 1])).logits
        results.append((logits, cache.lengths.clone()))
    (a_logits, a_len), (n_logits, n_len) = results
    assert a_len.tolist() == n_len.tolist() == [10, 6]
    assert torch.allclose(a_logits[0], n_logits[0], atol=1e-5)
    assert torch.allclose(a_logits[1, :1], n_logits[1, :1], atol=1e-5)


def test_rollback_crops_unused_slots():
    adapter, _ = adapter_and_native()
    cache = adapter.new_cache(2, 32)
    adapter(torch.randint(0, 101, (2, 5)), cache)
    adapter(torch.randint(0, 101, (2, 3)), cache)
    assert cache.physical_len == 8
    cache.rollback(torch.tensor([3, 3]))
    assert cache.physical_len == 5 and cache.dynamic.get_seq_length() == 5
    cache.reset()
    assert cache.physical_len == 0 and cache.lengths.tolist() == [0, 0]


def test_hidden_states_and_attention_mask_match_native():
    adapter, native = adapter_and_native("qwen3")
    ids = torch.randint(0, 101, (1, 6))
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool).unsqueeze(0)
    outs = []
    for model in (adapter, native):
        cache = model.new_cache(1, 16)
        model(ids, cache)
        outs.append(model(torch.randint(0, 101, (1, 4), generator=torch.Generator().manual_seed(0)), cache,
                          attention_mask=mask, hidden_layers=(0, 2)))
    assert torch.allclose(outs[0].logits, outs[1].logits, atol=1e-5)
    for a, n in zip(outs[0].hidden_states, outs[1].hidden_states):
        assert torch.allclose(a, n, atol=1e-5)


def test_unsupported_architecture_falls_back_to_the_adapter():
    from dspark.models import random_hf_model

    gpt2 = random_hf_model(dict(model_type="gpt2", vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_positions=64))
    model = load_model(gpt2)
    assert type(model).__name__ == "HFCausalLM" and model.num_layers == 2
    cache = model.new_cache(1, 16)
    out = model(torch.randint(0, 50, (1, 5)), cache, hidden_layers=(1,))
    with torch.no_grad():
        expected = gpt2(torch.randint(0, 50, (1, 5), generator=torch.Generator().manual_seed(0))).logits
    assert out.logits.shape == (1, 5, 50) and out.hidden_states[0].shape == (1, 5, 32)
    assert expected.shape == out.logits.shape
