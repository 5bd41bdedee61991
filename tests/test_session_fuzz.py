"""Continuous batching against decoding alone, on random programs: requests submitted, stepped
and aborted in any order into a session of few slots (so that they queue, refill slots and reuse
each other's prefixes and outputs) decode exactly as alone — greedy ones as plain autoregressive
decoding, sampled ones as the same request with the same seed alone — and end for the right
reason; aborted requests disturb no other."""

import functools

import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from helpers import ragged_prompts, tiny_hf_model
from test_speculative import spec_pipeline

GAMMA, SLOTS, MAX_LEN, LONGEST = 3, 2, 40, 12  # LONGEST: the largest max_new_tokens drawn
BASE, OTHER = ragged_prompts(101, lengths=(7, 5), seed=3)


@functools.lru_cache(maxsize=None)
def target():
    return tiny_hf_model("qwen3", scale=2.0)


@functools.lru_cache(maxsize=None)
def pipeline(drafter: str, *overrides: str):
    """The session's pipeline (float64: alone and batched agree token for token), built once."""
    return spec_pipeline(target(), drafter, GAMMA, "target.dtype=float64", f"engine.max_batch_size={SLOTS}",
                         *overrides)


@functools.lru_cache(maxsize=None)
def reference():
    """Plain autoregressive decoding, in a pipeline of its own (a generate call on the session's
    engine would end the session)."""
    return spec_pipeline(target(), "none", 0, "target.dtype=float64")


@functools.lru_cache(maxsize=None)
def plain(prompt: tuple[int, ...]) -> list[int]:
    """Plain autoregressive greedy decoding of ``prompt`` alone, ``LONGEST`` tokens, EOS not ending it."""
    return reference().generate([list(prompt)], max_new_tokens=LONGEST, ignore_eos=True).token_ids[0]


@functools.lru_cache(maxsize=None)
def prompt_pool() -> list[list[int]]:
    """Prompts sharing first tokens with each other: prefixes of one prompt, the prompt with other
    endings, the prompt followed by (part of) its greedy output and more (a conversation's next
    turn, which reuses a slot's output), and two unrelated ones."""
    turn = BASE + plain(tuple(BASE))[:5]
    return [BASE, BASE[:3], BASE[:5] + [7], BASE + [9, 4], turn, turn + [11, 3], BASE + plain(tuple(BASE))[:2],
            OTHER, OTHER[:2] + [5]]


def expected_greedy(prompt: list[int], budget: int, stop_ids: set[int]) -> tuple[list[int], str]:
    """A greedy request's output and finish reason, from plain decoding alone: up to and with the
    first stop token within the budget (``"stop"``), else the budget's tokens (``"length"``)."""
    ids = plain(tuple(prompt))[:budget]
    for i, token in enumerate(ids):
        if token in stop_ids:
            return ids[:i + 1], "stop"
    return ids, "length"


@functools.lru_cache(maxsize=None)
def sampled_alone(drafter: str, overrides: tuple[str, ...], prompt: tuple[int, ...], settings: tuple) -> list[int]:
    """A sampled request decoded alone by the same pipeline, with the same settings and seed."""
    return pipeline(drafter, *overrides).generate([list(prompt)], **dict(settings)).token_ids[0]


requests = st.fixed_dictionaries({
    "prompt": st.integers(0, 8),  # (an index into the pool)
    "max_new_tokens": st.integers(1, LONGEST),
    "stop_at": st.none() | st.integers(0, LONGEST - 1),  # (a stop token: the greedy output's token there)
    "ignore_eos": st.booleans(),
    "sampled": st.booleans(),
})
# a program: requests submitted one after another, each followed by a few steps (none: submitted
# together with the next) and perhaps an abort (of any request so far: waiting, decoding or ended)
programs = st.lists(st.tuples(requests, st.integers(0, 3), st.none() | st.integers(0, 99)), min_size=3, max_size=7)


def run_program(drafter: str, overrides: tuple[str, ...], program: list) -> None:
    """Run ``program`` on a fresh session, then step until every request ended, checking each update
    as it comes; then check every request against its decoding alone."""
    pipe, pool = pipeline(drafter, *overrides), prompt_pool()
    session = pipe.session(max_len=MAX_LEN)
    submitted, streamed, finished, aborted = [], {}, set(), {}

    def step():
        for update in session.step():
            i = update.request
            assert i not in finished and i not in aborted, f"request {i} reported after it ended"
            streamed[i] += update.token_ids
            if update.finished:
                finished.add(i)

    for request, steps, abort in program:
        prompt = pool[request["prompt"]]
        stop_ids = [] if request["stop_at"] is None else [plain(tuple(prompt))[request["stop_at"]]]
        kwargs = dict(max_new_tokens=request["max_new_tokens"], ignore_eos=request["ignore_eos"],
                      stop_token_ids=stop_ids)
        if request["sampled"]:
            kwargs.update(temperature=1.0, seed=len(submitted))
        assert session.submit(prompt, **kwargs) == len(submitted)
        submitted.append((prompt, kwargs))
        streamed[len(submitted) - 1] = []
        for _ in range(steps):
            step()
        live = [i for i in range(len(submitted)) if i not in finished and i not in aborted]
        if abort is not None:  # (mostly one not ended yet: waiting, or decoding)
            i = live[abort % len(live)] if live and abort % 5 else abort % len(submitted)
            assert session.abort(i) == (i in live), f"abort({i})"
            if i in live:
                aborted[i] = list(streamed[i])
    for _ in range(sum(kwargs["max_new_tokens"] + 4 for _, kwargs in submitted)):  # (a round emits one or more)
        if not session.unfinished:
            break
        step()
    assert session.unfinished == 0 and session.step() == [], "the session never finished"
    eos = set(pipe.engine.eos_token_ids)
    for i, (prompt, kwargs) in enumerate(submitted):
        out, stops = session.result(i), set(kwargs["stop_token_ids"]) | (set() if kwargs["ignore_eos"] else eos)
        if kwargs.get("temperature"):  # (its reason: a stop token last, else its whole budget)
            alone = sampled_alone(drafter, overrides, tuple(prompt), tuple(sorted(
                (k, tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items())))
            reason = "stop" if alone[-1] in stops else "length"
            assert reason == "stop" or len(alone) == kwargs["max_new_tokens"]
        else:
            alone, reason = expected_greedy(prompt, kwargs["max_new_tokens"], stops)
        if i in aborted:
            assert out.finish_reason == "abort", f"request {i}"
            assert out.token_ids == streamed[i] == aborted[i], f"request {i}: aborted, it keeps what it streamed"
            assert out.token_ids == alone[:len(out.token_ids)], f"request {i}: aborted, a prefix of its output alone"
        else:
            assert out.token_ids == streamed[i] == alone, f"request {i}: {prompt} {kwargs}"
            assert out.finish_reason == reason, f"request {i}: {prompt} {kwargs}"
    assert finished.isdisjoint(aborted) and finished | set(aborted) == set(range(len(submitted)))


@pytest.mark.parametrize("drafter, overrides", [
    ("none", ()), ("ngram", ()), ("draft_model", ()), ("dspark", ()), ("eagle3", ()),
    ("dspark", ("engine.prefill_chunk=3",)),  # (requests aborted while their prompts go in over several steps)
    ("eagle3", ("engine.trim_idle_slots=false", "engine.reuse_outputs=false")),
    ("eagle3_stop", ("engine.max_batch_size=3",)), ("dspark_threshold", ()),
])
@settings(max_examples=30, deadline=None, phases=[p for p in Phase if p != Phase.explain])  # (explaining: minutes)
@given(program=programs)
def test_random_programs_decode_every_request_as_alone(drafter, overrides, program):
    run_program(drafter, overrides, program)
