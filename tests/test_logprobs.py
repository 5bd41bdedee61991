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


@pytest.mark.parametrize("drafter", list(DRAFTERS))
def test_top_logprobs_equal_a_teacher_forced_forward(drafter):
    """The k likeliest tokens at each generated position, likeliest first, with their
    log-probabilities: those of one float64 forward over the finished sequence (sampled, with
    penalties: the alternatives are the target's own distribution's, before any processing)."""
    target = tiny_hf_model("qwen3", scale=3.0)
    pipe = dspark.build_pipeline({"target": {"device": "cpu", "dtype": "float64"}, "drafter": DRAFTERS[drafter]},
                                 target_model=target, overrides=["engine.max_batch_size=2"])
    prompts = ragged_prompts(101, lengths=(5, 1, 9))
    result = pipe.generate(prompts, max_new_tokens=16, temperature=1.0, seed=3, ignore_eos=True, logprobs=True,
                           top_logprobs=4, repetition_penalty=1.3)
    model = load_model(target, dtype="float64")
    for prompt, ids, chosen, top in zip(prompts, result.token_ids, result.logprobs, result.top_logprobs):
        assert len(top) == len(ids) and all(len(alternatives) == 4 for alternatives in top)
        sequence = torch.tensor([prompt + ids])
        with torch.inference_mode():
            logits = model(sequence, model.new_cache(1, sequence.shape[1])).logits[0]
        values, tokens = torch.log_softmax(logits, -1)[len(prompt) - 1: len(prompt) - 1 + len(ids)].topk(4, -1)
        assert [[token for token, _ in alternatives] for alternatives in top] == tokens.tolist()
        for alternatives, want in zip(top, values.tolist()):
            assert [lp for _, lp in alternatives] == pytest.approx(want, abs=1e-6)
        for token, logprob, alternatives in zip(ids, chosen, top):  # the chosen token is among them or below them
            assert token in [t for t, _ in alternatives] or logprob <= alternatives[-1][1] + 1e-9


@pytest.mark.parametrize("drafter, backend", [(d, "native") for d in DRAFTERS] + [("none", "hf"), ("ngram", "hf")])
def test_prompt_logprobs_equal_a_teacher_forced_forward(drafter, backend, monkeypatch):
    """Each prompt token's log-probability given the ones before it (ragged prompts, two per
    batch; native targets score them 4 positions per LM-head call here, transformers-backed ones
    all at once), as one float64 forward over the prompt gives it; asking changes no output."""
    import dspark.engine.prefill

    monkeypatch.setattr(dspark.engine.prefill, "PROMPT_SCORE_CHUNK", 4)
    target = tiny_hf_model("qwen3", scale=3.0)
    pipe = dspark.build_pipeline({"target": {"device": "cpu", "dtype": "float64", "backend": backend},
                                  "drafter": DRAFTERS[drafter]}, target_model=target, overrides=["engine.max_batch_size=2"])
    assert hasattr(pipe.target, "logits_of") == (backend == "native")
    prompts = ragged_prompts(101, lengths=(5, 1, 9))
    plain = pipe.generate(prompts, max_new_tokens=10, temperature=1.0, seed=4, ignore_eos=True)
    scored = pipe.generate(prompts, max_new_tokens=10, temperature=1.0, seed=4, ignore_eos=True, prompt_logprobs=True)
    assert plain.prompt_logprobs is None and scored.token_ids == plain.token_ids
    for prompt, logprobs in zip(prompts, scored.prompt_logprobs):
        assert len(logprobs) == len(prompt) and logprobs[0] is None
        assert logprobs[1:] == pytest.approx(teacher_forced(target, prompt[:1], prompt[1:]), abs=1e-6)


@pytest.mark.parametrize("drafter, backend", [("none", "native"), ("eagle3", "native"), ("none", "hf")])
def test_prompt_top_logprobs_equal_a_teacher_forced_forward(drafter, backend, monkeypatch):
    """The k likeliest tokens at each prompt position (likeliest first, ``None`` at the first),
    as one float64 forward over the prompt gives them — in chunks of 4 positions for native
    targets, at once for transformers-backed ones; a batch of one-token prompts has nothing to
    score; asking changes no output."""
    import dspark.engine.prefill

    monkeypatch.setattr(dspark.engine.prefill, "PROMPT_SCORE_CHUNK", 4)
    target = tiny_hf_model("qwen3", scale=3.0)
    pipe = dspark.build_pipeline({"target": {"device": "cpu", "dtype": "float64", "backend": backend},
                                  "drafter": DRAFTERS[drafter]}, target_model=target, overrides=["engine.max_batch_size=2"])
    prompts = ragged_prompts(101, lengths=(5, 1, 9))
    plain = pipe.generate(prompts, max_new_tokens=6, temperature=1.0, seed=4, ignore_eos=True, prompt_logprobs=True)
    scored = pipe.generate(prompts, max_new_tokens=6, temperature=1.0, seed=4, ignore_eos=True, prompt_logprobs=True,
                           prompt_top_logprobs=3)
    assert plain.prompt_top_logprobs is None and scored.token_ids == plain.token_ids
    assert scored.prompt_logprobs == plain.prompt_logprobs
    model = load_model(target, dtype="float64")
    for prompt, chosen, top in zip(prompts, scored.prompt_logprobs, scored.prompt_top_logprobs):
        assert len(top) == len(prompt) and top[0] is None
        with torch.inference_mode():
            logits = model(torch.tensor([prompt]), model.new_cache(1, len(prompt))).logits[0, :-1]
        values, tokens = torch.log_softmax(logits, -1).topk(3, -1)
        assert [[t for t, _ in alternatives] for alternatives in top[1:]] == tokens.tolist()
        for alternatives, want, token, logprob in zip(top[1:], values.tolist(), prompt[1:], chosen[1:]):
            assert [lp for _, lp in alternatives] == pytest.approx(want, abs=1e-6)  # (scores are float32)
            assert token not in [t for t, _ in alternatives] or dict(alternatives)[token] == pytest.approx(logprob)
    single = pipe.generate([[7], [9]], max_new_tokens=2, prompt_logprobs=True, prompt_top_logprobs=2)
    assert single.prompt_logprobs == [[None], [None]] and single.prompt_top_logprobs == [[None], [None]]


def test_top_logprobs_are_checked():
    pipe = dspark.build_pipeline({"target": {"device": "cpu"}, "drafter": "none"}, target_model=tiny_hf_model("qwen3"))
    with pytest.raises(ValueError, match="top_logprobs needs logprobs=True"):
        pipe.generate([[3, 4]], max_new_tokens=2, top_logprobs=3)
    for bad in (-1, 21, 2.0, True):
        with pytest.raises(ValueError, match=r"top_logprobs must be an integer in \[0, 20\]"):
            pipe.generate([[3, 4]], max_new_tokens=2, logprobs=True, top_logprobs=bad)
    assert pipe.generate([[3, 4]], max_new_tokens=2, logprobs=True).top_logprobs is None
    with pytest.raises(TypeError, match="prompt_logprobs must be True or False"):
        pipe.generate([[3, 4]], max_new_tokens=2, prompt_logprobs=1)
    with pytest.raises(ValueError, match="prompt_top_logprobs needs prompt_logprobs=True"):
        pipe.generate([[3, 4]], max_new_tokens=2, prompt_top_logprobs=2)
    with pytest.raises(ValueError, match=r"prompt_top_logprobs must be an integer in \[0, 20\]"):
        pipe.generate([[3, 4]], max_new_tokens=2, prompt_logprobs=True, prompt_top_logprobs=21)


def test_top_logprobs_take_numpy_integers():
    """numpy ints were refused as top_logprobs / prompt_top_logprobs (generate, sessions and their
    requests), though taken as max_new_tokens and seeds; numpy's bools stay refused."""
    np = pytest.importorskip("numpy")
    pipe = dspark.build_pipeline({"target": {"device": "cpu"}, "drafter": "none"}, target_model=tiny_hf_model("qwen3"))
    scores = dict(logprobs=True, top_logprobs=2, prompt_logprobs=True, prompt_top_logprobs=3)
    want = pipe.generate([[3, 4]], max_new_tokens=3, **scores)
    got = pipe.generate([[3, 4]], max_new_tokens=3, **{**scores, "top_logprobs": np.int64(2),
                                                         "prompt_top_logprobs": np.int32(3)})
    assert (got.top_logprobs, got.prompt_top_logprobs) == (want.top_logprobs, want.prompt_top_logprobs)
    session = pipe.session(max_len=np.int64(16), logprobs=True, top_logprobs=np.int64(2))
    index = session.submit([3, 4], max_new_tokens=3, logprobs=True, top_logprobs=np.int16(2), prompt_logprobs=True,
                           prompt_top_logprobs=np.uint8(3))
    while session.unfinished:
        session.step()
    output = session.result(index)
    # (a session's cache is another size than generate's: its attention sums round differently, by an ulp or so)
    for got_steps, want_steps in ((output.top_logprobs, want.top_logprobs[0]),
                                  (output.prompt_top_logprobs, want.prompt_top_logprobs[0])):
        assert [step is None or len(step) for step in got_steps] == [step is None or len(step) for step in want_steps]
        got_pairs = [pair for step in got_steps for pair in step or ()]  # (the first prompt token has no scores)
        want_pairs = [pair for step in want_steps for pair in step or ()]
        assert [token for token, _ in got_pairs] == [token for token, _ in want_pairs]
        assert [value for _, value in got_pairs] == pytest.approx([value for _, value in want_pairs], abs=1e-5)
    for bad in (np.bool_(True), np.int64(21), np.float64(2.0)):
        with pytest.raises(ValueError, match=r"top_logprobs must be an integer in \[0, 20\]"):
            pipe.generate([[3, 4]], max_new_tokens=2, logprobs=True, top_logprobs=bad)


def test_logprobs_must_be_a_flag():
    pipe = dspark.build_pipeline({"target": {"device": "cpu"}, "drafter": "none"}, target_model=tiny_hf_model("qwen3"))
    with pytest.raises(TypeError, match="logprobs must be True or False"):
        pipe.generate([[3, 4]], max_new_tokens=2, logprobs=1)
