"""The OpenAI API's bodies: defaults, every refused field named, stop strings cut from text
(streamed or not) exactly where the whole text would be cut."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dspark.serving.protocol import ChoiceText, ProtocolError, cut_at_stop, logprobs_body, parse_request


def parse(body, chat=False, max_logprobs=5):
    return parse_request(body, chat=chat, model="tiny", default_max_tokens=16, max_logprobs=max_logprobs)


def test_defaults_are_the_apis():
    job = parse({"prompt": "def f():"})
    assert (job.prompts, job.n, job.max_tokens, job.seed, job.stream, job.logprobs) == (["def f():"], 1, 16, None,
                                                                                       False, None)
    assert job.settings["temperature"] == 1.0 and job.settings["top_p"] == 1.0 and job.settings["stop"] is None
    assert job.choices == 1 and not job.include_stop and not job.chat


def test_prompts_choices_and_vllm_fields():
    job = parse({"prompt": [[1, 2], [3]], "n": 3, "top_k": -1, "min_tokens": 2, "max_tokens": 4, "stop": "\n",
                 "logit_bias": {"7": -100}, "stop_token_ids": [5], "ignore_eos": True, "repetition_penalty": 1.1,
                 "model": "tiny", "user": "u1", "stream": True, "stream_options": {"include_usage": True}})
    assert job.prompts == [[1, 2], [3]] and job.choices == 6 and job.stops == ["\n"] and job.include_usage
    assert job.settings["top_k"] == 0 and job.settings["min_new_tokens"] == 2 and job.settings["logit_bias"] == {7: -100.0}
    assert job.settings["stop_token_ids"] == [5] and job.settings["ignore_eos"] and job.settings["stop"] == ["\n"]
    assert parse({"prompt": [4, 5, 6]}).prompts == [[4, 5, 6]]
    assert parse({"prompt": ["a", "b"]}).prompts == ["a", "b"]


def test_chat_messages_and_logprobs():
    job = parse({"messages": [{"role": "system", "content": "be brief"},
                              {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}],
                 "logprobs": True, "top_logprobs": 3, "max_completion_tokens": 5}, chat=True)
    assert job.prompts == [[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi \nthere"}]]  # (vLLM's "\n")
    assert job.logprobs == 3 and job.max_tokens == 5 and job.chat
    assert parse({"messages": [{"role": "user", "content": "x"}], "logprobs": True}, chat=True).logprobs == 0
    assert parse({"prompt": "x", "logprobs": 0}).logprobs == 0


def test_echo():
    """A completion may echo its prompt, and then ask for nothing more (``max_tokens`` 0); a chat
    completion does neither."""
    job = parse({"prompt": "x", "echo": True, "max_tokens": 0, "logprobs": 1})
    assert (job.echo, job.max_tokens, job.logprobs) == (True, 0, 1)
    assert parse({"prompt": "x", "echo": True}).max_tokens == 16 and not parse({"prompt": "x"}).echo
    chat = {"messages": [{"role": "user", "content": "x"}]}
    with pytest.raises(ProtocolError, match=r"max_tokens must be an integer >= 1, got 0$"):
        parse({**chat, "max_tokens": 0}, chat=True)
    with pytest.raises(ProtocolError, match=r"unsupported fields \['echo'\]"):
        parse({**chat, "echo": True}, chat=True)


@pytest.mark.parametrize("body, param, message", [
    ({"prompt": ""}, "prompt", None),  # (an empty string is a prompt; refused later by the session, not here)
    ({"prompt": []}, "prompt", "prompt must be a string"),
    ({"prompt": [1, "a"]}, "prompt", "prompt must be a string"),
    ({"prompt": [[1], []]}, "prompt", "none empty"),
    ({"prompt": "x", "temperature": 2.5}, "temperature", r"temperature must be a number in \[0, 2\], got 2.5"),
    ({"prompt": "x", "temperature": "hot"}, "temperature", "temperature must be a number"),
    ({"prompt": "x", "top_p": 0}, "top_p", r"top_p must be a number in \(0, 1\]"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", r"max_tokens must be an integer >= 1, got 0 \(0 only with echo"),
    ({"prompt": "x", "n": True}, "n", "n must be an integer >= 1"),
    ({"prompt": "x", "n": 200}, "n", "more than 128"),
    ({"prompt": "x", "top_k": -2}, "top_k", r"top_k must be an integer in \[-1, 2147483647\]"),
    ({"prompt": "x", "top_k": 2**40}, "top_k", r"top_k must be an integer in \[-1, 2147483647\], got 1099511627776"),
    ({"prompt": "x", "no_repeat_ngram_size": 2**31}, "no_repeat_ngram_size", r"in \[0, 2147483647\]"),
    ({"prompt": "x", "logit_bias": {"7": 101}}, "logit_bias", r"numbers in \[-100, 100\]"),
    ({"prompt": "x", "logit_bias": {"7": -1e300}}, "logit_bias", r"numbers in \[-100, 100\]"),
    ({"prompt": "x", "stop": ["a", ""]}, "stop", "stop must be a non-empty string"),
    ({"prompt": "x", "seed": 1.5}, "seed", "seed must be an integer"),
    ({"prompt": "x", "logit_bias": {"a": 1}}, "logit_bias", "logit_bias must map token ids"),
    ({"prompt": "x", "repetition_penalty": 1e-300}, "repetition_penalty",
     r"repetition_penalty must be a number in \[1e-06, 1e\+06\], got 1e-300"),
    ({"prompt": "x", "logit_bias": {"7": "5"}}, "logit_bias", "logit_bias must map token ids to numbers"),
    ({"prompt": "x", "logit_bias": {"7": True}}, "logit_bias", "logit_bias must map token ids to numbers"),
    ({"prompt": "x", "logit_bias": {" 7": 1}}, "logit_bias", "logit_bias must map token ids to numbers"),
    ({"prompt": "x", "logit_bias": [[7, 1]]}, "logit_bias", "logit_bias must map token ids to numbers"),
    ({"prompt": "x", "stop_token_ids": [1, "2"]}, "stop_token_ids", "stop_token_ids must be a list of token ids"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options", "applies with stream=true"),
    ({"prompt": "x", "stream": True, "stream_options": {"x": 1}}, "stream_options", "include_usage"),
    ({"prompt": "x", "min_tokens": 20}, "min_tokens", r"min_tokens \(20\) must not exceed max_tokens \(16\)"),
    ({"prompt": "x", "echo": 1}, "echo", "echo must be true or false"),
    ({"prompt": "x", "echo": True, "max_tokens": False}, "max_tokens", "max_tokens must be an integer >= 1"),
    ({"prompt": "x", "best_of": 3}, "best_of", "best_of must equal n"),
    ({"prompt": "x", "logprobs": 6}, "logprobs", r"at most 5 \(--max-logprobs\)"),
    ({"prompt": "x", "tools": []}, "tools", r"unsupported fields \['tools'\]"),
    ({"prompt": "x", "ignore_eos": 1}, "ignore_eos", "ignore_eos must be true or false"),
    ({"prompt": "x", "response_format": {"type": "yaml"}}, "response_format", "text\" \\| \"json_object"),
    ({"prompt": "x", "response_format": {"type": "json_schema"}}, "response_format", "needs .*schema"),
    ({"prompt": "x", "guided_choice": []}, "guided_choice", "non-empty list"),
    ({"prompt": "x", "guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "one structured output at most"),
    ({"prompt": "x", "structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "one of"),
    ({"prompt": "x", "guided_json": "{"}, "guided_json", "not valid JSON"),
    ({"prompt": "x", "guided_regex": "a", "ignore_eos": True}, "ignore_eos", "cannot be set with a structured output"),
    ({"prompt": "x", "guided_regex": "a", "min_tokens": 2}, "min_tokens", "cannot be set with a structured output"),
])
def test_bad_fields_are_named(body, param, message):
    if message is None:
        assert parse(body).prompts == [""]
        return
    with pytest.raises(ProtocolError, match=message) as caught:
        parse(body)
    assert caught.value.param == param and caught.value.status == 400
    assert caught.value.body()["error"]["param"] == param


def test_model_logprobs_and_chat_refusals():
    with pytest.raises(ProtocolError, match="the model 'gpt-4' does not exist: this server serves 'tiny'") as caught:
        parse({"prompt": "x", "model": "gpt-4"})
    assert caught.value.status == 404
    with pytest.raises(ProtocolError, match="started with --max-logprobs 0"):
        parse({"prompt": "x", "logprobs": 1}, max_logprobs=0)
    with pytest.raises(ProtocolError, match="top_logprobs needs logprobs=true"):
        parse({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, chat=True)
    with pytest.raises(ProtocolError, match="only text parts"):
        parse({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, chat=True)
    with pytest.raises(ProtocolError, match="unsupported fields"):
        parse({"messages": [{"role": "user", "content": "x"}], "prompt": "x"}, chat=True)
    with pytest.raises(ProtocolError, match="must be a JSON object"):
        parse(["x"])


def test_cut_at_stop():
    assert cut_at_stop("abc\n\ndef", ["\n\n", "c"], False) == ("ab", True)
    assert cut_at_stop("abc\n\ndef", ["\n\n"], True) == ("abc\n\n", True)
    assert cut_at_stop("abc", ["x"], False) == ("abc", False)
    # with min_tokens: only an occurrence that ends past the text of the tokens that could not
    # complete one (here "ab|c ab|c": the first "b|c" ends inside it, the one straddling "after" counts)
    assert cut_at_stop("abcabc", ["bc"], False, after=3) == ("abca", True)
    assert cut_at_stop("abcabc", ["ca"], False, after=3) == ("ab", True)  # (ends at 4 > 3)
    assert cut_at_stop("abcabc", ["bc"], False, after=6) == ("abcabc", False)
    stream = ChoiceText(["bc"], False)
    assert stream.feed("abca") + stream.finish("bc", after=3) == "abca"


@given(st.text("ab\n", max_size=30), st.lists(st.text("ab\n", min_size=1, max_size=4), min_size=1, max_size=3),
       st.lists(st.integers(0, 40), max_size=6), st.booleans())
def test_streamed_text_is_the_cut_text(text, stops, splits, include_stop):
    """Pieces fed as they come, then the last with finish(): what is sent adds up to the whole
    text cut at its first stop string — whatever the split, so long as no stop string is
    complete before the last piece (the engine ends a request on the token that completes one)."""
    found = [text.find(stop) + len(stop) for stop in stops if stop in text]
    end = min(found) if found else len(text) + 1  # the last piece must reach here
    cuts = sorted({s for s in splits if s < min(end, len(text) + 1)})
    pieces = [text[a:b] for a, b in zip([0, *cuts], cuts)] + [text[cuts[-1] if cuts else 0:]]
    stream = ChoiceText(stops, include_stop)
    sent = "".join(stream.feed(p) for p in pieces[:-1]) + stream.finish(pieces[-1])
    assert sent == cut_at_stop(text, stops, include_stop)[0]


def test_logprobs_bodies():
    chat = logprobs_body(True, ["a", "é"], [-0.5, -1.0], [[("a", -0.5), ("b", -2.0)], [("é", -1.0), ("c", -3.0)]])
    assert chat["content"][1] == {"token": "é", "logprob": -1.0, "bytes": [195, 169],
                                  "top_logprobs": [{"token": "é", "logprob": -1.0, "bytes": [195, 169]},
                                                   {"token": "c", "logprob": -3.0, "bytes": [99]}]}
    text = logprobs_body(False, ["ab", "c"], [-0.5, -1.0], [[("ab", -0.5)], [("c", -1.0)]])
    assert text == {"tokens": ["ab", "c"], "token_logprobs": [-0.5, -1.0], "top_logprobs": [{"ab": -0.5}, {"c": -1.0}],
                    "text_offset": [0, 2]}


def test_structured_outputs_are_read_from_the_openai_and_vllm_fields():
    from dspark.structured import Grammar

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    read = lambda extra, chat=False: parse(  # noqa: E731
        {("messages" if chat else "prompt"): [{"role": "user", "content": "x"}] if chat else "x", **extra},
        chat=chat).settings["grammar"]
    assert read({}) is None and read({"response_format": {"type": "text"}}) is None
    assert read({"response_format": {"type": "json_object"}}, chat=True) == Grammar.json()
    assert read({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}},
                chat=True) == Grammar.json_schema(schema)
    assert read({"guided_json": schema}) == Grammar.json_schema(schema)
    assert read({"guided_regex": "[ab]+"}) == Grammar.regex("[ab]+")
    assert read({"guided_choice": ["yes", "no"]}) == Grammar.choice(["yes", "no"])
    assert read({"guided_grammar": 'root ::= "a"'}) == Grammar.ebnf('root ::= "a"')
    assert read({"structured_outputs": {"json": schema, "disable_any_whitespace": True}}) == Grammar.json_schema(
        schema, any_whitespace=False)
    assert read({"structured_outputs": {"choice": ["yes", "no"]}}) == Grammar.choice(["yes", "no"])
    assert read({"structured_outputs": {"json_object": True}}) == Grammar.json()
