"""Prefix reuse per slot: a request whose prompt starts as a free slot's last prompt prefills only
the rest, and decodes exactly as alone — tokens, and the prompt's scores — for every drafter."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dspark.cache import StaticKVCache
from dspark.prefix_cache import HiddenHistory, SlotPrefixes, common_prefix, with_prefixes

from helpers import ragged_prompts, tiny_hf_model
from test_speculative import PER_REQUEST, spec_pipeline

PREFIX = ragged_prompts(101, lengths=(12,))[0]


@given(st.lists(st.integers(0, 3), max_size=12), st.lists(st.integers(0, 3), max_size=12))
def test_common_prefix_counts_the_shared_first_tokens(a, b):
    shared = 0
    while shared < min(len(a), len(b)) and a[shared] == b[shared]:
        shared += 1
    assert common_prefix(a, b) == shared == common_prefix(b, a)


def test_slots_are_chosen_by_shared_prefix_and_reuse_all_but_the_last_shared_token():
    prefixes = SlotPrefixes(3)
    hidden = [torch.zeros(4, 2)]
    prefixes.keep(0, [1, 2, 3, 4], hidden, None, -1)
    prefixes.keep(2, [1, 2, 9], hidden, [torch.zeros(2), torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long)], 2)
    assert prefixes.assign([[1, 2, 9, 9], [1, 2, 3, 7], [5]], [0, 1, 2]) == [2, 0, 1]
    assert prefixes.assign([[5], [1, 2, 3]], [1, 2]) == [1, 2]  # (none shares: an empty slot)
    assert prefixes.assign([[5]], [0, 2]) == [0]  # (none shares: the least recently filled)
    prefixes.keep(0, [1, 2, 3, 4], hidden, None, -1)
    assert prefixes.assign([[5]], [0, 2]) == [2]
    assert prefixes.reusable(0, [1, 2, 3, 7], -1) == 2  # three shared: the third is fed again
    assert prefixes.reusable(0, [1, 2, 3, 4], -1) == 3  # the same prompt: its last token is fed again
    assert prefixes.reusable(0, [1, 2, 3, 7], 0) == 0  # scores asked for, none kept
    assert prefixes.reusable(2, [1, 2, 9, 9], 2) == 2 and prefixes.reusable(2, [1, 2, 9, 9], 3) == 0
    assert prefixes.reusable(1, [1, 2], -1) == 0  # an empty slot


def test_with_prefixes_puts_suffix_outputs_back_at_their_positions():
    relative = torch.arange(1.0, 13.0).view(2, 3, 2)  # two rows' suffix outputs, width 3
    prefixes = [torch.full((5, 2), -1.0), None]
    out = with_prefixes(relative, prefixes, starts=[2, 0], counts=[3, 2], total=5)
    assert out[0].tolist() == [[-1, -1], [-1, -1], [1, 2], [3, 4], [5, 6]]
    assert out[1].tolist() == [[7, 8], [9, 10], [0, 0], [0, 0], [0, 0]]
    narrower = with_prefixes(relative, [torch.full((5, 1), -1.0), None], starts=[1, 0], counts=[1, 1], total=2)
    assert narrower[0].tolist() == [[-1, 0], [1, 2]]  # a slot that kept fewer likeliest tokens fills what it has



def test_hidden_history_writes_each_round_s_columns_where_its_rows_stood():
    history = HiddenHistory(slots=3, width=8)
    assert history.rows(0) is None  # (no round yet)
    first = torch.arange(2 * 3 * 2, dtype=torch.float64).view(2, 3, 2)  # a round over the first two slots, width 3
    history.write(torch.tensor([1, 4]), [first, -first])
    history.write(torch.tensor([2]), [torch.full((1, 2, 2), 7.0, dtype=torch.float64), torch.zeros(1, 2, 2, dtype=torch.float64)])  # one slot, width 2
    (row0, neg0), (row1, _), (row2, _) = history.rows(0), history.rows(1), history.rows(2)
    assert row0[:, 0].tolist() == [0, 0, 7, 7, 0, 0, 0, 0]  # position 1 from the first round, 2–3 overwritten
    assert neg0[1].tolist() == [-0.0, -1.0] and neg0[2].tolist() == [0, 0]
    assert row1[4:7].tolist() == first[1].tolist() and row1[:4].abs().sum() == 0
    assert row2.abs().sum() == 0

def decode_one_pair_at_a_time(session, pairs: list[list[dict]]) -> list:
    """Submit each pair of requests once the previous pair has finished; return the results."""
    ids = []
    for pair in pairs:
        ids += [session.submit(**request) for request in pair]
        while session.unfinished:
            session.step()
    return [session.result(i) for i in ids]


@pytest.mark.parametrize("drafter", ["none", "ngram", "draft_model", "dspark", "eagle3"])
def test_reused_prefixes_decode_as_alone(drafter):
    """Three pairs of requests through two slots, each pair once the last has finished; prompts
    share first tokens with the slots' last ones (the same prefix with other endings, a longer
    prompt), sampled with their own settings: each request decodes as it does alone (float64,
    token for token), and the prefills skipped what the slots held: 11 + 14 of pair two's prompt
    tokens, 11 of pair three's."""
    target = tiny_hf_model("qwen3", scale=2.0)
    pipe = spec_pipeline(target, drafter, 3, "target.dtype=float64", "engine.max_batch_size=2")
    prompts = [[PREFIX + [5, 6], [9, 9, 9] + PREFIX], [PREFIX + [7], [9, 9, 9] + PREFIX + [1]],
               [PREFIX + [5, 6, 8], PREFIX[:6]]]
    pairs = [[dict(prompt=p, max_new_tokens=6, seed=3 * i + j, **PER_REQUEST[(i + j) % len(PER_REQUEST)])
              for j, p in enumerate(pair)] for i, pair in enumerate(prompts)]
    session = pipe.session(max_len=40)
    results = decode_one_pair_at_a_time(session, pairs)
    assert session.batch.prefixes.hits == 11 + 14 + 11
    assert session.batch.prefixes.queries == sum(len(p) for pair in prompts for p in pair)
    for result, request in zip(results, [r for pair in pairs for r in pair]):
        alone = pipe.generate([request["prompt"]], **{k: v for k, v in request.items() if k != "prompt"})
        assert result.token_ids == alone.token_ids[0], request["prompt"]


@pytest.mark.parametrize("drafter", ["none", "draft_model", "dspark", "eagle3"])
def test_requests_admitted_together_share_their_common_prefix(drafter):
    """Four requests of one length admitted at once into empty slots, three of one 12-token prefix
    with other endings: the first in sorted order is prefilled whole, the others copy its rows up
    to where they part and prefill the rest — 12 and 11 positions skipped — and each decodes as
    alone (float64, sampled), with its prompt's scores where it asks."""
    target = tiny_hf_model("qwen3", scale=2.0)
    pipe = spec_pipeline(target, drafter, 3, "target.dtype=float64", "engine.max_batch_size=4")
    requests = [dict(prompt=PREFIX + [1, 5]), dict(prompt=PREFIX + [2, 3], prompt_logprobs=True, prompt_top_logprobs=2),
                dict(prompt=[7] + PREFIX + [0]), dict(prompt=PREFIX + [1, 4], prompt_logprobs=True)]
    requests = [dict(r, max_new_tokens=5, temperature=1.0, seed=i) for i, r in enumerate(requests)]
    session = pipe.session(max_len=40)
    results = decode_one_pair_at_a_time(session, [requests])
    assert session.batch.prefixes.hits == 12 + 11
    for result, request in zip(results, requests):
        alone = pipe.generate([request["prompt"]], **{k: v for k, v in request.items() if k != "prompt"})
        assert result.token_ids == alone.token_ids[0]
        if request.get("prompt_logprobs"):
            assert result.prompt_logprobs[1:] == pytest.approx(alone.prompt_logprobs[0][1:], abs=1e-6)
        if request.get("prompt_top_logprobs"):
            assert [[t for t, _ in top] for top in result.prompt_top_logprobs[1:]] == [
                [t for t, _ in top] for top in alone.prompt_top_logprobs[0][1:]]


def test_reused_prefixes_keep_the_prompt_scores():
    """The prompt's scores of a request that reuses a slot's prefix equal its own alone. A slot that
    kept fewer likeliest tokens than a request asks for is not reused for it; nor one whose reused
    part was never scored (a request that asked nothing, admitted beside one that asked); a
    request that asks nothing reuses either."""
    target = tiny_hf_model("qwen3", scale=2.0)
    pipe = spec_pipeline(target, "eagle3", 3, "target.dtype=float64", "engine.max_batch_size=2")
    top = lambda k: dict(prompt_logprobs=True, prompt_top_logprobs=k)  # noqa: E731
    pairs = [[dict(prompt=PREFIX + [5], **top(2)), dict(prompt=[9] * 8)],
             [dict(prompt=PREFIX + [6], **top(2))],  # 11 reused: 2 likeliest kept
             [dict(prompt=PREFIX + [7], **top(3))],  # 3 asked, 2 kept: none reused
             [dict(prompt=PREFIX + [8]), dict(prompt=[9] * 8 + [1])],  # 11 and 7 reused, nothing scored
             [dict(prompt=PREFIX + [3]), dict(prompt=[9] * 8 + [2], **top(1))],  # 11 reused (unscored), none
             [dict(prompt=PREFIX + [4], **top(1))]]  # its slot's scores: none for the reused part
    pairs = [[dict(request, max_new_tokens=2) for request in pair] for pair in pairs]
    session = pipe.session(max_len=40)
    results = decode_one_pair_at_a_time(session, pairs)
    assert session.batch.prefixes.hits == 11 + 11 + 7 + 11
    for result, request in zip(results, [r for pair in pairs for r in pair]):
        alone = pipe.generate([request["prompt"]], **{k: v for k, v in request.items() if k != "prompt"})
        assert result.token_ids == alone.token_ids[0]
        if request.get("prompt_logprobs"):
            assert result.prompt_logprobs[0] is None
            assert result.prompt_logprobs[1:] == pytest.approx(alone.prompt_logprobs[0][1:], abs=1e-6)
            k = request["prompt_top_logprobs"]
            assert [[t for t, _ in top] for top in result.prompt_top_logprobs[1:]] == [
                [t for t, _ in top[:k]] for top in alone.prompt_top_logprobs[0][1:]]
        else:
            assert result.prompt_logprobs is None


@pytest.mark.parametrize("drafter", ["none", "ngram", "draft_model", "dspark", "eagle3"])
def test_a_conversation_s_next_turn_reuses_the_last_output(drafter):
    """A next turn — the last prompt, its output, a new message — decodes as alone and reuses the
    last output too: all but its last token, which the cache rows never held, and the last shared
    one, fed again; with DSpark and EAGLE-3 the hidden states over the output were kept by the
    rounds (:class:`~dspark.prefix_cache.HiddenHistory`)."""
    target = tiny_hf_model("qwen3", scale=2.0)
    pipe = spec_pipeline(target, drafter, 3, "target.dtype=float64", "engine.max_batch_size=2")
    session = pipe.session(max_len=48)
    first = decode_one_pair_at_a_time(session, [[dict(prompt=PREFIX, max_new_tokens=5, ignore_eos=True, seed=1,
                                                      temperature=1.0)]])[0]
    follow_up = dict(prompt=PREFIX + first.token_ids + [3, 4], max_new_tokens=6, seed=2, temperature=1.0)
    second = decode_one_pair_at_a_time(session, [[follow_up]])[0]
    alone = pipe.generate([follow_up["prompt"]], **{k: v for k, v in follow_up.items() if k != "prompt"})
    assert second.token_ids == alone.token_ids[0]
    assert session.batch.prefixes.hits == len(PREFIX) + 5 - 2


@pytest.mark.parametrize("drafter", ["none", "eagle3"])
def test_reusing_outputs_can_be_switched_off(drafter):
    """``engine.reuse_outputs=false``: a slot holds its last prompt alone (and the rounds keep no
    hidden states)."""
    target = tiny_hf_model("qwen3", scale=2.0)
    pipe = spec_pipeline(target, drafter, 3, "target.dtype=float64", "engine.max_batch_size=2",
                         "engine.reuse_outputs=false")
    session = pipe.session(max_len=48)
    first = decode_one_pair_at_a_time(session, [[dict(prompt=PREFIX, max_new_tokens=5, ignore_eos=True)]])[0]
    follow_up = dict(prompt=PREFIX + first.token_ids + [3, 4], max_new_tokens=4)
    second = decode_one_pair_at_a_time(session, [[follow_up]])[0]
    assert second.token_ids == pipe.generate([follow_up["prompt"]], max_new_tokens=4).token_ids[0]
    assert session.batch.prefixes.hits == len(PREFIX) - 1 and session.batch.history is None


@pytest.mark.parametrize("drafter", ["dspark", "eagle3"])
def test_a_slot_keeps_the_target_s_hidden_states_over_its_output(drafter):
    """After requests decoded over several rounds with rejections (sampled, float64, two of them
    side by side, the second ending before the first), each slot's kept hidden states over its
    prompt and output equal the target's own over those tokens, position for position: the rounds
    wrote each fed position where its row's cache stood."""
    target = tiny_hf_model("qwen3", scale=2.0)
    pipe = spec_pipeline(target, drafter, 3, "target.dtype=float64", "engine.max_batch_size=4")
    session = pipe.session(max_len=64)
    decode_one_pair_at_a_time(session, [[dict(prompt=PREFIX, max_new_tokens=17, ignore_eos=True, seed=5, temperature=1.0),
                                         dict(prompt=[9, 9, 9] + PREFIX[:5], max_new_tokens=9, ignore_eos=True, seed=6,
                                              temperature=0.7)]])
    model, layers = pipe.engine.target, pipe.drafter.hidden_layers
    kept = [r for r in session.batch.prefixes.resident if r is not None]
    assert len(kept) == 2 and sorted(len(r.tokens) for r in kept) == [8 + 9 - 1, 12 + 17 - 1]
    for resident in kept:
        cache = StaticKVCache.for_model(model, 1, 64)
        out = model(torch.tensor([resident.tokens]), cache, hidden_layers=layers, kv_len=len(resident.tokens))
        assert [h.shape[0] for h in resident.hidden] == [len(resident.tokens)] * len(layers)
        for mine, theirs in zip(resident.hidden, out.hidden_states):
            torch.testing.assert_close(mine, theirs[0], rtol=0, atol=1e-9)


def test_prefix_caching_can_be_switched_off():
    target = tiny_hf_model("qwen3")
    pipe = spec_pipeline(target, "none", 3, "engine.max_batch_size=1", "engine.prefix_caching=false")
    session = pipe.session(max_len=40)
    decode_one_pair_at_a_time(session, [[dict(prompt=PREFIX + [1], max_new_tokens=2)],
                                        [dict(prompt=PREFIX + [2], max_new_tokens=2)]])
    assert session.batch.prefixes.hits == 0 and session.batch.prefixes.queries == 26


def test_with_lowest_first_requests_take_the_lowest_free_slot_that_serves_as_well():
    """``assign(lowest=True)`` (rounds over the occupied slots): a prompt sharing something to
    reuse (two tokens or more) takes that slot; otherwise, and among equals, the lowest free slot —
    not the least recently filled one."""
    prefixes = SlotPrefixes(4)
    hidden = [torch.zeros(4, 2)]
    prefixes.keep(3, [1, 2, 3, 4], hidden, None, -1)
    prefixes.keep(0, [7, 8], hidden, None, -1)
    prefixes.keep(2, [1, 5], hidden, None, -1)
    assert prefixes.assign([[5]], [0, 1, 2, 3], lowest=True) == [0]
    assert prefixes.assign([[5]], [0, 1, 2, 3]) == [1]  # (the LRU rule: an empty slot)
    assert prefixes.assign([[1, 9]], [0, 1, 2, 3], lowest=True) == [0]  # (one token shared: nothing to reuse)
    assert prefixes.assign([[1, 2, 3, 9], [4]], [1, 2, 3], lowest=True) == [3, 1]
    prefixes.keep(1, [1, 2, 3, 4], hidden, None, -1)
    assert prefixes.assign([[1, 2, 3, 4, 5]], [1, 2, 3], lowest=True) == [1]  # (equal shares: the lowest)
    assert prefixes.assign([[1, 2, 3, 4, 5]], [1, 2, 3]) == [3]  # (the LRU rule: the older one)
