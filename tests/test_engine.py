"""Continuous batching: more requests than slots, each later one taking the slot of a request that
ended between two rounds, every request decoded exactly as it is alone — drafters, settings, stops,
log-probabilities and streaming included; static batching where a drafter or cache cannot admit."""

import pytest
import torch

import dspark
from dspark.drafters import register_drafter
from dspark.drafters.ngram import NgramDrafter

from helpers import chi_square_p_value, ragged_prompts, tiny_hf_model
from test_speculative import DRAFTERS, PER_REQUEST, exact_joint, settings_per_request, spec_pipeline, tiny_pair, PROMPT, VOCAB

# seven requests through three slots: budgets that end them at different rounds (one at its first
# token), the per-request sampling settings of test_speculative cycled, and stop settings
BUDGETS = [3, 11, 1, 7, 9, 2, 12]
LENGTHS = (4, 9, 2, 6, 5, 3, 8)
SEEDS = [5, 6, 7, 8, 9, 10, 11]
SETTINGS = [PER_REQUEST[i % len(PER_REQUEST)] for i in range(len(BUDGETS))]


def counting_admissions(pipe) -> list[list[int]]:
    """Record the slots of every :meth:`Drafter.admit` call of ``pipe``'s drafter."""
    calls, admit = [], pipe.drafter.admit
    pipe.drafter.admit = lambda rows, *args: (calls.append(rows.tolist()), admit(rows, *args))[1]
    return calls


@pytest.mark.parametrize("drafter", ["none", "ngram", "draft_model", "draft_model_stop", "dspark", "dflash", "eagle3",
                                     "eagle3_stop", "dspark_threshold"])
def test_continuous_batching_decodes_each_request_as_alone(drafter):
    """Seven requests with their own budgets, sampling settings (greedy among sampled), stop tokens
    and ``min_new_tokens`` through three slots: each is decoded as it is alone (float64, token for
    token), and the later requests were admitted into freed slots."""
    target = tiny_hf_model("qwen3", scale=2.0)
    pipe = spec_pipeline(target, drafter, 3, "target.dtype=float64", "engine.max_batch_size=3")
    assert pipe.engine.continuous
    prompts = ragged_prompts(101, lengths=LENGTHS)
    kwargs = dict(max_new_tokens=BUDGETS, seed=SEEDS, **settings_per_request(SETTINGS))
    free = pipe.generate(prompts, ignore_eos=True, **kwargs).token_ids
    # stop tokens each request meets (the 4th of request 1 with min_new_tokens 2; request 6's 6th
    # after its 3rd: held back until then), EOS the 2nd token of request 4
    pipe.engine.eos_token_ids = (free[4][1],)
    stop_settings = [dict(stop_token_ids=None, min_new_tokens=0, ignore_eos=True) for _ in prompts]
    stop_settings[1].update(stop_token_ids=[free[1][3]], min_new_tokens=2)
    stop_settings[4].update(ignore_eos=False)
    stop_settings[6].update(stop_token_ids=[free[6][5], free[6][2]], min_new_tokens=3)
    admissions = counting_admissions(pipe)
    batched = pipe.generate(prompts, **kwargs, **{name: [s[name] for s in stop_settings] for name in stop_settings[0]})
    assert sum(len(rows) for rows in admissions) == len(prompts) - 3  # the first three started the batch
    assert sum(len(a) < len(b) for a, b in zip(batched.token_ids, free)) >= 2  # the stops matter
    for i, prompt in enumerate(prompts):
        alone = pipe.generate([prompt], max_new_tokens=BUDGETS[i], seed=[SEEDS[i]], **SETTINGS[i], **stop_settings[i])
        assert alone.token_ids[0] == batched.token_ids[i], f"request {i}"
    assert [r["generated"] for r in batched.stats.per_request] == [len(ids) for ids in batched.token_ids]
    assert sum(r["target_forwards"] for r in batched.stats.per_request) == batched.stats.target_forwards


@pytest.mark.parametrize("drafter", sorted(set(DRAFTERS[1:])))
def test_greedy_continuous_batching_equals_autoregressive(drafter):
    """Every drafter and scheduler (load-aware ones, which skip drafting and catch up later,
    included): six requests through two slots decode plain greedy decoding's tokens."""
    target = tiny_hf_model("qwen3", scale=3.0)
    prompts, budgets = ragged_prompts(target.config.vocab_size, lengths=(5, 1, 9, 3, 14, 6)), [20, 3, 9, 1, 12, 6]
    expected = spec_pipeline(target, "none", 0).generate(prompts, max_new_tokens=budgets, ignore_eos=True).token_ids
    pipe = spec_pipeline(target, drafter, 3, "engine.max_batch_size=2")
    assert pipe.engine.continuous
    assert pipe.generate(prompts, max_new_tokens=budgets, ignore_eos=True).token_ids == expected


def test_static_batching_decodes_each_request_as_alone():
    """``engine.batching=static``: batches of three one after the other, the same outputs."""
    target = tiny_hf_model("qwen3", scale=2.0)
    prompts = ragged_prompts(101, lengths=LENGTHS)
    kwargs = dict(max_new_tokens=BUDGETS, seed=SEEDS, ignore_eos=True, **settings_per_request(SETTINGS))
    static = spec_pipeline(target, "eagle3", 3, "target.dtype=float64", "engine.max_batch_size=3",
                           "engine.batching=static")
    assert not static.engine.continuous
    admissions = counting_admissions(static)
    result = static.generate(prompts, **kwargs)
    assert admissions == []
    for i, prompt in enumerate(prompts):
        alone = static.generate([prompt], max_new_tokens=BUDGETS[i], seed=[SEEDS[i]], ignore_eos=True, **SETTINGS[i])
        assert alone.token_ids[0] == result.token_ids[i]


def test_freed_slots_are_refilled_at_once():
    """One long request beside short ones: with continuous batching the call takes as many rounds
    as the long request needs (the short ones pass through the other slot meanwhile); static
    batches add the rounds of the later batches."""
    target = tiny_hf_model("qwen3", scale=2.0)
    prompts, budgets = ragged_prompts(101, lengths=(4, 9, 2, 6, 5)), [12, 3, 3, 3, 3]
    rounds = {}
    for batching in ("continuous", "static"):
        pipe = spec_pipeline(target, "none", 0, "engine.max_batch_size=2", f"engine.batching={batching}")
        rounds[batching] = pipe.generate(prompts, max_new_tokens=budgets, ignore_eos=True).stats.rounds
    assert rounds == {"continuous": 11, "static": 11 + 2 + 2}  # the first token of each comes from its prefill


def test_each_request_has_its_time_to_first_token_and_to_its_end():
    """``stats.per_request`` carries when each request's first token reached the host and when it
    ended (seconds since the call began): later requests waited for a slot."""
    target = tiny_hf_model("qwen3", scale=2.0)
    pipe = spec_pipeline(target, "ngram", 3, "engine.max_batch_size=2")
    result = pipe.generate(ragged_prompts(101, lengths=(4, 9, 2, 6, 5)), max_new_tokens=[12, 3, 3, 3, 3],
                           ignore_eos=True)
    rows = result.stats.per_request
    assert all(0 < row["first_token_s"] <= row["finished_s"] <= result.stats.wall_time_s for row in rows)
    assert rows[0]["first_token_s"] == rows[1]["first_token_s"]  # admitted together
    assert rows[1]["finished_s"] <= rows[2]["first_token_s"] <= rows[2]["finished_s"] <= rows[3]["first_token_s"]
    assert rows[4]["finished_s"] <= rows[0]["finished_s"]  # the short ones passed while the long one ran


@pytest.mark.parametrize("drafter", ["ngram", "eagle3"])
def test_streaming_logprobs_and_stop_strings_follow_each_request(drafter):
    """Through refilled slots, ``on_tokens`` and the stop check see request indices, and the
    log-probabilities (generated, top and prompt) are each request's as alone."""
    target = tiny_hf_model("qwen3", scale=2.0)
    pipe = spec_pipeline(target, drafter, 3, "target.dtype=float64", "engine.max_batch_size=2")
    prompts = ragged_prompts(101, lengths=LENGTHS[:5])
    kwargs = dict(temperature=1.0, ignore_eos=True, logprobs=True, top_logprobs=2, prompt_logprobs=True)
    streamed = {i: [] for i in range(len(prompts))}
    result = pipe.generate(prompts, max_new_tokens=BUDGETS[:5], seed=SEEDS[:5],
                           on_tokens=lambda i, ids: streamed[i].extend(ids), **kwargs)
    assert [streamed[i] for i in range(len(prompts))] == result.token_ids
    for i, prompt in enumerate(prompts):
        alone = pipe.generate([prompt], max_new_tokens=BUDGETS[i], seed=[SEEDS[i]], **kwargs)
        assert alone.token_ids[0] == result.token_ids[i]
        assert alone.logprobs[0] == pytest.approx(result.logprobs[i], abs=1e-9)
        assert [[t for t, _ in top] for top in alone.top_logprobs[0]] == [[t for t, _ in top] for top in result.top_logprobs[i]]
        assert alone.prompt_logprobs[0][1:] == pytest.approx(result.prompt_logprobs[i][1:], abs=1e-9)


def test_stop_checks_per_request_through_refilled_slots():
    """A stop check (as stop strings use) ending requests between rounds frees their slots for the
    next ones: each output is its free output cut where its check said."""
    target = tiny_hf_model("qwen3", scale=2.0)
    pipe = spec_pipeline(target, "ngram", 3, "engine.max_batch_size=2")
    prompts = ragged_prompts(101, lengths=LENGTHS[:5])
    free = pipe.generate(prompts, max_new_tokens=12, ignore_eos=True).token_ids
    cut = [2, 12, 5, 1, 8]
    seen = {i: 0 for i in range(len(prompts))}

    def stop_check(i, ids):  # end request i after its cut[i]-th token
        before, seen[i] = seen[i], seen[i] + len(ids)
        return cut[i] - before if before < cut[i] <= seen[i] and cut[i] < 12 else None

    ids, _, _ = pipe.engine.generate(prompts, max_new_tokens=12, params=dspark.SamplingParams(), seeds=[0] * 5,
                                     ignore_eos=True, stop_check=stop_check)
    assert ids == [out[:k] for out, k in zip(free, cut)]


@pytest.mark.slow
def test_a_batch_larger_than_the_cache_is_refused_when_opened():
    target = tiny_hf_model("qwen3", scale=2.0)
    pipe = spec_pipeline(target, "ngram", 3, "cache.max_len=64")
    with pytest.raises(ValueError, match=r"a batch of max_len 65 does not fit the KV cache \(cache.max_len=64\)"):
        pipe.engine.open_batch(2, 65)
    with pytest.raises(ValueError, match=r"a batch of max_len 65 does not fit the KV cache"):
        dspark.Session(pipe, max_len=65)
    for slots, max_len, wrong in ((0, 8, "slots >= 1"), (2, 0, "max_len >= 1"), (2.0, 8, "slots >= 1")):
        with pytest.raises(ValueError, match=wrong):
            pipe.engine.open_batch(slots, max_len)
    assert pipe.engine.open_batch(2, 64).max_len == 64


@pytest.mark.parametrize("drafter", ["none", "draft_model", "dspark", "eagle3"])
def test_chi_square_with_continuous_batching(drafter):
    """10,000 requests through 1,000 slots, budgets of 3 to 6 tokens so that slots free up at
    different rounds and take new requests all the time (each prefilling only the last token of the
    prompt its slot held: prefix caching): the joint of each request's first three tokens is the
    target's (significance 0.001, fixed seeds)."""
    target, draft = tiny_pair()
    pipe = spec_pipeline(target, drafter, 3, "engine.max_batch_size=1000", draft=draft)
    samples = 10000
    admissions = counting_admissions(pipe)
    budgets = [3 + i % 4 for i in range(samples)]
    ids = pipe.generate([PROMPT] * samples, max_new_tokens=budgets, temperature=1.0, seed=2024,
                        ignore_eos=True).token_ids
    assert len(admissions) > 10  # slots were refilled many times, a few at a time
    assert pipe.engine._live.prefixes.hits >= (samples - 1000) * (len(PROMPT) - 1)  # each refill reused its slot's prompt
    first = torch.tensor([row[:3] for row in ids])
    counts = torch.bincount(first[:, 0] * VOCAB * VOCAB + first[:, 1] * VOCAB + first[:, 2],
                            minlength=VOCAB ** 3).view(VOCAB, VOCAB, VOCAB)
    assert chi_square_p_value(counts, exact_joint(target, dspark.SamplingParams(1.0))) > 1e-3


@register_drafter("ngram_without_admit_test")
class _StaticNgram(NgramDrafter):
    """A user's drafter that keeps per-request state and does not say how to admit requests."""

    admit = dspark.drafters.Drafter.admit


def test_batching_falls_back_to_static_batches_or_refuses():
    target = tiny_hf_model("qwen3", scale=2.0)
    section = {"name": "ngram_without_admit_test", "num_speculative_tokens": 3}
    pipe = dspark.build_pipeline({"target": {"device": "cpu"}, "drafter": section}, target_model=target,
                                 overrides=["engine.max_batch_size=2"])
    assert not pipe.engine.continuous  # auto: static batches
    prompts = ragged_prompts(101, lengths=(4, 9, 2))
    expected = spec_pipeline(target, "none", 0).generate(prompts, max_new_tokens=6, ignore_eos=True).token_ids
    assert pipe.generate(prompts, max_new_tokens=6, ignore_eos=True).token_ids == expected
    with pytest.raises(ValueError, match="_StaticNgram drafter does not implement admit"):
        dspark.build_pipeline({"target": {"device": "cpu"}, "drafter": section}, target_model=target,
                              overrides=["engine.batching=continuous"])
    with pytest.raises(ValueError, match="HFSlotCache cache has no row views"):
        spec_pipeline(target, "ngram", 3, "target.backend=hf", "cache.name=hf_dynamic",
                      "engine.batching=continuous")
    with pytest.raises(ValueError, match="engine.batching must be one of auto, continuous, static"):
        spec_pipeline(target, "ngram", 3, "engine.batching=sometimes")


def test_per_request_lists_of_the_wrong_length_are_refused_before_work():
    target = tiny_hf_model("qwen3", scale=2.0)
    engine = spec_pipeline(target, "ngram", 3, "engine.max_batch_size=2").engine
    prompts, params = ragged_prompts(101, lengths=(4, 9, 2)), dspark.SamplingParams()
    with pytest.raises(ValueError, match="budgets has 2 entries for 3 prompts"):
        engine.generate(prompts, max_new_tokens=[4, 5], params=params, seeds=[0, 1, 2])
    with pytest.raises(ValueError, match="seeds has 2 entries for 3 prompts"):
        engine.generate(prompts, max_new_tokens=4, params=params, seeds=[0, 1])
    with pytest.raises(ValueError, match="stop_token_ids has 1 lists for 3 prompts"):
        engine.generate(prompts, max_new_tokens=4, params=params, seeds=[0, 1, 2], stop_token_ids=[[3]])


@pytest.mark.parametrize("drafter", ["none", "draft_model", "dspark", "eagle3"])
def test_requests_of_one_prompt_share_its_prefill(drafter, monkeypatch):
    """Five requests of two prompts (some admitted together, some into a refilled slot later): one
    prefill row per distinct prompt of an admission, and each request decodes as alone (float64,
    sampled, its own seed) — the copied cache rows, logits and hidden states are its own."""
    target = tiny_hf_model("qwen3", scale=2.0)
    pipe = spec_pipeline(target, drafter, 3, "target.dtype=float64", "engine.max_batch_size=3")
    first, second = ragged_prompts(101, lengths=(7, 4), seed=3)
    prompts, budgets = [first, second, first, first, second], [5, 9, 3, 6, 4]
    rows: list[int] = []
    prefill = pipe.engine._prefill
    monkeypatch.setattr(pipe.engine, "_prefill", lambda state, *a: rows.append(state.batch_size) or prefill(state, *a))
    shared = pipe.generate(prompts, max_new_tokens=budgets, temperature=1.0, seed=[7, 8, 9, 10, 11], ignore_eos=True,
                           logprobs=True)
    assert rows[0] == 2  # the first admission: three requests, two prompts
    monkeypatch.undo()
    for i, (prompt, budget) in enumerate(zip(prompts, budgets)):
        alone = pipe.generate([prompt], max_new_tokens=budget, temperature=1.0, seed=7 + i, ignore_eos=True,
                              logprobs=True)
        assert shared.token_ids[i] == alone.token_ids[0], f"request {i}"
        assert shared.logprobs[i] == pytest.approx(alone.logprobs[0], abs=1e-12)
