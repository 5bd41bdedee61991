"""build_pipeline / generate with the autoregressive (`none`) drafter: parity, invariance, stopping."""

import pytest
import torch

import dspark

from helpers import hf_greedy, ragged_prompts, tiny_hf_model

AR = {"drafter": "none", "verifier": "chain", "target": {"device": "cpu"}}


def build(model, *overrides, config=AR, **kwargs):
    return dspark.build_pipeline(config, target_model=model, overrides=list(overrides), **kwargs)


def test_greedy_equals_transformers_generate(family):
    hf = tiny_hf_model(family, scale=3.0)
    prompts = ragged_prompts(hf.config.vocab_size, lengths=(5, 1, 9, 3, 12))
    result = build(hf).generate(prompts, max_new_tokens=16, ignore_eos=True)
    for prompt, ids in zip(prompts, result.token_ids):
        assert ids == hf_greedy(hf, prompt, 16)
    assert result.stats.generated_tokens == 5 * 16
    assert result.stats.mean_accepted_length == 1.0 and result.stats.acceptance_by_position == []


def test_greedy_through_the_transformers_adapter_equals_native(family):
    hf = tiny_hf_model(family, scale=3.0)
    prompts = ragged_prompts(hf.config.vocab_size)
    native = build(hf).generate(prompts, max_new_tokens=10, ignore_eos=True)
    adapter = build(hf, "target.backend=hf")
    assert type(adapter.target).__name__ == "HFCausalLM"
    assert adapter.generate(prompts, max_new_tokens=10, ignore_eos=True).token_ids == native.token_ids


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_batch_invariance_float64(temperature):
    hf = tiny_hf_model("qwen3", scale=3.0)
    pipe = build(hf, "target.dtype=float64")
    prompts = ragged_prompts(hf.config.vocab_size, lengths=(4, 9, 2, 6))
    seeds = [11, 12, 13, 14]
    batched = pipe.generate(prompts, max_new_tokens=12, temperature=temperature, top_k=20, seed=seeds, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        alone = pipe.generate([prompt], max_new_tokens=12, temperature=temperature, top_k=20, seed=[seeds[i]],
                              ignore_eos=True)
        assert alone.token_ids[0] == batched.token_ids[i]


def test_sampling_depends_on_seed_and_is_reproducible():
    pipe = build(tiny_hf_model("llama"))
    prompts = ragged_prompts(101, lengths=(3, 3))
    a = pipe.generate(prompts, max_new_tokens=20, temperature=1.0, seed=5, ignore_eos=True).token_ids
    b = pipe.generate(prompts, max_new_tokens=20, temperature=1.0, seed=5, ignore_eos=True).token_ids
    c = pipe.generate(prompts, max_new_tokens=20, temperature=1.0, seed=6, ignore_eos=True).token_ids
    assert a == b and a != c
    assert a[0] != a[1]  # seed 5 gives request i the seed 5 + i
    # a None in a list of seeds: a fresh seed for that request, the others keep theirs
    torch.manual_seed(0)
    d = pipe.generate(prompts, max_new_tokens=20, temperature=1.0, seed=[5, None], ignore_eos=True).token_ids
    torch.manual_seed(1)
    e = pipe.generate(prompts, max_new_tokens=20, temperature=1.0, seed=[5, None], ignore_eos=True).token_ids
    assert d[0] == e[0] == a[0] and d[1] != e[1]


def test_eos_stops_each_request_and_is_included():
    hf = tiny_hf_model("llama", scale=3.0)
    prompts = ragged_prompts(101, lengths=(4, 6, 2, 8))
    free = build(hf).generate(prompts, max_new_tokens=12, ignore_eos=True).token_ids
    # make the 4th generated token of request 0 the EOS: stop there, others unaffected
    eos = free[0][3]
    pipe = build(hf)
    pipe.engine.eos_token_ids = (eos,)
    stopped = pipe.generate(prompts, max_new_tokens=12).token_ids
    for full, got in zip(free, stopped):
        cut = full.index(eos) + 1 if eos in full else len(full)
        assert got == full[:cut]
    assert stopped[0][-1] == eos and len(stopped[0]) <= 4


def test_max_new_tokens_and_stats():
    pipe = build(tiny_hf_model("qwen2"))
    result = pipe.generate([[3, 4, 5], [6]], max_new_tokens=1, ignore_eos=True)
    assert [len(t) for t in result.token_ids] == [1, 1]
    assert result.stats.rounds == 0 and result.stats.target_forwards == 0
    result = pipe.generate([[3, 4, 5], [6]], max_new_tokens=7, ignore_eos=True)
    assert result.stats.rounds == 6 and result.stats.target_forwards == 12 and result.stats.generated_tokens == 14
    assert result.stats.tokens_per_second > 0 and "14 tokens" in result.stats.summary()


def test_max_batch_size_splits_without_changing_results():
    hf = tiny_hf_model("llama", scale=3.0)
    prompts = ragged_prompts(101, lengths=(4, 6, 2, 8, 5))
    whole = build(hf).generate(prompts, max_new_tokens=6, ignore_eos=True)
    split = build(hf, "engine.max_batch_size=2").generate(prompts, max_new_tokens=6, ignore_eos=True)
    assert split.token_ids == whole.token_ids
    assert split.stats.generated_tokens == whole.stats.generated_tokens == 30


def test_string_prompts_with_the_byte_tokenizer():
    pipe = build(tiny_hf_model("llama", vocab_size=258), "target.tokenizer=bytes")
    result = pipe.generate(["hello", "a longer prompt"], max_new_tokens=5, ignore_eos=True)
    assert len(result.texts) == 2 and all(isinstance(t, str) for t in result.texts)
    assert pipe.tokenizer.decode(pipe.tokenizer("héllo ✓")["input_ids"]) == "héllo ✓"


def test_build_from_checkpoint_directory(tmp_path):
    hf = tiny_hf_model("qwen3", scale=3.0)
    hf.save_pretrained(tmp_path)
    pipe = dspark.build_pipeline({"target": {"path": str(tmp_path), "device": "cpu"}})
    prompt = ragged_prompts(101, lengths=(6,))
    assert pipe.generate(prompt, max_new_tokens=8, ignore_eos=True).token_ids[0] == hf_greedy(hf, prompt[0], 8)
    assert pipe.engine.eos_token_ids == (100,)


def test_quick_start_config_runs():
    pipe = dspark.build_pipeline("ar", overrides=["target.device=cpu"])
    result = pipe.generate(["Hello"], max_new_tokens=4)
    assert len(result.token_ids[0]) <= 4 and isinstance(result.texts[0], str)


@pytest.mark.parametrize("drafter", ["none", "ngram", "dspark"])
def test_stop_token_ids_end_requests_like_eos(drafter):
    """Per-call stop tokens end each request at their first occurrence (kept in the output), with
    ``ignore_eos`` too, and leave the other requests as they were; bad ids are refused before work."""
    hf = tiny_hf_model("llama", scale=3.0)
    prompts = ragged_prompts(101, lengths=(4, 6, 2, 8))
    free = build(hf).generate(prompts, max_new_tokens=14, ignore_eos=True).token_ids
    stops = [free[0][4], free[2][7]]
    section = {"none": "none", "ngram": {"name": "ngram", "num_speculative_tokens": 3, "min_n": 1, "max_n": 2},
               "dspark": {"name": "dspark", "num_speculative_tokens": 3, "path": None, "rank": 16}}[drafter]
    pipe = build(hf, config={**AR, "drafter": section})
    stopped = pipe.generate(prompts, max_new_tokens=14, ignore_eos=True, stop_token_ids=stops).token_ids
    for full, got in zip(free, stopped):
        cut = min([full.index(t) + 1 for t in stops if t in full], default=len(full))
        assert got == full[:cut]
    assert stopped[0][-1] in stops and len(stopped[0]) <= 5
    assert pipe.generate(prompts, max_new_tokens=14, ignore_eos=True).token_ids == free  # only for that call
    for bad, error in (([hf.config.vocab_size], ValueError), ([-1], ValueError), ([True], ValueError),
                       (["3"], ValueError), (3, TypeError)):
        with pytest.raises(error, match="stop_token_ids"):
            pipe.generate(prompts, max_new_tokens=4, stop_token_ids=bad)


def test_min_new_tokens_holds_eos_back_as_transformers_does():
    """The EOS that plain decoding meets 3rd is held back until 6 tokens: the output equals
    transformers' generate(min_new_tokens=6) token for token; speculative pipelines equal it too."""
    hf = tiny_hf_model("llama", scale=3.0)
    prompts = ragged_prompts(101, lengths=(4, 6, 2))
    free = build(hf).generate(prompts, max_new_tokens=16, ignore_eos=True).token_ids
    eos = free[0][2]
    expected = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=6,
                              do_sample=False, eos_token_id=eos, pad_token_id=0)
        expected.append(out[0, len(prompt):].tolist())
    assert eos in expected[0][6:] or eos not in expected[0]  # held back, not removed
    assert all(eos not in ids[:6] for ids in expected)
    for section in ("none", {"name": "ngram", "num_speculative_tokens": 3, "min_n": 1, "max_n": 2},
                    {"name": "dspark", "num_speculative_tokens": 3, "path": None, "rank": 16}):
        pipe = build(hf, config={**AR, "drafter": section})
        got = pipe.generate(prompts, max_new_tokens=16, stop_token_ids=[eos], min_new_tokens=6).token_ids
        assert got == expected
    for bad in (-1, 17, 2.0, True):
        with pytest.raises(ValueError, match="min_new_tokens must be an integer"):
            pipe.generate(prompts, max_new_tokens=16, min_new_tokens=bad)


def test_trust_remote_code_reaches_the_tokenizer_and_the_draft_model(tmp_path):
    """A tokenizer or a draft model whose checkpoint ships its own classes loads only when asked:
    ``target.trust_remote_code`` covers the target's tokenizer, ``drafter.trust_remote_code`` the
    draft model (once neither reached them, and such checkpoints could not be used at all)."""
    from helpers import TINY, needs_custom_code
    from dspark.tokenization import byte_tokenizer

    tokenizer_dir, draft_dir = tmp_path / "tokenizer", tmp_path / "draft"
    byte_tokenizer().save_pretrained(tokenizer_dir)
    tiny_hf_model("qwen3", seed=3, num_hidden_layers=1).save_pretrained(draft_dir)
    needs_custom_code(draft_dir, tokenizer_dir)
    target = "{" + ", ".join(f"{k}: {v}" for k, v in TINY["qwen3"].items()) + "}"
    setup = ["target.device=cpu", "target.dtype=float64", f"target.random={target}"]

    with pytest.raises(ValueError, match="custom code"):
        dspark.build_pipeline("ar", overrides=[*setup, f"target.tokenizer={tokenizer_dir}"])
    pipe = dspark.build_pipeline("ar", overrides=[*setup, f"target.tokenizer={tokenizer_dir}",
                                                  "target.trust_remote_code=true"])
    assert type(pipe.tokenizer).__name__ == "CustomTokenizer"

    drafting = [*setup, f"drafter.path={draft_dir}"]
    with pytest.raises(ValueError, match="custom code"):
        dspark.build_pipeline("draft_model", overrides=drafting)
    with pytest.raises(ValueError, match="custom code"):  # the target's flag is not the draft model's
        dspark.build_pipeline("draft_model", overrides=[*drafting, "target.trust_remote_code=true"])
    pipe = dspark.build_pipeline("draft_model", overrides=[*drafting, "drafter.trust_remote_code=true"])
    assert type(pipe.drafter.model.model).__name__ == "CustomForCausalLM"
    prompts = [[1, 2, 3], [7, 8]]
    reference = dspark.build_pipeline("ar", overrides=setup).generate(prompts, max_new_tokens=12, ignore_eos=True)
    assert pipe.generate(prompts, max_new_tokens=12, ignore_eos=True).token_ids == reference.token_ids
