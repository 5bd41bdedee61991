"""Session.warm_up: dummy requests run rounds over every number of rows a session's rounds may take
(growing and shrinking, greedy and sampled) on a batch of the session's shape, then the session
starts afresh — with engine.compile, no request meets a shape of its rounds first."""

import json

import pytest
from dspark.cli import main

from helpers import ragged_prompts, tiny_hf_model
from test_speculative import ADAPTIVE, spec_pipeline


def record_rounds(pipe) -> list[tuple[int, bool]]:
    """Each round's rows and whether its settings were greedy; and count the drafter's admissions."""
    rounds, engine = [], pipe.engine
    round_, admit = engine._round, engine.drafter.admit

    def recorded(state, *args, **kwargs):
        rounds.append((state.batch_size, bool(state.params.greedy)))
        return round_(state, *args, **kwargs)

    def admitted(*args, **kwargs):
        rounds.append(("admit", None))
        return admit(*args, **kwargs)

    engine._round, engine.drafter.admit = recorded, admitted
    return rounds


@pytest.mark.parametrize("trim", [True, False])
def test_warm_up_runs_rounds_over_every_row_count_then_starts_afresh(trim):
    """Four slots: rounds over 1, 2 and 4 rows, greedy and sampled, the dummy requests admitted into
    the running batch one at a time (rounds over all four slots without trimmed rounds); then the
    session holds nothing of them, and a request decodes as alone."""
    pipe = spec_pipeline(tiny_hf_model("qwen3"), "ngram", 3, "engine.max_batch_size=4",
                         f"engine.trim_idle_slots={str(trim).lower()}")
    session = pipe.session(max_len=32)
    rounds = record_rounds(pipe)
    session.warm_up()
    rows = {1, 2, 4} if trim else {4}
    assert {r for r in rounds if r[0] != "admit"} == {(k, greedy) for k in rows for greedy in (True, False)}
    assert rounds.count(("admit", None)) >= 2 * 3  # (the first of each pass starts the drafter)
    assert session.batch.requests == [] and session.unfinished == 0 and session.batch.prefixes.queries == 0
    prompt = ragged_prompts(101, lengths=(6,))[0]
    request = session.submit(prompt, max_new_tokens=8, temperature=1.0, seed=3)
    while session.unfinished:
        session.step()
    assert session.result(request).token_ids == pipe.generate([prompt], max_new_tokens=8, temperature=1.0,
                                                              seed=3).token_ids[0]


def test_warm_up_up_to_some_rows_and_its_refusals():
    pipe = spec_pipeline(tiny_hf_model("qwen3"), "none", 0, "engine.max_batch_size=8")
    session = pipe.session(max_len=16)
    rounds = record_rounds(pipe)
    session.warm_up(rows=3)
    assert {k for k, _ in rounds if k != "admit"} == {1, 2, 4}  # (three requests: rounds over four rows)
    for rows in (0, 9, True, 2.0):
        with pytest.raises(ValueError, match="takes a number of rows from 1 to the session's 8 slots"):
            session.warm_up(rows=rows)
    session.submit([1, 2], max_new_tokens=2)
    with pytest.raises(ValueError, match="before the first submit"):
        session.warm_up()
    with pytest.raises(ValueError, match="warm_up\\(\\) needs max_len >= 3"):
        pipe.session(max_len=2).warm_up()


def test_the_scheduler_forgets_what_the_warm_up_taught_it():
    """The adaptive scheduler's acceptance estimates and the measured fallback's round times come
    from the dummy rounds (compiling, on prompts of one token): both are dropped."""
    pipe = spec_pipeline(tiny_hf_model("qwen3"), "ngram", 3, "engine.max_batch_size=2", *ADAPTIVE,
                         "scheduler.measured_fallback=true")
    scheduler, taught = pipe.engine.scheduler, []
    forget = scheduler.forget

    def forgetting():
        taught.append((float(scheduler.reached.sum()), len(scheduler.fallback.arms)))
        forget()

    scheduler.forget = forgetting
    pipe.session(max_len=24).warm_up()
    assert taught[0][0] > 0 and taught[0][1] > 0  # (the dummy rounds did teach it)
    assert scheduler.reached is None and not scheduler.fallback.arms


@pytest.mark.slow
def test_compiled_rounds_meet_no_new_shape_after_a_warm_up():
    """engine.compile: after warm_up(), requests arriving one by one and together, greedy and sampled,
    compile nothing more."""
    from torch._dynamo.utils import counters

    pipe = spec_pipeline(tiny_hf_model("qwen3", scale=3.0), "none", 0, "engine.compile=true",
                         "engine.max_batch_size=2")
    session = pipe.session(max_len=32)
    session.warm_up()
    before = counters["stats"]["unique_graphs"]
    prompts = ragged_prompts(101, lengths=(5, 9, 3))
    for k, temperature in ((1, 0.0), (2, 1.0), (1, 1.0)):
        for prompt in prompts[:k]:
            session.submit(prompt, max_new_tokens=5, temperature=temperature, seed=k)
        session.step()
        if k == 1:
            session.submit(prompts[2], max_new_tokens=3, temperature=temperature)  # (admitted while one decodes)
        while session.unfinished:
            session.step()
    assert counters["stats"]["unique_graphs"] == before


def test_serve_warms_up_before_reading_requests(capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps({"prompt": "def add(a, b):", "max_new_tokens": 4}) + "\n"))
    assert main(["serve", "--config", "ar", "--max-len", "32", "--warm-up", "target.device=cpu",
                 "engine.max_batch_size=2"]) == 0
    out, err = capsys.readouterr()
    assert "warming up over 1 to 2 rows" in err and "warmed up in" in err
    assert len(json.loads(out.splitlines()[0])["token_ids"]) == 4
