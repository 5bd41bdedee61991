"""Chunked prefill (engine.prefill_chunk): a long prompt goes into its slot a chunk per step, the
requests decoding meanwhile run a round between two chunks, and every request decodes exactly as
with a whole prefill — tokens and prompt scores — for every drafter."""

import pytest

import dspark
from dspark.bench.runner import load_prompts

from helpers import tiny_hf_model
from test_prefix_cache import PREFIX
from test_speculative import PER_REQUEST, spec_pipeline

CHUNK = 4
COUNTS = ("target_forwards", "drafted", "verified", "accepted")


def run(session, schedule: list[tuple[str, dict]]) -> dict:
    """Submit the requests of ``schedule`` in order, each once its event has happened (``"now"``,
    or ``"after:<name>"``: that request has finished); step until all have finished. Returns the
    request ids by name."""
    ids, pending, ended = {}, list(schedule), set()
    while pending or session.unfinished:
        for name, request in list(pending):
            event = request["when"]
            if event == "now" or event.removeprefix("after:") in ended:
                ids[name] = session.submit(**{k: v for k, v in request.items() if k != "when"})
                pending.remove((name, request))
        updates = session.step()
        names = {i: n for n, i in ids.items()}
        ended |= {names[u.request] for u in updates if u.finished}
    return ids


SCHEDULE = [  # (name, request): long prompts in chunks while others decode, sampled with their own settings
    # (``reuses`` is submitted before ``scored`` when both can go: it takes ``long``'s slot)
    ("long", dict(when="now", prompt=PREFIX + list(range(1, 9)), max_new_tokens=8, seed=1, **PER_REQUEST[0])),
    ("short", dict(when="now", prompt=[7, 3, 9], max_new_tokens=12, seed=2, **PER_REQUEST[1])),
    ("reuses", dict(when="after:long", prompt=PREFIX + list(range(20, 30)), max_new_tokens=6, seed=4,
                    **PER_REQUEST[3])),
    ("scored", dict(when="after:short", prompt=[5] * 3 + PREFIX + [2, 2], max_new_tokens=5, seed=3,
                    prompt_logprobs=True, prompt_top_logprobs=2, **PER_REQUEST[2])),
]


@pytest.mark.parametrize("drafter", ["none", "ngram", "draft_model", "dspark", "eagle3"])
def test_chunked_prefill_decodes_as_a_whole_prefill(drafter):
    """Four requests through two slots with prompts of 3 to 22 tokens in chunks of 4 positions: each
    decodes as alone with a whole prefill (float64, token for token; the prompt's scores too), and
    the prefix-cache figures count what the slots held before a prompt's first chunk alone
    (``reuses`` finds 12 of its tokens in ``long``'s slot: 11 skipped) — not what earlier chunks
    left."""
    target = tiny_hf_model("qwen3", scale=2.0)
    whole = spec_pipeline(target, drafter, 3, "target.dtype=float64")
    chunked = spec_pipeline(target, drafter, 3, "target.dtype=float64", "engine.max_batch_size=2",
                            f"engine.prefill_chunk={CHUNK}")
    session = chunked.session(max_len=48)
    ids = run(session, SCHEDULE)
    assert session.batch.prefixes.hits == 11
    assert session.batch.prefixes.queries == sum(len(r["prompt"]) for _, r in SCHEDULE)
    for name, request in SCHEDULE:
        result = session.result(ids[name])
        settings = {k: v for k, v in request.items() if k not in ("when", "prompt")}
        alone = whole.generate([request["prompt"]], **settings)
        assert result.token_ids == alone.token_ids[0], name
        assert [result.stats[k] for k in COUNTS] == [alone.stats.per_request[0][k] for k in COUNTS], name
        if request.get("prompt_logprobs"):
            assert result.prompt_logprobs[0] is None
            assert result.prompt_logprobs[1:] == pytest.approx(alone.prompt_logprobs[0][1:], abs=1e-9)
            assert [[t for t, _ in top] for top in result.prompt_top_logprobs[1:]] == [
                [t for t, _ in top] for top in alone.prompt_top_logprobs[0][1:]]


@pytest.mark.parametrize("config", ["configs/dspark.yaml", "configs/eagle3.yaml"])
def test_trained_drafters_accept_as_after_a_whole_prefill(config):
    """The shipped DSpark and EAGLE-3 drafters read the target's hidden states over the prompt: after
    a prefill in chunks of 16 positions (code prompts of about 100 tokens) they draft and get
    accepted exactly as after a whole one (float64, sampled: tokens and counts per request)."""
    whole = dspark.build_pipeline(config, overrides=["target.dtype=float64"])
    chunked = dspark.build_pipeline(config, overrides=["target.dtype=float64", "engine.prefill_chunk=16"])
    prompts = load_prompts("code", whole.tokenizer, 3)
    settings = dict(max_new_tokens=24, temperature=1.0, seed=[1, 2, 3], ignore_eos=True)
    a, b = whole.generate(prompts, **settings), chunked.generate(prompts, **settings)
    assert a.token_ids == b.token_ids
    assert [[r[k] for k in COUNTS] for r in a.stats.per_request] == [[r[k] for k in COUNTS] for r in b.stats.per_request]
    assert sum(r["accepted"] for r in a.stats.per_request) > 24  # (a drafter whose context matters)


def test_rounds_run_between_the_chunks_of_a_long_prompt():
    """While ``long`` (20 tokens) goes in, 4 positions a step, ``short`` — decoding already — runs a
    round between two chunks: chunk steps and rounds alternate, and ``long``'s last chunk comes
    with its admission (its first token)."""
    target = tiny_hf_model("qwen3", scale=2.0)
    pipe = spec_pipeline(target, "ngram", 3, "engine.max_batch_size=2", f"engine.prefill_chunk={CHUNK}")
    session = pipe.session(max_len=48)
    short = session.submit([7, 3, 9], max_new_tokens=30)
    steps = [(session.step(), session.batch.chunked)]  # (short's admission)
    long = session.submit(PREFIX + list(range(1, 9)), max_new_tokens=4)
    while session.unfinished:
        updates = session.step()
        steps.append(({u.request for u in updates if u.token_ids}, session.batch.chunked))
    steps[0] = ({u.request for u in steps[0][0] if u.token_ids}, steps[0][1])
    # positions 0–3, then 4–7, 8–11, 12–15 (each chunk feeding the last one held again), 16–19 at admission
    chunk, round_ = (set(), True), ({short}, False)
    assert steps[:10] == [({short}, False), chunk, round_, chunk, round_, chunk, round_, chunk, round_, ({long}, False)]
    assert not any(chunked for _, chunked in steps[10:])


def test_a_step_prefills_at_most_the_chunk_whatever_arrives():
    """Two 20-token prompts and a 3-token one arrive together while a request decodes: no step
    prefills more than 4 new prompt positions in all; they go in first come, first served (the
    second long prompt starts once the first is admitted, the short one after it), and the request
    decoding runs a round between two such steps."""
    target = tiny_hf_model("qwen3", scale=2.0)
    pipe = spec_pipeline(target, "ngram", 3, "engine.max_batch_size=4", f"engine.prefill_chunk={CHUNK}")
    engine, fed = pipe.engine, []
    prefill = engine._prefill

    def counted(state, cache, starts, *args, **kwargs):  # new positions: fed, less the last held one fed again
        fed.append(sum(int(n) - b - (b > 0) for n, b in zip(state.prompt_lengths.tolist(), starts)))
        return prefill(state, cache, starts, *args, **kwargs)

    engine._prefill = counted
    session = pipe.session(max_len=48)
    decoding = session.submit([7, 3, 9], max_new_tokens=40)
    session.step()
    first, second = (session.submit(PREFIX + [k] * 8, max_new_tokens=3) for k in (1, 2))
    short = session.submit([5, 6, 7], max_new_tokens=3)
    steps, started = [], {}
    while session.unfinished:
        fed.clear()
        updates = session.step()
        steps.append((sum(fed), {u.request for u in updates if u.token_ids}))
        for request in (first, second, short):
            if request not in started and any(u.request == request and u.token_ids for u in updates):
                started[request] = len(steps)
    assert max(n for n, _ in steps) <= CHUNK
    assert started[first] < started[second] < started[short]
    prefills = [k for k, (n, _) in enumerate(steps) if n]
    assert all(decoding in steps[k + 1][1] for k in prefills[:-1])  # (a round after each, while it decodes)
    assert sum(n for n, _ in steps) == 20 + 20 + 3


def test_a_request_aborted_while_its_prompt_goes_in_never_starts():
    target = tiny_hf_model("qwen3", scale=2.0)
    pipe = spec_pipeline(target, "eagle3", 3, "target.dtype=float64", "engine.max_batch_size=1",
                         f"engine.prefill_chunk={CHUNK}")
    session = pipe.session(max_len=48)
    long = session.submit(PREFIX + list(range(1, 9)), max_new_tokens=4)
    session.step()
    assert list(session.batch.prefilling.values()) == [long]
    assert session.abort(long) and not session.abort(long)
    result = session.result(long)
    assert result.token_ids == [] and result.finish_reason == "abort"
    assert session.unfinished == 0
    after = session.submit(PREFIX + [9, 9], max_new_tokens=4, temperature=1.0, seed=5)
    while session.unfinished:
        session.step()
    alone = pipe.generate([PREFIX + [9, 9]], max_new_tokens=4, temperature=1.0, seed=5)
    assert session.result(after).token_ids == alone.token_ids[0]


def test_chunked_prefill_needs_prefix_caching_and_a_chunk_of_two_positions_or_more():
    target = tiny_hf_model("qwen3", scale=2.0)
    for bad in (-1, 1):  # (a chunk of one position never advanced: generate hung)
        with pytest.raises(ValueError, match=r"prefill_chunk must be 0 \(off\) or a number of prompt positions >= 2"):
            spec_pipeline(target, "none", 0, f"engine.prefill_chunk={bad}")
    with pytest.raises(ValueError, match=r"prefill_chunk needs prefix caching.*engine.prefix_caching=true"):
        spec_pipeline(target, "none", 0, "engine.prefill_chunk=8", "engine.prefix_caching=false")
    with pytest.raises(ValueError, match=r"prefill_chunk needs prefix caching.*batching=static"):
        spec_pipeline(target, "none", 0, "engine.prefill_chunk=8", "engine.batching=static")
    assert isinstance(spec_pipeline(target, "none", 0, "engine.prefill_chunk=8"), dspark.Pipeline)


def test_a_prompt_copied_down_then_aborted_leaves_a_slot_whose_record_matches_its_rows():
    """A request copied down to a lower free slot (trimmed rounds) goes back to wait when the step's
    chunk is spent, and is aborted. The lower slot is recorded as holding the upper slot's whole
    prompt X, so a later request of X reuses it: the rows it reuses must be X's (only the aborted
    request's three shared positions were copied once, and X decoded other tokens)."""
    target = tiny_hf_model("qwen3", scale=2.0)
    x = [50, 51, 52, 53, 54, 55]
    alone = spec_pipeline(target, "none", 0, "target.dtype=float64").generate([x], max_new_tokens=8).token_ids[0]
    pipe = spec_pipeline(target, "none", 0, "target.dtype=float64", "engine.max_batch_size=4", "engine.prefill_chunk=10")
    session = pipe.session(max_len=64)
    session.submit([2, 3], max_new_tokens=40)  # slot 0, decoding throughout
    session.submit([10], max_new_tokens=1)  # slots 1 and 2: done at once
    session.submit([20], max_new_tokens=1)
    session.submit(x, max_new_tokens=1)  # slot 3 holds X
    session.step()
    session.submit(list(range(60, 72)), max_new_tokens=3)  # 12 positions: spends the step's chunk of 10
    shares = session.submit(x[:4] + [90, 91], max_new_tokens=3)  # copied down from slot 3 to slot 2, then waits
    session.step()
    session.abort(shares)
    again = session.submit(x, max_new_tokens=8)  # takes slot 2
    while session.unfinished:
        session.step()
    assert session.result(again).token_ids == alone
