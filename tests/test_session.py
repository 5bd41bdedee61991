"""Session: requests submitted while others decode, each decoded exactly as alone; its updates are
its output; bad requests are refused before they are queued."""

import pytest

import dspark

from helpers import ragged_prompts, tiny_hf_model
from test_speculative import PER_REQUEST, spec_pipeline

PROMPTS = ragged_prompts(101, lengths=(4, 9, 2, 6, 5, 7))
BUDGETS = [9, 3, 6, 12, 1, 7]
ARRIVALS = [0, 1, 2, 3, 3, 8]  # the step before which each request is submitted (the first alone)


def serve(session, requests: list[dict], arrivals: list[int]) -> tuple[dict, list]:
    """Submit ``requests[i]`` before step ``arrivals[i]``, step until none is unfinished; return each
    request's streamed tokens and every update."""
    streamed, updates, step, submitted = {}, [], 0, 0
    while submitted < len(requests) or session.unfinished:
        while submitted < len(requests) and arrivals[submitted] <= step:
            assert session.submit(**requests[submitted]) == submitted
            submitted += 1
        for update in session.step():
            assert update.request >= 0  # (empty slots report nothing)
            streamed.setdefault(update.request, []).extend(update.token_ids)
            updates.append(update)
        step += 1
    return streamed, updates


@pytest.mark.parametrize("drafter", ["none", "ngram", "draft_model", "dspark", "eagle3", "eagle3_stop"])
def test_requests_submitted_while_others_decode_decode_as_alone(drafter):
    """Six requests arriving at different steps into two slots, with their own budgets and
    settings (greedy among sampled): each request's output — streamed and final — is its output
    alone (float64, token for token), and it is reported finished once."""
    target = tiny_hf_model("qwen3", scale=2.0)
    pipe = spec_pipeline(target, drafter, 3, "target.dtype=float64", "engine.max_batch_size=2")
    requests = [dict(prompt=prompt, max_new_tokens=budget, seed=40 + i, **PER_REQUEST[i % len(PER_REQUEST)])
                for i, (prompt, budget) in enumerate(zip(PROMPTS, BUDGETS))]
    session = pipe.session(max_len=40)
    streamed, updates = serve(session, requests, ARRIVALS)
    assert sorted(u.request for u in updates if u.finished) == list(range(len(requests)))
    assert session.step() == [] and session.unfinished == 0
    for i, request in enumerate(requests):
        alone = pipe.generate([request["prompt"]], **{k: v for k, v in request.items() if k != "prompt"}).token_ids[0]
        assert streamed[i] == session.result(i).token_ids == alone, f"request {i}"
        assert session.result(i).stats["generated"] == len(alone)


def test_a_session_with_every_request_at_once_is_generate():
    """Submitted together, the requests decode as ``generate`` decodes them (same seeds), with the
    same log-probabilities; stop strings end requests as they do there."""
    pipe = dspark.build_pipeline("ar", overrides=["target.device=cpu", "engine.max_batch_size=2"])
    prompts = ["def add(a, b):", "The river", "import os\n"]
    kwargs = dict(max_new_tokens=24, temperature=1.0, ignore_eos=True)
    free = pipe.generate(prompts, seed=[1, 2, 3], **kwargs)
    stops = [None, [free.texts[1][4:7]], None]
    expected = pipe.generate(prompts, seed=[1, 2, 3], stop=stops, logprobs=True, **kwargs)
    session = pipe.session(max_len=64, logprobs=True)
    streamed, _ = serve(session, [dict(prompt=p, seed=1 + i, stop=stops[i], **kwargs) for i, p in enumerate(prompts)],
                        [0, 0, 0])
    assert [session.result(i).token_ids for i in range(3)] == [streamed[i] for i in range(3)] == expected.token_ids
    assert [session.result(i).text for i in range(3)] == expected.texts
    for i in range(3):
        assert session.result(i).logprobs == pytest.approx(expected.logprobs[i], abs=1e-5)
    assert len(expected.token_ids[1]) < len(free.token_ids[1])  # the stop string ended it


def test_bad_requests_and_sessions_are_refused():
    target = tiny_hf_model("qwen3", scale=2.0)
    pipe = spec_pipeline(target, "ngram", 3, "engine.max_batch_size=2")
    session = pipe.session(max_len=20)
    with pytest.raises(ValueError, match="temperature"):
        session.submit([1, 2, 3], max_new_tokens=4, temperature=-1.0)
    with pytest.raises(ValueError, match="needs 24 positions, more than the batch's 20"):
        session.submit([1, 2, 3], max_new_tokens=17)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        session.submit([1, 2, 3], max_new_tokens=0)
    assert session.submit([1, 2, 3], max_new_tokens=4) == 0  # nothing was queued before
    with pytest.raises(ValueError, match="request 0 has not finished"):
        session.result(0)
    pipe.generate([[4, 5]], max_new_tokens=2)  # a generate call takes the engine over from the session
    with pytest.raises(RuntimeError, match="this batch no longer owns the engine"):
        session.step()
    with pytest.raises(ValueError, match="a Session needs max_len"):
        pipe.session()
    static = spec_pipeline(target, "ngram", 3, "engine.batching=static")
    with pytest.raises(ValueError, match="a Session needs continuous batching"):
        static.session(max_len=32)


@pytest.mark.parametrize("drafter", ["none", "draft_model", "dspark", "eagle3"])
def test_aborted_requests_leave_the_others_as_alone(drafter):
    """Requests aborted while waiting, while decoding and after they ended: the aborted one keeps
    what it had streamed, the others decode as alone (float64, token for token) — the slot it
    frees is taken by the next request mid-flight."""
    target = tiny_hf_model("qwen3", scale=2.0)
    pipe = spec_pipeline(target, drafter, 3, "target.dtype=float64", "engine.max_batch_size=2")
    requests = [dict(prompt=prompt, max_new_tokens=budget + 6, seed=40 + i, **PER_REQUEST[i % len(PER_REQUEST)])
                for i, (prompt, budget) in enumerate(zip(PROMPTS, BUDGETS))]
    session = pipe.session(max_len=48)
    ids = [session.submit(**request) for request in requests]
    streamed: dict[int, list[int]] = {}
    assert session.abort(ids[3])  # waiting: never starts
    for _ in range(3):  # admission, then two rounds
        for update in session.step():
            streamed.setdefault(update.request, []).extend(update.token_ids)
    running = [b for b in session.batch.holder if b >= 0 and b not in session._ended]
    assert 0 in running
    assert session.abort(0)  # decoding: keeps what it streamed
    assert not session.abort(0)  # (once)
    late = None
    while session.unfinished:
        for update in session.step():
            streamed.setdefault(update.request, []).extend(update.token_ids)
            assert update.request not in (0, 3, late)  # aborted requests are not reported
        if late is None and not session.batch.waiting and 4 in session.batch.holder and streamed.get(4):
            assert session.abort(4)  # no request waits for its slot: the row rides along done
            late = 4
    assert late == 4 and session.result(4).finish_reason == "abort"
    assert session.result(3).token_ids == [] and session.result(3).finish_reason == "abort"
    assert not session.abort(1)  # ended already: keeps its reason
    first = session.result(0)
    assert first.finish_reason == "abort" and first.token_ids == streamed.get(0, [])
    alone = [pipe.generate([r["prompt"]], **{k: v for k, v in r.items() if k != "prompt"}).token_ids[0] for r in requests]
    assert first.token_ids == alone[0][:len(first.token_ids)] and len(first.token_ids) < len(alone[0])
    assert session.result(4).token_ids == streamed[4] == alone[4][:len(streamed[4])]
    for i in (1, 2, 5):
        assert session.result(i).token_ids == streamed[i] == alone[i], f"request {i}"
        assert session.result(i).finish_reason in ("stop", "length")


def test_finish_reasons_and_release():
    """``length`` at the budget, ``stop`` at EOS / a stop token / a stop string; a released request's
    output is gone and it is refused by ``result``."""
    pipe = dspark.build_pipeline("ar", overrides=["target.device=cpu", "engine.max_batch_size=2"])
    free = pipe.generate(["def add(a, b):"], max_new_tokens=24, ignore_eos=True).token_ids[0]
    session = pipe.session(max_len=64)
    by_length = session.submit("def add(a, b):", max_new_tokens=24, ignore_eos=True)
    by_token = session.submit("def add(a, b):", max_new_tokens=24, ignore_eos=True, stop_token_ids=[free[5]])
    by_string = session.submit("def add(a, b):", max_new_tokens=24, ignore_eos=True,
                               stop=[pipe.tokenizer.decode(free[3:5])])
    while session.unfinished:
        session.step()
    assert session.result(by_length).finish_reason == "length" and session.result(by_length).token_ids == free
    assert session.result(by_token).finish_reason == "stop" and session.result(by_token).token_ids[-1] == free[5]
    assert session.result(by_string).finish_reason == "stop" and len(session.result(by_string).token_ids) <= 5
    assert session.result(by_length).prompt_token_ids == pipe.encode(["def add(a, b):"])[0]
    for fake in (True, 1.0):  # (equal to 1, and once taken for it: result(True) gave request 1's output,
        for call in (session.result, session.release, session.prompt_token_ids):  # release(1.0) half-released it)
            with pytest.raises(ValueError, match=f"no request {fake!r} in this session"):
                call(fake)
    assert session.result(1).token_ids[-1] == free[5]
    session.release(by_length)
    with pytest.raises(ValueError, match="released"):
        session.result(by_length)
    with pytest.raises(ValueError, match="released: its prompt is gone"):
        session.prompt_token_ids(by_length)
    waiting = session.submit("import os", max_new_tokens=4)
    with pytest.raises(ValueError, match="has not finished"):
        session.release(waiting)
    with pytest.raises(ValueError, match="no request 7"):
        session.abort(7)
    for unknown in (session.result, session.release):  # an id never given out is named as such
        with pytest.raises(ValueError, match=r"no request 99 in this session \(ids 0\.\."):
            unknown(99)
    empty = pipe.session(max_len=32)
    with pytest.raises(ValueError, match=r"no request 0 in this session \(none submitted yet\)"):
        empty.result(0)
    with pytest.raises(ValueError, match=r"no request 0 in this batch \(none added yet\)"):
        empty.abort(0)


def test_log_probabilities_per_request():
    """A session that records up to 3 likeliest tokens: each request gets what it asks for —
    nothing, its tokens' log-probabilities, or the k likeliest too — equal to ``generate``'s
    alone; while no request that asks decodes, nothing is computed."""
    pipe = dspark.build_pipeline("eagle3", overrides=["target.device=cpu", "target.dtype=float64",
                                                      "engine.max_batch_size=2"])
    prompts = ["def add(a, b):", "import os\n", "class Stack:", "for i in range("]
    asks = [dict(logprobs=False), dict(logprobs=True), dict(logprobs=True, top_logprobs=2), {}]
    expected = [pipe.generate([p], max_new_tokens=10, temperature=0.8, seed=i, logprobs=True, top_logprobs=3)
                for i, p in enumerate(prompts)]
    quiet = pipe.session(max_len=48, logprobs=True, top_logprobs=3)
    quiet.submit(prompts[0], max_new_tokens=10, logprobs=False)
    while quiet.unfinished:
        quiet.step()
    assert quiet.result(0).logprobs is None and not quiet.batch.stopper.logprobs.any()  # nothing computed
    session = pipe.session(max_len=48, logprobs=True, top_logprobs=3)
    for i, (prompt, ask) in enumerate(zip(prompts, asks)):
        session.submit(prompt, max_new_tokens=10, temperature=0.8, seed=i, **ask)
    streamed: dict[int, tuple[list, list]] = {i: ([], []) for i in range(4)}
    while session.unfinished:
        for update in session.step():  # each step's tokens come with their log-probabilities
            if update.logprobs is not None:
                assert len(update.logprobs) == len(update.token_ids)
                streamed[update.request][0].extend(update.logprobs)
            if update.top_logprobs is not None:
                streamed[update.request][1].extend(update.top_logprobs)
    outputs = [session.result(i) for i in range(4)]
    for i, output in enumerate(outputs):
        assert streamed[i][0] == (output.logprobs or []) and streamed[i][1] == (output.top_logprobs or [])
    assert [o.token_ids for o in outputs] == [e.token_ids[0] for e in expected]
    assert outputs[0].logprobs is None and outputs[0].top_logprobs is None
    assert outputs[1].logprobs == pytest.approx(expected[1].logprobs[0], abs=1e-9) and outputs[1].top_logprobs is None
    for i, k in ((2, 2), (3, 3)):
        assert outputs[i].logprobs == pytest.approx(expected[i].logprobs[0], abs=1e-9)
        assert [[t for t, _ in alts] for alts in outputs[i].top_logprobs] == [
            [t for t, _ in alts[:k]] for alts in expected[i].top_logprobs[0]]
    plain = pipe.session(max_len=48)
    with pytest.raises(ValueError, match="records no log-probabilities"):
        plain.submit(prompts[0], max_new_tokens=4, logprobs=True)
    with pytest.raises(ValueError, match=r"top_logprobs=5 is more than this batch records \(3"):
        session.submit(prompts[0], max_new_tokens=4, logprobs=True, top_logprobs=5)
    with pytest.raises(ValueError, match="top_logprobs needs logprobs=True"):
        session.submit(prompts[0], max_new_tokens=4, top_logprobs=2)


def test_prompt_log_probabilities_per_request(monkeypatch):
    """Each request gets its prompt's scores as it asks — none, each token's, or the k likeliest
    too — whatever the session's default, equal to ``generate``'s; two requests of one prompt
    (one prefill, shared) asking differently each get theirs; a step where no admitted request
    asks scores nothing."""
    from dspark.engine import Engine

    pipe = dspark.build_pipeline("eagle3", overrides=["target.device=cpu", "target.dtype=float64",
                                                      "engine.max_batch_size=4"])
    prompts = ["def add(a, b):", "import os\n", "def add(a, b):", "class Stack:"]
    asks = [{}, dict(prompt_logprobs=True), dict(prompt_logprobs=True, prompt_top_logprobs=3),
            dict(prompt_logprobs=True, prompt_top_logprobs=1)]
    alone = [pipe.generate([p], max_new_tokens=4, prompt_logprobs=True, prompt_top_logprobs=3) for p in prompts]
    scored, prefill = [], Engine._prefill
    monkeypatch.setattr(Engine, "_prefill", lambda self, *args: scored.append(args[-1]) or prefill(self, *args))
    session = pipe.session(max_len=40)
    for prompt, ask in zip(prompts, asks):
        session.submit(prompt, max_new_tokens=4, **ask)
    while session.unfinished:
        session.step()
    assert scored == [3]  # one admission, scored as widely as its widest ask
    outputs = [session.result(i) for i in range(4)]
    assert outputs[0].prompt_logprobs is None and outputs[0].prompt_top_logprobs is None
    assert outputs[1].prompt_logprobs == pytest.approx(alone[1].prompt_logprobs[0]) and outputs[1].prompt_top_logprobs is None
    for i, k in ((2, 3), (3, 1)):
        assert outputs[i].prompt_logprobs == pytest.approx(alone[i].prompt_logprobs[0])
        assert outputs[i].prompt_top_logprobs[0] is None
        assert [[t for t, _ in alts] for alts in outputs[i].prompt_top_logprobs[1:]] == [
            [t for t, _ in alts[:k]] for alts in alone[i].prompt_top_logprobs[0][1:]]
    defaults = pipe.session(max_len=40, prompt_logprobs=True, prompt_top_logprobs=2)
    defaults.submit(prompts[1], max_new_tokens=2)
    defaults.submit(prompts[3], max_new_tokens=2, prompt_logprobs=False)
    while defaults.unfinished:
        defaults.step()
    assert scored[1:] == [2]
    assert len(defaults.result(0).prompt_top_logprobs[1]) == 2 and defaults.result(1).prompt_logprobs is None
    quiet = pipe.session(max_len=40)
    quiet.submit(prompts[0], max_new_tokens=2)
    quiet.step()
    assert scored[2:] == [-1]  # nothing asked: nothing scored
    with pytest.raises(ValueError, match="prompt_top_logprobs needs prompt_logprobs=True"):
        quiet.submit(prompts[0], max_new_tokens=2, prompt_top_logprobs=2)


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_generate_says_why_each_request_ended(batching):
    """``finish_reasons``: ``length`` at the budget, ``stop`` at EOS, a stop token or a stop string —
    for requests sharing batches (three slots, five requests)."""
    pipe = dspark.build_pipeline("ar", overrides=["target.device=cpu", "engine.max_batch_size=3",
                                                  f"engine.batching={batching}"])
    prompt = "def add(a, b):"
    free = pipe.generate([prompt], max_new_tokens=24, ignore_eos=True).token_ids[0]
    eos = pipe.engine.eos_token_ids[0]
    fresh = [j for j in range(1, 24) if free[j] not in free[:j]]  # tokens that first occur there
    early, late = fresh[0], fresh[-1]
    result = pipe.generate([prompt] * 5, max_new_tokens=[24, 24, 24, 24, late + 1],
                           ignore_eos=[True, True, True, False, True],
                           stop_token_ids=[None, [free[early]], None, None, [free[late]]],
                           stop=[None, None, [pipe.tokenizer.decode(free[3:5])], None, None],
                           logit_bias=[None, None, None, {eos: 100.0}, None])
    assert result.finish_reasons == ["length", "stop", "stop", "stop", "stop"]
    assert result.token_ids[0] == free and result.token_ids[1] == free[:early + 1] and result.token_ids[3] == [eos]
    assert result.token_ids[4] == free[:late + 1]  # its stop token is its budget's last: a stop, as vLLM says


def test_a_session_holds_no_more_positions_than_the_target_has():
    """max_len beyond max_position_embeddings + lookahead could never be used (and made the server
    advertise a context the model lacks, refusing every chat without max_tokens): refused when
    asked for, capped when it comes from cache.max_len."""
    target = tiny_hf_model("qwen3", scale=2.0)  # 256 positions
    pipe = spec_pipeline(target, "ngram", 3)
    with pytest.raises(ValueError, match=r"max_len 261 is more positions than a request can use: the target has "
                                         r"max_position_embeddings 256, \+ 4 of lookahead = 260 at most"):
        pipe.session(max_len=261)
    assert pipe.session(max_len=260).batch.max_len == 260
    roomy = spec_pipeline(target, "ngram", 3, "cache.max_len=1000")
    assert roomy.session().batch.max_len == 260


def test_rounds_wider_than_sixty_four_tokens():
    target = tiny_hf_model("qwen3", scale=2.0)
    prompts = ragged_prompts(101, lengths=(30, 5))
    expected = spec_pipeline(target, "none", 0).generate(prompts, max_new_tokens=80, ignore_eos=True).token_ids
    wide = spec_pipeline(target, "ngram", 70)
    assert wide.generate(prompts, max_new_tokens=80, ignore_eos=True).token_ids == expected
