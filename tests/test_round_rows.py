"""Rounds over the occupied slots alone (``engine.trim_idle_slots``): a batch whose slots are mostly
free runs its rounds over its first slots up to the last unfinished request, and every request
decodes exactly as in rounds over all the slots — tokens, log-probabilities, acceptance — for every
drafter, while rows join and leave the rounds."""

import pytest
import torch
from dspark.drafters import Drafter
from dspark.drafters.ngram import NgramDrafter
from dspark.scheduling import FixedScheduler, register_scheduler

from helpers import ragged_prompts, tiny_hf_model
from test_speculative import PER_REQUEST, spec_pipeline


@register_scheduler("every_other_round_plain_test")
class EveryOtherRoundPlain(FixedScheduler):
    """Every other round skips drafting (a plain decoding step; DSpark's context of such rounds is
    appended later), whatever the batch: the schedulers that decide from a cost table per batch
    size decide differently for rounds over fewer rows — as they should — which would change the
    tokens drawn."""

    def reset(self) -> None:
        self.rounds = 0

    def wants_drafts(self, active: list[bool]) -> bool:
        self.rounds += 1
        return self.rounds % 2 == 0


def round_widths(pipe) -> list[int]:
    """Record the batch size of every round's target forward (admissions' prefills are not rounds)."""
    widths, forward = [], pipe.engine._round_forward

    def recorded(inputs, *args, **kwargs):
        widths.append(inputs.shape[0])
        return forward(inputs, *args, **kwargs)

    pipe.engine._round_forward = recorded
    return widths


def test_round_rows_are_the_slots_up_to_the_last_active_one_in_powers_of_two():
    pipe = spec_pipeline(tiny_hf_model("qwen3"), "none", 0, "engine.max_batch_size=64")
    rows = pipe.engine._round_rows
    slot = lambda b: [i == b for i in range(64)]  # noqa: E731
    assert [rows(slot(b)) for b in (0, 1, 2, 3, 4, 5, 8, 31, 32, 63)] == [1, 2, 4, 4, 8, 8, 16, 32, 64, 64]
    assert rows([True] + [False] * 62 + [True]) == 64
    assert rows([False] * 5 + [True] + [False] * 4) == 8 and rows([False] * 5 + [True] + [False]) == 7  # (capped)
    off = spec_pipeline(tiny_hf_model("qwen3"), "none", 0, "engine.max_batch_size=64", "engine.trim_idle_slots=false")
    assert not off.engine.trims_idle_slots and off.engine._round_rows(slot(0)) == 64


def test_rounds_run_over_the_occupied_slots_alone():
    """One request in a batch of eight slots: every round is a forward over one row. Three at once
    take slots 0–2 (rounds over four rows) until the one in slot 2 ends; a request arriving while
    the one in slot 0 decodes takes slot 1 (the lowest free one): rounds over two rows."""
    pipe = spec_pipeline(tiny_hf_model("qwen3"), "none", 0, "engine.max_batch_size=8")
    widths = round_widths(pipe)
    session = pipe.session(max_len=40)
    prompts = ragged_prompts(101, lengths=(5, 3, 7, 4))
    session.submit(prompts[0], max_new_tokens=6, ignore_eos=True)
    while session.unfinished:
        session.step()
    assert widths == [1] * 5  # (the first token comes with the admission)
    widths.clear()
    for prompt, budget in zip(prompts[:3], (12, 3, 6)):
        session.submit(prompt, max_new_tokens=budget, ignore_eos=True)
    session.step()  # (the admission)
    assert [session.batch.holder[b] for b in range(3)] == [1, 2, 3]
    while session.unfinished:
        session.step()
        if len(widths) == 7 and session.batch.requests[-1].prompt != prompts[3]:  # slot 0 decodes alone: one joins
            session.submit(prompts[3], max_new_tokens=3, ignore_eos=True)
    assert widths[:5] == [4] * 5 and widths[5:7] == [1, 1]
    assert widths[7:9] == [2, 2] and set(widths[9:]) == {1}


def staggered(pipe, requests: list[tuple[int, dict]]) -> tuple[list, list]:
    """Submit each ``(step, request)`` at that step of a session (8 slots) and decode to the end;
    return the results and the drafter's per-request counts."""
    session, ids, step = pipe.session(max_len=48, logprobs=True, top_logprobs=2), [], 0
    pending = sorted(requests, key=lambda r: r[0])
    while pending or session.unfinished:
        while pending and pending[0][0] <= step:
            ids.append(session.submit(**pending.pop(0)[1]))
        session.step()
        step += 1
    stats = pipe.engine.finish(session.batch)[1]
    counts = [{k: row[k] for k in ("generated", "target_forwards", "drafted", "verified", "accepted")}
              for row in stats.per_request]
    return [session.result(i) for i in ids], counts, drafter_context(pipe.drafter, session.batch.state)


def drafter_context(drafter, state) -> list[torch.Tensor]:
    """What the drafter's own cache holds for each slot's last request, over its committed positions
    (appending what it left for later first): ``[]`` for a drafter without a cache."""
    cache = getattr(drafter, "whole_cache", None)
    if cache is None:
        return []
    with torch.inference_mode():
        drafter.use_rows(state.batch_size, state)
    return [cache.buffer[:, b, :, :, :n].clone() for b, n in enumerate(cache.lengths.tolist())]


# requests that come and go: four at once (rounds over four rows), newcomers take the lowest free
# slots (one finds the first four busy: rounds over all eight), the long one in slot 0 ends up
# alone (one row), another joins in slot 1 (two rows)
ARRIVALS = [0, 0, 0, 0, 3, 4, 9, 20]
BUDGETS = [30, 4, 12, 2, 5, 7, 6, 4]
# the long-lived requests sample from the target's own distribution (where a drafter's drafts are
# accepted most often, so that a drafter state gone wrong shows in the tokens), the others each
# with settings of their own
SETTINGS = [dict(temperature=1.0), PER_REQUEST[1], dict(temperature=1.0), *(PER_REQUEST * 2)[3:8]]


@pytest.mark.parametrize("drafter", ["none", "ngram", "draft_model", "dspark", "dspark_skipping", "eagle3",
                                     "eagle3_stop"])
def test_rounds_over_the_occupied_slots_decode_as_rounds_over_all(drafter):
    """Eight requests arriving over time into eight slots, each with its own settings (sampled and
    greedy, penalties, logit bias) and log-probabilities with two likeliest tokens: trimmed rounds
    (whose rows grow and shrink) give every request the tokens, log-probabilities and drafting
    counts of rounds over all the slots (float64). ``dspark_skipping`` skips drafting every other
    round (the context it appends later is appended when the rows change: twice here)."""
    target = tiny_hf_model("qwen3", scale=2.0)
    prompts = ragged_prompts(101, lengths=(5, 9, 3, 7, 6, 4, 8, 2), seed=3)
    requests = [(at, dict(prompt=prompt, max_new_tokens=budget, seed=i, logprobs=True, top_logprobs=2,
                          ignore_eos=True, **SETTINGS[i]))
                for i, (at, prompt, budget) in enumerate(zip(ARRIVALS, prompts, BUDGETS))]
    results = {}
    for trim in (True, False):
        skipping = ["scheduler.name=every_other_round_plain_test"] if drafter == "dspark_skipping" else []
        # (prefix caching off: both take the lowest free slots, so that their drafters' caches compare slot by slot)
        pipe = spec_pipeline(target, drafter.removesuffix("_skipping"), 3, "target.dtype=float64",
                             "engine.max_batch_size=8", f"engine.trim_idle_slots={str(trim).lower()}",
                             "engine.prefix_caching=false", *skipping)
        assert pipe.engine.trims_idle_slots == trim
        widths = round_widths(pipe)
        results[trim] = staggered(pipe, requests)
        if trim:
            assert {1, 4} <= set(widths)
        else:
            assert set(widths) == {8}
    (trimmed, trimmed_counts, trimmed_context), (full, full_counts, full_context) = results[True], results[False]
    for a, b in zip(trimmed, full):
        assert a.token_ids == b.token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-9)
        assert [[t for t, _ in top] for top in a.top_logprobs] == [[t for t, _ in top] for top in b.top_logprobs]
    assert trimmed_counts == full_counts  # (drafted, verified, accepted per request)
    # the drafter's own cache (context, pairs, the draft model's keys and values) agrees slot by slot
    assert [c.shape for c in trimmed_context] == [c.shape for c in full_context]
    assert all(torch.allclose(a, b, atol=1e-9) for a, b in zip(trimmed_context, full_context))
    assert (len(full_context) == 8) == (drafter not in ("none", "ngram"))


@pytest.mark.slow
@pytest.mark.parametrize("drafter", ["eagle3"])
def test_compiled_trimmed_rounds_decode_as_eager_ones(drafter):
    """engine.compile with trimmed rounds: each row count is a shape of its own, and a round's
    pairs appended in the next round's compiled draft call are appended over the old rows when the
    rows change (DSpark defers its context the same way; its compiled rounds over every slot are
    in test_speculative, and compiling costs a minute or more per drafter on a cold cache). Five
    requests arriving over time into four slots (rounds over 4, 1, 2 and 1 rows), sampled:
    compiled and eager rounds decode the same tokens, with the same drafting counts."""
    target = tiny_hf_model("qwen3", scale=3.0)
    prompts = ragged_prompts(101, lengths=(5, 9, 3, 7, 6), seed=3)
    requests = [(at, dict(prompt=prompt, max_new_tokens=budget, seed=i, temperature=1.0, ignore_eos=True))
                for i, (at, prompt, budget) in enumerate(zip([0, 0, 0, 2, 6], prompts, [24, 3, 6, 3, 4]))]
    compiled, eager = (spec_pipeline(target, drafter, 3, "engine.max_batch_size=4", *extra)
                       for extra in (["engine.compile=true"], []))
    widths = round_widths(compiled)
    (got, got_counts, _), (expected, expected_counts, _) = staggered(compiled, requests), staggered(eager, requests)
    assert set(widths) == {1, 2, 4} and widths[-1] == 1
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    assert got_counts == expected_counts


class FullRowsNgram(NgramDrafter):
    """A drafter that does not say it can serve rounds over some of the slots."""

    use_rows = Drafter.use_rows


def test_a_drafter_without_use_rows_runs_every_round_over_all_slots():
    target = tiny_hf_model("qwen3")
    pipe = spec_pipeline(target, "ngram", 3, "engine.max_batch_size=4", "drafter._target_=test_round_rows.FullRowsNgram")
    assert type(pipe.engine.drafter) is FullRowsNgram
    assert not pipe.engine.drafter.can_use_rows and not pipe.engine.trims_idle_slots
    prompt = ragged_prompts(101, lengths=(5,))
    alone = spec_pipeline(target, "none", 0).generate(prompt, max_new_tokens=6, ignore_eos=True).token_ids[0]
    widths = round_widths(pipe)
    session = pipe.session(max_len=32)
    session.submit(prompt[0], max_new_tokens=6, ignore_eos=True)
    while session.unfinished:
        session.step()
    assert widths and set(widths) == {4}
    assert session.result(0).token_ids == alone


@pytest.mark.parametrize("drafter", ["none", "eagle3"])
def test_a_prompt_found_in_a_high_slot_is_copied_down_to_the_lowest_free_one(drafter):
    """Six requests fill slots 0–5 and end; a request that starts as slot 5's prompt did takes slot
    0 (the lowest free one) with slot 5's reusable rows copied down to it: the same 11 positions
    skipped, rounds over one row instead of eight, and the tokens of a request alone (float64,
    sampled). Slot 5 still holds its prompt for the next request that shares it."""
    pipe = spec_pipeline(tiny_hf_model("qwen3", scale=2.0), drafter, 3, "target.dtype=float64",
                         "engine.max_batch_size=8")
    prefix = ragged_prompts(101, lengths=(12,), seed=9)[0]
    first = ragged_prompts(101, lengths=(5, 6, 7, 8, 9), seed=10) + [prefix + [1, 2]]
    session = pipe.session(max_len=40)
    for prompt in first:
        session.submit(prompt, max_new_tokens=3)
    while session.unfinished:
        session.step()
    hits = session.batch.prefixes.hits
    widths = round_widths(pipe)
    request = dict(max_new_tokens=6, temperature=1.0, seed=4)
    reuser = session.submit(prefix + [7, 7], **request)
    session.step()
    assert session.batch.holder.index(reuser) == 0
    while session.unfinished:
        session.step()
    assert session.batch.prefixes.hits - hits == 11 and set(widths) == {1}
    assert session.batch.prefixes.resident[5].tokens[:12] == prefix
    again = session.submit(prefix + [3], **request)  # (slot 0 holds the prefix now too: no copy needed)
    session.step()
    assert session.batch.holder.index(again) == 0
    assert session.result(reuser).token_ids == pipe.generate([prefix + [7, 7]], **request).token_ids[0]
