"""``generate(logprobs=True)``: each generated token's log-probability under the target's own
distribution, whichever drafter proposed it and however many tokens its round emitted."""

import pytest
import torch

import dspark
from dspark.models import load_model

from helpers import ragged_prompts, tiny_hf_model

DRAFTERS = {"none": "none", "ngram": {"name": "ngram", "num_speculative_tokens": 3, "min_n": 1, "max_n": 2},
            "dspark": {"name": "dspark", "num_speculative_tokens": 3, "path": None, "rank": 16},
            "eagle3": {"name": "eagle3", "num_speculative_tokens": 3, "path": None}}


def teacher_forced(target, prompt: list[int], generated: list[int]) -> list[float]:
    """log p(generated[i] | prompt, generated[:i]) from one float64 forward over the sequence."""
    model = load_model(target, dtype="float64")
    ids = torch.tensor([prompt + generated])
    with torch.inference_mode():
        logits = model(ids, model.new_cache(1, ids.shape[1])).logits[0]  # [S, V]
    logprobs = torch.log_softmax(logits, -1)[len(prompt) - 1: len(prompt) - 1 + len(generated)]
    return logprobs.gather(1, torch.tensor(generated).unsqueeze(1)).squeeze(1).tolist()


@pytest.mark.parametrize("drafter", list(DRAFTERS))
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logprobs_equal_a_teacher_forced_forward(drafter, temperature):
    """Float64 target, three requests in chunks of two, some ended early by a stop token: each
    token's log-probability equals the one a single forward over the finished sequence gives."""
    target = tiny_hf_model("qwen3", scale=3.0)
    pipe = dspark.build_pipeline({"target": {"device": "cpu", "dtype": "float64"}, "drafter": DRAFTERS[drafter]},
                                 target_model=target, overrides=["engine.max_batch_size=2"])
    prompts = ragged_prompts(101, lengths=(5, 1, 9))
    free = pipe.generate(prompts, max_new_tokens=20, temperature=temperature, seed=1, ignore_eos=True)
    stop = free.token_ids[1][6]
    result = pipe.generate(prompts, max_new_tokens=20, temperature=temperature, seed=1, ignore_eos=True,
                           stop_token_ids=[stop], logprobs=True)
    assert free.logprobs is None and result.logprobs is not None
    assert len(result.token_ids[1]) <= 7
    for prompt, ids, logprobs in zip(prompts, result.token_ids, result.logprobs):
        assert len(logprobs) == len(ids)
        assert logprobs == pytest.approx(teacher_forced(target, prompt, ids), abs=1e-6)
    if temperature == 0.0:  # greedy tokens are the target's likeliest: log p ≥ log(1/V)
        assert all(lp >= -torch.log(torch.tensor(101.0)).item() for lps in result.logprobs for lp in lps)


def test_logprobs_must_be_a_flag():
    pipe = dspark.build_pipeline({"target": {"device": "cpu"}, "drafter": "none"}, target_model=tiny_hf_model("qwen3"))
    with pytest.raises(TypeError, match="logprobs must be True or False"):
        pipe.generate([[3, 4]], max_new_tokens=2, logprobs=1)
