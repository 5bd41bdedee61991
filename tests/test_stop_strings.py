"""Stop strings: a request ends right after the token that completes one in its generated text,
whatever the drafter and however many tokens a round emitted; bad values are refused."""

import re

import pytest

import dspark
from dspark.stop_strings import StopStrings

from helpers import ragged_prompts, tiny_hf_model


def first_completion(tokenizer, ids: list[int], stops: list[str], min_new_tokens: int = 0) -> int:
    """Tokens up to and including the first (from the ``min_new_tokens``-th on) after which the
    decoded text has an occurrence of a stop string ending where none ended before: brute force,
    every prefix decoded whole, overlapping occurrences found by a look-ahead search."""
    def ends(text):
        return {(stop, m.start() + len(stop)) for stop in stops for m in re.finditer(f"(?={re.escape(stop)})", text)}

    seen = set()
    for k in range(1, len(ids) + 1):
        now = ends(tokenizer.decode(ids[:k], skip_special_tokens=True))
        if k >= min_new_tokens and now - seen:
            return k
        seen = now
    return len(ids)


@pytest.mark.parametrize("config, temperature", [(config, t) for config in ("ar", "draft_model", "ngram", "eagle3",
                                                                           "dspark") for t in (0.0, 1.0)]
                         + [("dspark_scheduled", 0.0)])
def test_requests_end_after_the_token_that_completes_a_stop_string(config, temperature):
    """The embedded models and tokenizer: stop strings taken from the free outputs (so some
    requests meet them mid-round, some not at all); each output is the free output cut after
    the token whose text first contains one, streamed ids included. Under a load-aware scheduler
    only greedy outputs can be compared: once some requests end, the others verify differently,
    which changes their samples (not their distribution)."""
    pipe = dspark.build_pipeline(config, overrides=["target.device=cpu"])
    prompts = ["def add(a, b):", "The river", "import os\n", "class Stack:"]
    kwargs = dict(max_new_tokens=40, temperature=temperature, seed=4, ignore_eos=True)
    free = pipe.generate(prompts, **kwargs)
    stops = [free.texts[0][10:13], free.texts[2][20:22]]
    assert all(stops)
    streamed = {i: [] for i in range(len(prompts))}
    stopped = pipe.generate(prompts, stop=stops, on_tokens=lambda i, ids: streamed[i].extend(ids), **kwargs)
    cut = [first_completion(pipe.tokenizer, ids, stops) for ids in free.token_ids]
    assert stopped.token_ids == [ids[:k] for ids, k in zip(free.token_ids, cut)]
    assert [streamed[i] for i in range(len(prompts))] == stopped.token_ids
    assert stops[0] in stopped.texts[0] and stops[1] in stopped.texts[2]
    assert cut[0] < len(free.token_ids[0]) and cut[2] < len(free.token_ids[2])


@pytest.mark.parametrize("config", ["ar", "eagle3"])
def test_min_new_tokens_lets_only_later_tokens_complete_a_stop_string(config):
    """A stop string that occurs early and again later: with ``min_new_tokens`` past the first
    occurrence, the request runs on to the first completion from that token on."""
    pipe = dspark.build_pipeline(config, overrides=["target.device=cpu"])
    kwargs = dict(max_new_tokens=48, ignore_eos=True)
    free = pipe.generate(["def add(a, b):"], **kwargs).token_ids[0]
    text = pipe.tokenizer.decode(free, skip_special_tokens=True)
    stop = next(c for c in ("(", ":", ",", " ", "e") if text.count(c) >= 2)
    first = first_completion(pipe.tokenizer, free, [stop])
    later = first_completion(pipe.tokenizer, free, [stop], min_new_tokens=first + 1)
    assert first < later
    cut = pipe.generate(["def add(a, b):"], stop=[stop], min_new_tokens=first + 1, **kwargs).token_ids[0]
    assert cut == free[:later]


@pytest.mark.parametrize("config", ["ar", "eagle3"])
def test_stop_strings_per_request(config):
    """Each request its own stop strings (or none): each output is its free output cut after its
    own first completion, with the requests' own ``min_new_tokens``."""
    pipe = dspark.build_pipeline(config, overrides=["target.device=cpu"])
    prompts = ["def add(a, b):", "The river", "import os\n"]
    kwargs = dict(max_new_tokens=40, ignore_eos=True)
    free = pipe.generate(prompts, **kwargs)
    stops = [[free.texts[0][10:13]], None, [free.texts[2][20:22], free.texts[0][10:13]]]
    holds = [0, 0, 4]
    stopped = pipe.generate(prompts, stop=stops, min_new_tokens=holds, **kwargs).token_ids
    for ids, strings, hold, got in zip(free.token_ids, stops, holds, stopped):
        assert got == ids[:first_completion(pipe.tokenizer, ids, strings, min_new_tokens=hold)] if strings else ids
    assert len(stopped[0]) < len(free.token_ids[0]) and stopped[1] == free.token_ids[1]


def test_only_generated_text_counts():
    """A stop string that the prompt already contains, or that begins in the prompt, ends nothing."""
    pipe = dspark.build_pipeline("ar", overrides=["target.device=cpu"])
    free = pipe.generate(["def add(a, b):"], max_new_tokens=12, ignore_eos=True)
    assert pipe.generate(["def add(a, b):"], max_new_tokens=12, ignore_eos=True,
                         stop=["def add", "b):" + free.texts[0][:1]]).token_ids == free.token_ids


def test_the_window_is_enough_for_split_characters():
    """One token at a time through the byte-level tokenizer: multi-byte characters split across
    tokens still match, at the token that completes them."""
    from dspark.assets import resolve_model
    from dspark.tokenization import load_tokenizer

    tokenizer = load_tokenizer(resolve_model("dspark-tiny"))
    ids = tokenizer("naïve café ✓ 日本語 done")["input_ids"]
    for stop in ("✓", "日本", "é ✓", "done"):
        check = StopStrings(tokenizer, [stop])
        kept = next((k for k, token in enumerate(ids, 1) if check(0, [token])), None)
        assert kept == first_completion(tokenizer, ids, [stop]) and stop in tokenizer.decode(ids[:kept])


def test_a_stop_string_across_a_run_of_skipped_special_tokens():
    """Special tokens add no text (they are skipped, as in the output's text), so a run of them
    longer than the check's window of tokens sat between a stop string's halves and hid it: the
    window now reaches back until it holds enough text."""
    from dspark.assets import resolve_model
    from dspark.tokenization import load_tokenizer

    tokenizer = load_tokenizer(resolve_model("dspark-tiny"))
    special = tokenizer.all_special_ids[0]
    head = tokenizer.encode("x = add(a, b", add_special_tokens=False)
    tail = tokenizer.encode(")", add_special_tokens=False)
    for run in (1, 40, 200):
        ids = head + [special] * run + tail + head
        for stop in ("b)", "(a, b)"):
            check = StopStrings(tokenizer, [stop])
            kept = next((k for k, token in enumerate(ids, 1) if check(0, [token])), None)
            assert kept == first_completion(tokenizer, ids, [stop]) == len(head) + run + len(tail), (run, stop)


def test_bad_stop_strings_are_refused_before_work():
    pipe = dspark.build_pipeline("ar", overrides=["target.device=cpu"])
    for bad, error, message in (("\n", TypeError, "list of strings"), ([""], ValueError, "non-empty"),
                                ([3], ValueError, "non-empty strings")):
        with pytest.raises(error, match=message):
            pipe.generate(["x"], max_new_tokens=2, stop=bad)
    bare = dspark.build_pipeline({"target": {"device": "cpu"}, "drafter": "none"},
                                 target_model=tiny_hf_model("qwen3"))
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        bare.generate(ragged_prompts(101, lengths=(3,)), max_new_tokens=2, stop=["a"])


def test_a_stop_string_may_start_with_the_first_words_space():
    """The first generated token's text keeps its word-start space (SentencePiece tokenizers drop
    it when the token is decoded alone): ``" Paris"`` ends the request at its first token; a stop
    string that begins in the prompt still does not count."""
    from test_streaming import sentencepiece_pipeline

    pipe, tokenizer = sentencepiece_pipeline()
    prompt, paris = "The capital of France is", tokenizer.convert_tokens_to_ids("▁Paris")
    stopped = pipe.generate([prompt], max_new_tokens=3, logit_bias={paris: 100.0}, stop=[" Paris"])
    assert stopped.token_ids == [[paris]] and stopped.texts == [" Paris"]
    spanning = pipe.generate([prompt], max_new_tokens=3, logit_bias={paris: 100.0}, stop=["France is Paris"])
    assert spanning.token_ids == [[paris] * 3]


def test_non_latin_stop_strings_under_a_byte_fallback_tokenizer():
    """A SentencePiece byte-fallback tokenizer (:func:`helpers.byte_fallback_tokenizer`) writes
    non-Latin characters as runs of byte tokens that decode a run at a time: the check's window
    never starts inside a character (which would garble its whole run), so stop strings of any
    script end the request right after the token that completes them, the first time they occur
    in the text the output adds to its prompt; fed in rounds of random sizes."""
    import random

    from helpers import byte_fallback_tokenizer

    tokenizer = byte_fallback_tokenizer()
    prompt = tokenizer.encode("Hello 日本語", add_special_tokens=False)
    ids = tokenizer.encode("のテキストです。日本語" * 4 + " and Paris, Ünïcödé — ✓ 😀 end", add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(ids[0]) == "▁"
    ids = ids[1:]  # (no space: the prompt's run of byte tokens goes on into the output)
    head = tokenizer.decode(prompt)

    def brute_force(stop: str) -> int:
        return next(k for k in range(1, len(ids) + 1) if stop in tokenizer.decode(prompt + ids[:k])[len(head):])

    rng = random.Random(0)
    for stop in ["テキ", "のテキ", "す。日本", "。日", "テキストです。日本語の", "😀", "✓ 😀", "Ünï", "Paris, Ü"]:
        check, at, kept = StopStrings(tokenizer, [stop], 0, prompt), 0, None
        while kept is None and at < len(ids):
            step = rng.randint(1, 5)
            kept = check(0, ids[at:at + step])
            at += step if kept is None else kept
        assert at == brute_force(stop), stop
