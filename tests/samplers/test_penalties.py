"""Repetition / presence / frequency penalties against their definitions, written out token by token;
the engine's penalised decoding against transformers'; bad values refused."""

import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import dspark
from dspark.records import SamplingParams, batch_params
from dspark.samplers.penalties import PenaltyHistory, after_draft, banned_ngrams, counted, draft_penalty, penalize_draft

from helpers import ragged_prompts, tiny_hf_model


def reference(logits: list[float], prompt: list[int], output: list[int], params: SamplingParams) -> list[float]:
    """vLLM's definitions, one token at a time, in Python floats: the logit bias, then the penalties."""
    out, bias = [], dict(params.logit_bias)
    for v, x in enumerate(logits):
        x = x + bias.get(v, 0.0)
        if v in prompt or v in output:
            x = x / params.repetition_penalty if x > 0 else x * params.repetition_penalty
        out.append(x - params.frequency_penalty * output.count(v) - params.presence_penalty * (v in output))
    return out


penalty_params = st.builds(SamplingParams, temperature=st.just(1.0),
                           repetition_penalty=st.floats(0.2, 5.0), presence_penalty=st.floats(-2.0, 2.0),
                           frequency_penalty=st.floats(-2.0, 2.0),
                           logit_bias=st.dictionaries(st.integers(0, 5), st.floats(-100, 100), max_size=3).map(
                               lambda bias: tuple(sorted(bias.items()))))


@given(params=penalty_params, seed=st.integers(0, 2**16))
def test_verify_positions_match_the_definition(params, seed):
    """Each verify position penalised with the committed history and the real drafts before it
    (few tokens, so that drafts repeat each other and the history)."""
    g = torch.Generator().manual_seed(seed)
    vocab, width = 6, 5
    lengths, prompt_lengths = torch.tensor([7, 3]), torch.tensor([3, 3])
    tokens = torch.randint(0, vocab, (2, 10), generator=g)
    drafts = torch.randint(0, vocab, (2, width - 1), generator=g)
    num_drafts = torch.tensor([4, 2])  # request 1: two real drafts, then padding
    logits = torch.randn(2, width, vocab, generator=g, dtype=torch.float64) * 3
    history = PenaltyHistory.of(tokens, prompt_lengths, lengths, vocab)
    got = history.penalize_verify(logits, drafts, num_drafts, params)
    for b in range(2):
        prompt, output = tokens[b, :prompt_lengths[b]].tolist(), tokens[b, prompt_lengths[b]:lengths[b]].tolist()
        for j in range(width):
            before = output + drafts[b, :min(j, int(num_drafts[b]))].tolist()  # x_1..x_j, real ones only
            want = reference(logits[b, j].tolist(), prompt, before, params)
            assert torch.allclose(got[b, j], torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_a_drafters_running_penalty_is_the_verifiers():
    """A drafter that penalises its step k with the committed history and its drafts x_1..x_{k-1}
    (running counts) sees at each step exactly what the verifier will apply there."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 5, (3, 8), generator=g)
    history = PenaltyHistory.of(tokens, torch.tensor([2, 5, 8]), torch.tensor([6, 8, 8]), 5)
    drafts = torch.randint(0, 5, (3, 4), generator=g)
    logits = torch.randn(3, 5, 5, generator=g, dtype=torch.float64)
    params = SamplingParams(1.0, repetition_penalty=1.7, presence_penalty=0.4, frequency_penalty=0.9)
    verified = history.penalize_verify(logits, drafts, torch.full((3,), 4), params)
    penalty = draft_penalty(history)
    for k in range(5):
        assert torch.equal(penalize_draft(logits[:, k], params, penalty), verified[:, k])
        if k < 4:
            penalty = after_draft(penalty, drafts[:, k])
    assert torch.equal(counted(torch.zeros(1, 4), torch.tensor([2])), torch.tensor([[0.0, 0.0, 1.0, 0.0]]))


def reference_bans(sequence: list[int], n: int) -> set[int]:
    """transformers' no_repeat_ngram_size rule, written out: the tokens that followed an earlier
    occurrence of the sequence's last n − 1 tokens."""
    if len(sequence) < n:
        return set()
    suffix = sequence[len(sequence) - n + 1:]
    return {sequence[i + n - 1] for i in range(len(sequence) - n + 1) if sequence[i:i + n - 1] == suffix}


@given(n=st.integers(1, 15), seed=st.integers(0, 2**16))
def test_ngram_bans_match_the_definition(n, seed):
    """Each verify position's bans read the committed tokens and the drafts before it (three
    tokens, so that n-grams repeat); n up to longer than the buffer and its drafts (13), where
    nothing is banned (such an n once failed the whole batch)."""
    g = torch.Generator().manual_seed(seed)
    vocab, width = 3, 4
    tokens = torch.randint(0, vocab, (3, 9), generator=g)
    lengths = torch.tensor([5, 1, 9 - width])
    drafts = torch.randint(0, vocab, (3, width), generator=g)
    banned = banned_ngrams(tokens, lengths, drafts, n, vocab)
    for b in range(3):
        for j in range(width + 1):
            sequence = tokens[b, :lengths[b]].tolist() + drafts[b, :j].tolist()
            assert set(banned[b, j].nonzero().flatten().tolist()) == reference_bans(sequence, n)


@given(rows=st.lists(st.tuples(penalty_params, st.integers(0, 3)).map(
    lambda pair: dataclasses.replace(pair[0], no_repeat_ngram_size=pair[1])), min_size=3, max_size=3),
    seed=st.integers(0, 2**16), dtype=st.sampled_from([torch.float64, torch.bfloat16, torch.float16]))
def test_penalties_per_request_are_each_requests_own(rows, seed, dtype):
    """Requests with different penalties, biases and n-gram sizes in one batch: every verify
    position of each row equals that row penalised alone, bit for bit — and so does a drafter's step.
    In half precision too (a request's column of settings was rounded to bfloat16 there: 1.3 became
    1.296875 beside another request, 1.3 alone)."""
    g = torch.Generator().manual_seed(seed)
    vocab, width = 6, 4
    tokens = torch.randint(0, vocab, (3, 10), generator=g)
    history = PenaltyHistory.of(tokens, torch.tensor([3, 2, 5]), torch.tensor([7, 3, 10 - width]), vocab)
    drafts = torch.randint(0, vocab, (3, width - 1), generator=g)
    num_drafts = torch.tensor([3, 1, 2])
    logits = (torch.randn(3, width, vocab, generator=g, dtype=torch.float64) * 3).to(dtype)
    mixed = batch_params(rows, 3)
    got = history.penalize_verify(logits, drafts, num_drafts, mixed)
    drafted = penalize_draft(logits[:, 0], mixed, draft_penalty(history))
    for b, row in enumerate(rows):
        alone = PenaltyHistory.of(tokens[b:b + 1], torch.tensor([3, 2, 5])[b:b + 1], history.lengths[b:b + 1], vocab)
        assert torch.equal(got[b], alone.penalize_verify(logits[b:b + 1], drafts[b:b + 1], num_drafts[b:b + 1], row)[0])
        assert torch.equal(drafted[b], penalize_draft(logits[b:b + 1, 0], row, draft_penalty(alone))[0])


def test_half_precision_logits_are_penalised_in_float32():
    """A float16 model's logits divided by a strong (valid) repetition penalty overflowed to inf."""
    logits = torch.tensor([[[12.0, 9.0, -8.0, 1.0]]], dtype=torch.float16)
    history = PenaltyHistory.of(torch.tensor([[1, 2]]), torch.tensor([2]), torch.tensor([2]), 4)
    params = SamplingParams(1.0, repetition_penalty=1e-4)
    got = history.penalize_verify(logits, torch.zeros(1, 0, dtype=torch.long), torch.tensor([0]), params)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert got[0, 0].tolist() == pytest.approx([12.0, 9e4, -8e-4, 1.0], rel=1e-6)
    assert torch.equal(penalize_draft(logits[:, 0], params, draft_penalty(history)), got[:, 0])


def test_no_penalty_changes_nothing():
    logits = torch.randn(2, 3, 7)
    history = PenaltyHistory.of(torch.randint(0, 7, (2, 5)), torch.tensor([2, 2]), torch.tensor([5, 4]), 7)
    assert not SamplingParams(1.0).penalized
    assert torch.equal(history.penalize_verify(logits, torch.zeros(2, 2, dtype=torch.long), torch.tensor([2, 2]),
                                               SamplingParams(1.0)), logits)
    assert torch.equal(penalize_draft(logits[:, 0], SamplingParams(1.0, repetition_penalty=2.0), None), logits[:, 0])
    assert draft_penalty(None) is None and after_draft(None, torch.tensor([1, 2])) is None


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_repetition_penalty_greedy_equals_transformers(family):
    """transformers' ``repetition_penalty`` (prompt and output, as ours) in its own greedy loop."""
    target = tiny_hf_model(family, scale=3.0)
    prompts = ragged_prompts(target.config.vocab_size, lengths=(5, 1, 9))
    pipe = dspark.build_pipeline({"target": {"device": "cpu"}, "drafter": {"name": "none"}}, target_model=target)
    got = pipe.generate(prompts, max_new_tokens=20, ignore_eos=True, repetition_penalty=1.4).token_ids
    for prompt, ids in zip(prompts, got):
        x = torch.tensor([prompt])
        with torch.no_grad():
            out = target.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=20, do_sample=False,
                                  repetition_penalty=1.4, eos_token_id=None, pad_token_id=0)
        assert ids == out[0, len(prompt):].tolist()
    assert got != pipe.generate(prompts, max_new_tokens=20, ignore_eos=True).token_ids  # the penalty mattered


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_no_repeat_ngram_size_greedy_equals_transformers(family):
    """transformers' ``no_repeat_ngram_size`` (over prompt and output), plain and speculative."""
    target = tiny_hf_model(family, scale=3.0)
    prompts = ragged_prompts(target.config.vocab_size, lengths=(5, 1, 9))
    expected = []
    for prompt in prompts:
        x = torch.tensor([prompt])
        with torch.no_grad():
            out = target.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=20, do_sample=False,
                                  no_repeat_ngram_size=2, eos_token_id=None, pad_token_id=0)
        expected.append(out[0, len(prompt):].tolist())
    for drafter in ("none", {"name": "eagle3", "num_speculative_tokens": 3, "path": None},
                    {"name": "ngram", "num_speculative_tokens": 3, "min_n": 1, "max_n": 2}):
        pipe = dspark.build_pipeline({"target": {"device": "cpu"}, "drafter": drafter}, target_model=target)
        assert pipe.generate(prompts, max_new_tokens=20, ignore_eos=True, no_repeat_ngram_size=2).token_ids == expected
    assert expected != pipe.generate(prompts, max_new_tokens=20, ignore_eos=True).token_ids  # the bans mattered


def test_logit_bias_greedy_equals_transformers_sequence_bias():
    """A bias against each prompt's likeliest first tokens, as transformers' single-token
    ``sequence_bias``; plain and speculative (the drafters bias their drafts the same way)."""
    target = tiny_hf_model("llama", scale=3.0)
    prompts = ragged_prompts(target.config.vocab_size, lengths=(5, 1, 9))
    plain = dspark.build_pipeline({"target": {"device": "cpu"}, "drafter": {"name": "none"}}, target_model=target)
    free = plain.generate(prompts, max_new_tokens=16, ignore_eos=True).token_ids
    bias = {free[0][0]: -30.0, free[1][0]: -5.5, 7: 4.0}
    expected = []
    for prompt in prompts:
        x = torch.tensor([prompt])
        with torch.no_grad():
            out = target.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=16, do_sample=False,
                                  sequence_bias={(t,): b for t, b in bias.items()}, eos_token_id=None, pad_token_id=0)
        expected.append(out[0, len(prompt):].tolist())
    assert expected != free
    for drafter in ("none", {"name": "eagle3", "num_speculative_tokens": 3, "path": None},
                    {"name": "draft_model", "num_speculative_tokens": 3}):
        pipe = dspark.build_pipeline({"target": {"device": "cpu"}, "drafter": drafter}, target_model=target,
                                     draft_model=target if isinstance(drafter, dict) and drafter["name"] == "draft_model" else None)
        result = pipe.generate(prompts, max_new_tokens=16, ignore_eos=True, logit_bias=bias)
        assert result.token_ids == expected
        if isinstance(drafter, dict) and drafter["name"] == "draft_model":  # the target drafting for itself, biased
            assert result.stats.acceptance_by_position == [1.0] * 3


@pytest.mark.parametrize("name, value", [("logit_bias", {3: 101.0}), ("logit_bias", {3: float("nan")}),
                                         ("logit_bias", {-1: 1.0}), ("logit_bias", {10**6: 1.0}),
                                         ("logit_bias", {"3": 1.0}), ("logit_bias", [(3, 1.0)]),
                                         ("no_repeat_ngram_size", -1), ("no_repeat_ngram_size", 2.0),
                                         ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
                                         ("repetition_penalty", float("inf")), ("repetition_penalty", float("nan")),
                                         ("presence_penalty", 2.5), ("frequency_penalty", -3.0),
                                         ("frequency_penalty", float("nan")), ("presence_penalty", "0.5"),
                                         ("repetition_penalty", True)])
def test_bad_penalties_are_refused_before_any_work(name, value):
    target = tiny_hf_model("llama")
    pipe = dspark.build_pipeline({"target": {"device": "cpu"}, "drafter": {"name": "none"}}, target_model=target)
    pipe.engine.generate = None  # any work would fail on this
    with pytest.raises(ValueError, match=name):
        pipe.generate([[3, 4]], max_new_tokens=4, **{name: value})
