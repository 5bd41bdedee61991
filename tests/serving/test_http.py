"""The OpenAI-compatible server, over real HTTP on localhost: each choice is what ``generate``
gives alone with the same settings and seed (EAGLE-3 drafting, float64), streamed or not, from
concurrent clients; stop strings are cut; a client that goes away has its requests aborted; bad
requests get the API's error body before anything is queued."""

import http.client
import json
import socket
import threading
import time

import pytest

import dspark
from dspark.serving import OpenAIServer

OVERRIDES = ["target.device=cpu", "target.dtype=float64", "engine.max_batch_size=2"]
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant> {% endif %}")
PROMPTS = ["def add(a, b):", "import os\n", "class Stack:", "for i in range("]


@pytest.fixture(scope="module")
def reference():
    """A second pipeline, same config: what each choice decodes alone."""
    return dspark.build_pipeline("eagle3", overrides=OVERRIDES)


@pytest.fixture(scope="module")
def server():
    pipe = dspark.build_pipeline("eagle3", overrides=OVERRIDES)
    with OpenAIServer(pipe, max_len=96, port=0, model_name="tiny", max_logprobs=2, chat_template=TEMPLATE) as server:
        yield server


def request(server, method: str, path: str, body=None, raw: bytes | None = None):
    """``(status, parsed JSON body)``; a stream's body is its list of events (``[DONE]`` last)."""
    host, port = server.httpd.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=120)
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    connection.request(method, path, body=data, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    text = response.read().decode()
    connection.close()
    if response.getheader("Content-Type") == "text/event-stream":
        events = [line[len("data: "):] for line in text.split("\n\n") if line]
        return response.status, [json.loads(e) if e != "[DONE]" else e for e in events]
    return response.status, json.loads(text)


def alone(reference, prompt, **settings) -> str:
    return reference.generate([prompt], **settings).texts[0]


def test_completions_are_generate_alone(server, reference):
    """Two prompts × n = 2, sampled with a seed: choice k is prompt k // 2 decoded alone with
    seed + k; greedy likewise; usage counts each prompt once."""
    status, body = request(server, "POST", "/v1/completions", {
        "prompt": PROMPTS[:2], "n": 2, "max_tokens": 12, "temperature": 0.8, "top_p": 0.95, "seed": 5,
        "ignore_eos": True, "model": "tiny"})
    assert status == 200 and body["object"] == "text_completion" and body["model"] == "tiny"
    expected = [alone(reference, PROMPTS[k // 2], max_new_tokens=12, temperature=0.8, top_p=0.95, seed=5 + k,
                      ignore_eos=True) for k in range(4)]
    assert [c["text"] for c in body["choices"]] == expected
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert all(c["finish_reason"] == "length" for c in body["choices"])
    prompt_tokens = sum(len(reference.encode([p])[0]) for p in PROMPTS[:2])
    assert body["usage"]["prompt_tokens"] == prompt_tokens and body["usage"]["completion_tokens"] == 48
    assert body["usage"]["speculative"]["target_forwards"] < 48  # drafts were accepted
    status, body = request(server, "POST", "/v1/completions", {"prompt": PROMPTS[2], "max_tokens": 20,
                                                              "temperature": 0})
    assert body["choices"][0]["text"] == alone(reference, PROMPTS[2], max_new_tokens=20)


def test_streams_add_up_to_the_answer(server):
    """The streamed deltas of every choice concatenate to the non-streamed text; each choice ends
    once with its finish reason; the usage comes last, then [DONE]; one id throughout."""
    body = {"prompt": PROMPTS[1:3], "n": 2, "max_tokens": 16, "temperature": 1.0, "seed": 11, "ignore_eos": True}
    _, whole = request(server, "POST", "/v1/completions", body)
    status, events = request(server, "POST", "/v1/completions",
                             {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert status == 200 and events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == whole["usage"]["completion_tokens"]
    assert all(e["usage"] is None for e in chunks)  # (OpenAI's: every chunk has the field, null but the last)
    assert len({e["id"] for e in events[:-1]}) == 1
    for choice in whole["choices"]:
        mine = [c for e in chunks for c in e["choices"] if c["index"] == choice["index"]]
        assert "".join(c["text"] for c in mine) == choice["text"]
        assert [c["finish_reason"] for c in mine].count("length") == 1 and mine[-1]["finish_reason"] == "length"
    assert len(chunks) > 4  # it streamed


def test_stop_strings_are_cut(server, reference):
    free = alone(reference, PROMPTS[0], max_new_tokens=24, ignore_eos=True)
    stop = free[6:9]
    body = {"prompt": PROMPTS[0], "max_tokens": 24, "temperature": 0, "ignore_eos": True, "stop": stop}
    _, cut = request(server, "POST", "/v1/completions", body)
    assert cut["choices"][0]["text"] == free[:free.find(stop)] and cut["choices"][0]["finish_reason"] == "stop"
    _, kept = request(server, "POST", "/v1/completions", {**body, "include_stop_str_in_output": True})
    assert kept["choices"][0]["text"] == free[:free.find(stop) + len(stop)]
    _, events = request(server, "POST", "/v1/completions", {**body, "stream": True})
    assert "".join(c["text"] for e in events[:-1] for c in e["choices"]) == cut["choices"][0]["text"]


def test_min_tokens_cuts_at_the_stop_string_that_ended_the_choice(server, reference):
    """A stop string completed before ``min_tokens`` does not end the request, so it is not where
    the text is cut either: the answer and the stream both run to the occurrence that did."""
    free = reference.generate([PROMPTS[0]], max_new_tokens=30, ignore_eos=True)
    text, ids = free.texts[0], free.token_ids[0]
    upto = [len(reference.tokenizer.decode(ids[:k])) for k in range(len(ids) + 1)]  # text of the first k tokens

    def cut(stop):  # min_tokens just past the token completing its first occurrence; the text to expect
        first = text.find(stop)
        min_tokens = next(k for k in range(2, len(ids)) if upto[k - 1] >= first + len(stop))  # (that token + 1)
        later = text.find(stop, upto[min_tokens - 1] - len(stop) + 1)
        return first, min_tokens, (text[:later] if later >= 0 else None)

    stop, (first, min_tokens, expected) = next((text[i:i + 2], cut(text[i:i + 2])) for i in range(upto[1], len(text) - 2)
                                               if cut(text[i:i + 2])[2] is not None)
    body = {"prompt": PROMPTS[0], "max_tokens": 30, "temperature": 0, "ignore_eos": True, "stop": stop,
            "min_tokens": min_tokens}
    _, whole = request(server, "POST", "/v1/completions", body)
    assert whole["choices"][0]["text"] == expected and len(expected) > first
    _, events = request(server, "POST", "/v1/completions", {**body, "stream": True})
    assert "".join(c["text"] for e in events[:-1] for c in e["choices"]) == expected


def test_streamed_text_offsets_are_the_answers_whatever_waits_for_a_stop_string(server):
    body = {"prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0, "logprobs": 1, "stop": ["zzzzzzzzzz"]}
    _, whole = request(server, "POST", "/v1/completions", body)
    _, events = request(server, "POST", "/v1/completions", {**body, "stream": True})
    chunks = [c["logprobs"] for e in events[:-1] for c in e["choices"] if c["logprobs"] is not None]
    assert len(chunks) > 1 and sum((c["text_offset"] for c in chunks), []) == whole["choices"][0]["logprobs"]["text_offset"]


def test_concurrent_clients_each_get_their_own(server, reference):
    """Four clients at once into two slots (requests wait for slots and join mid-flight)."""
    results = {}

    def client(i):
        results[i] = request(server, "POST", "/v1/completions", {"prompt": PROMPTS[i], "max_tokens": 8 + 4 * i,
                                                                 "temperature": 0.7, "seed": 100 + i, "ignore_eos": True,
                                                                 "stream": i % 2 == 1})

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        status, body = results[i]
        text = "".join(c["text"] for e in body[:-1] for c in e["choices"]) if i % 2 else body["choices"][0]["text"]
        assert status == 200 and text == alone(reference, PROMPTS[i], max_new_tokens=8 + 4 * i, temperature=0.7,
                                               seed=100 + i, ignore_eos=True), f"client {i}"


def test_chat_completions(server, reference):
    messages = [{"role": "user", "content": "write a function"}]
    rendered = reference.encode(["<user> write a function\n<assistant> "])[0]
    status, body = request(server, "POST", "/v1/chat/completions", {"messages": messages, "max_tokens": 10,
                                                                   "temperature": 0, "ignore_eos": True})
    assert status == 200 and body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant",
                                             "content": reference.generate([rendered], max_new_tokens=10,
                                                                           ignore_eos=True).texts[0]}
    assert body["usage"]["prompt_tokens"] == len(rendered)
    _, events = request(server, "POST", "/v1/chat/completions", {"messages": messages, "max_tokens": 10,
                                                                "temperature": 0, "ignore_eos": True, "stream": True})
    assert events[0]["object"] == "chat.completion.chunk" and events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["delta"].get("content", "") for e in events[:-1] for c in e["choices"]) == \
        body["choices"][0]["message"]["content"]


def test_a_chat_without_max_tokens_may_fill_the_context_a_completion_takes_16(server):
    """OpenAI's and vLLM's defaults: a chat's budget is the rest of the context (it was 16, cutting
    answers short), a completion's 16; a conversation that fills the context is refused."""
    body = {"messages": [{"role": "user", "content": "def add(a, b):"}], "temperature": 0, "ignore_eos": True}
    _, chat = request(server, "POST", "/v1/chat/completions", body)
    _, info = request(server, "POST", "/tokenize", {"prompt": "x"})
    usage = chat["usage"]
    assert usage["completion_tokens"] == info["max_model_len"] - usage["prompt_tokens"] > 16
    assert chat["choices"][0]["finish_reason"] == "length"
    _, completion = request(server, "POST", "/v1/completions", {"prompt": "x", "temperature": 0, "ignore_eos": True})
    assert completion["usage"]["completion_tokens"] == 16
    status, long = request(server, "POST", "/v1/chat/completions",
                           {"messages": [{"role": "user", "content": " ".join(["x"] * 200)}]})
    assert status == 400 and long["error"]["param"] == "messages" and "none is left to generate" in long["error"]["message"]


def test_logprobs(server, reference):
    expected = reference.generate([PROMPTS[3]], max_new_tokens=6, logprobs=True, top_logprobs=2)
    _, body = request(server, "POST", "/v1/completions", {"prompt": PROMPTS[3], "max_tokens": 6, "temperature": 0,
                                                          "logprobs": 2})
    lp = body["choices"][0]["logprobs"]
    assert lp["token_logprobs"] == pytest.approx(expected.logprobs[0], abs=1e-9)
    assert lp["tokens"] == [reference.tokenizer.decode([t], skip_special_tokens=False) for t in expected.token_ids[0]]
    assert [list(d.values()) for d in lp["top_logprobs"]] == [
        pytest.approx([v for _, v in alts], abs=1e-9) for alts in expected.top_logprobs[0]]
    _, events = request(server, "POST", "/v1/completions", {"prompt": PROMPTS[3], "max_tokens": 6, "temperature": 0,
                                                            "logprobs": 2, "stream": True})
    chunks = [c["logprobs"] for e in events[:-1] for c in e["choices"] if c["logprobs"] is not None]
    assert len(chunks) > 1  # each chunk carries its own tokens'
    assert sum((c["token_logprobs"] for c in chunks), []) == lp["token_logprobs"]
    assert sum((c["tokens"] for c in chunks), []) == lp["tokens"]
    assert sum((c["top_logprobs"] for c in chunks), []) == lp["top_logprobs"]
    _, chat = request(server, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                               "max_tokens": 3, "logprobs": True, "top_logprobs": 1})
    content = chat["choices"][0]["logprobs"]["content"]
    assert len(content) == 3 and all(len(entry["top_logprobs"]) == 1 for entry in content)


def test_echo_scores_the_prompt_as_lm_eval_reads_it(server, reference):
    """lm-eval-harness's loglikelihood request (token-id prompts, ``echo``, ``logprobs: 1``,
    ``max_tokens: 1``): each choice's text starts with its prompt, its log-probabilities cover the
    prompt (``None`` first) then the generated token; what lm-eval reads from them — the
    continuation's summed log-probability and whether it is greedy — equals the target's own
    (``generate(prompt_logprobs=True, prompt_top_logprobs=1)``) for a greedy continuation and
    another. Streamed, the chunks add up to the same."""
    context = reference.encode([PROMPTS[0]])[0]
    greedy = reference.generate([context], max_new_tokens=3, ignore_eos=True).token_ids[0]
    prompts = [context + greedy, context + [7, 7, 7]]  # (lm-eval: context + continuation, then slices)
    expected = reference.generate(prompts, max_new_tokens=1, prompt_logprobs=True, prompt_top_logprobs=1)
    payload = {"model": "tiny", "prompt": prompts, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
               "echo": True}
    status, body = request(server, "POST", "/v1/completions", payload)
    assert status == 200 and body["usage"]["completion_tokens"] == 2
    decode = lambda ids: reference.tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    for choice, prompt, scores, top, generated, greedy_wanted in zip(
            body["choices"], prompts, expected.prompt_logprobs, expected.prompt_top_logprobs, expected.token_ids,
            (True, False)):
        lp = choice["logprobs"]
        assert choice["text"] == decode(prompt) + reference.tokenizer.decode(generated, skip_special_tokens=True)
        assert lp["tokens"] == [decode([t]) for t in prompt + generated]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert lp["token_logprobs"][1:len(prompt)] == pytest.approx(scores[1:], abs=1e-9)
        assert lp["text_offset"][len(prompt)] == len(decode(prompt))
        for alternatives, token, logprob, likeliest in zip(lp["top_logprobs"][1:], prompt[1:], scores[1:], top[1:]):
            assert alternatives[decode([token])] == pytest.approx(logprob)  # the chosen one is always listed
            assert max(alternatives.values()) == pytest.approx(likeliest[0][1]) and len(alternatives) <= 2
        ctxlen = len(context)  # lm-eval's parse_logprobs
        continuation = lp["token_logprobs"][ctxlen:-1]
        is_greedy = all(t == max(d.values()) for t, d in zip(continuation, lp["top_logprobs"][ctxlen:-1]))
        assert sum(continuation) == pytest.approx(sum(scores[ctxlen:]), abs=1e-9) and is_greedy == greedy_wanted
        assert is_greedy == all(t == alts[0][0] for t, alts in zip(prompt[ctxlen:], top[ctxlen:]))
    _, events = request(server, "POST", "/v1/completions", {**payload, "stream": True})
    for k, choice in enumerate(body["choices"]):
        chunks = [c for e in events[:-1] for c in e["choices"] if c["index"] == k]
        assert "".join(c["text"] for c in chunks) == choice["text"]
        assert chunks[0]["text"] == decode(prompts[k]) and chunks[-1]["finish_reason"] == choice["finish_reason"]
        parts = [c["logprobs"] for c in chunks if c["logprobs"] is not None]
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            assert sum((p[key] for p in parts), []) == choice["logprobs"][key], key


def test_echo_alone_and_without_scores(server, reference):
    """``max_tokens: 0`` with ``echo``: the prompt alone (scored when asked), no token returned or
    counted; ``echo`` without ``logprobs``: the prompt, then the completion ``generate`` gives;
    streamed likewise."""
    ids = reference.encode([PROMPTS[1]])[0]
    expected = reference.generate([ids], max_new_tokens=1, prompt_logprobs=True)
    for stream in (False, True):
        status, body = request(server, "POST", "/v1/completions", {"prompt": PROMPTS[1], "echo": True, "max_tokens": 0,
                                                                   "logprobs": 0, "stream": stream})
        if stream:
            chunks = [c for e in body[:-1] for c in e["choices"]]
            assert [c["text"] for c in chunks] == [PROMPTS[1], ""] and chunks[-1]["finish_reason"] == "length"
            lp = chunks[0]["logprobs"]
        else:
            choice = body["choices"][0]
            assert choice["text"] == PROMPTS[1] and choice["finish_reason"] == "length"
            assert body["usage"]["prompt_tokens"] == len(ids) and body["usage"]["completion_tokens"] == 0
            lp = choice["logprobs"]
        assert lp["token_logprobs"][0] is None and lp["token_logprobs"][1:] == pytest.approx(expected.prompt_logprobs[0][1:])
        assert len(lp["tokens"]) == len(ids)  # logprobs 0: the top ones are the chosen token alone (OpenAI's k + 1)
        assert lp["top_logprobs"] == [None] + [{t: v} for t, v in zip(lp["tokens"][1:], lp["token_logprobs"][1:])]
    settings = dict(max_tokens=5, temperature=0.8, seed=2)
    text = alone(reference, PROMPTS[2], max_new_tokens=5, temperature=0.8, seed=2)
    _, body = request(server, "POST", "/v1/completions", {"prompt": PROMPTS[2], "echo": True, **settings})
    assert body["choices"][0]["text"] == PROMPTS[2] + text and body["choices"][0]["logprobs"] is None
    _, events = request(server, "POST", "/v1/completions", {"prompt": PROMPTS[2], "echo": True, "stream": True,
                                                            **settings})
    assert "".join(c["text"] for e in events[:-1] for c in e["choices"]) == PROMPTS[2] + text


def test_sampled_tokens_are_listed_among_the_likeliest(server, reference):
    """Completions' ``top_logprobs`` hold the k likeliest and the chosen token (OpenAI's k + 1)."""
    expected = reference.generate([PROMPTS[0]], max_new_tokens=12, temperature=1.0, seed=9, logprobs=True,
                                  top_logprobs=1)
    _, body = request(server, "POST", "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 12, "temperature": 1.0,
                                                          "seed": 9, "logprobs": 1})
    lp = body["choices"][0]["logprobs"]
    decode = lambda t: reference.tokenizer.decode([t], skip_special_tokens=False)  # noqa: E731
    sizes = []
    for token, logprob, alternatives, likeliest in zip(expected.token_ids[0], expected.logprobs[0], lp["top_logprobs"],
                                                       expected.top_logprobs[0]):
        assert alternatives[decode(token)] == pytest.approx(logprob) and decode(likeliest[0][0]) in alternatives
        sizes.append(len(alternatives))
    assert set(sizes) == {1, 2}  # some sampled tokens were the likeliest, some not


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_goes_away_is_aborted(server, reference, stream):
    """Close the connection after the first chunk of a long stream, or while waiting for a whole
    answer: the server aborts the request (its slot frees), and the next request decodes as alone."""
    before = server.loop.aborted
    body = json.dumps({"prompt": PROMPTS[0], "max_tokens": 80, "temperature": 1.0, "seed": 3, "ignore_eos": True,
                       "stream": stream}).encode()
    with socket.create_connection(server.httpd.server_address[:2], timeout=60) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        if stream:
            received = b""
            while b"data: " not in received:
                received += sock.recv(4096)
            assert received.startswith(b"HTTP/1.1 200")
    deadline = time.monotonic() + 60
    while server.loop.aborted == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.loop.aborted == before + 1
    _, body = request(server, "POST", "/v1/completions", {"prompt": PROMPTS[1], "max_tokens": 8, "temperature": 0})
    assert body["choices"][0]["text"] == alone(reference, PROMPTS[1], max_new_tokens=8)


def test_structured_outputs(server, reference):
    """``guided_choice`` and ``response_format`` with a JSON schema: each choice is ``generate``
    alone under the same grammar (sampled, seeded); the choices are among the options and the
    schema's outputs parse; a grammar that does not compile gets a 400 naming the field."""
    options = ["yes", "no", "maybe later"]
    status, body = request(server, "POST", "/v1/completions", {
        "prompt": PROMPTS[0], "n": 2, "max_tokens": 8, "temperature": 1.0, "seed": 3, "guided_choice": options})
    assert status == 200
    expected = [alone(reference, PROMPTS[0], max_new_tokens=8, temperature=1.0, seed=3 + k,
                      grammar=dspark.Grammar.choice(options)) for k in range(2)]
    assert [c["text"] for c in body["choices"]] == expected and set(expected) <= set(options)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    messages = [{"role": "user", "content": "ok?"}]
    status, body = request(server, "POST", "/v1/chat/completions", {
        "messages": messages, "max_tokens": 24, "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}})
    assert status == 200
    text = body["choices"][0]["message"]["content"]
    prompt = reference.tokenizer.apply_chat_template(messages, chat_template=TEMPLATE, add_generation_prompt=True,
                                                     tokenize=False)
    assert text == alone(reference, reference.encode([prompt])[0], max_new_tokens=24,
                         grammar=dspark.Grammar.json_schema(schema))
    assert body["choices"][0]["finish_reason"] == "stop" and isinstance(json.loads(text)["ok"], bool)
    status, body = request(server, "POST", "/v1/completions", {"prompt": "x", "guided_regex": "(a"})
    assert status == 400 and body["error"]["param"] == "guided_regex" and "does not compile" in body["error"]["message"]

def test_errors_and_the_other_routes(server):
    status, body = request(server, "POST", "/v1/completions", {"prompt": "x", "temperature": -1})
    assert status == 400 and body["error"]["param"] == "temperature" and body["error"]["type"] == "invalid_request_error"
    status, body = request(server, "POST", "/v1/completions", raw=b"{not json")
    assert status == 400 and "not JSON" in body["error"]["message"]
    status, body = request(server, "POST", "/v1/completions", {"prompt": "x", "model": "other"})
    assert status == 404 and "'other' does not exist" in body["error"]["message"]
    status, body = request(server, "POST", "/v1/completions", {"prompt": " ".join(map(str, range(200))), "max_tokens": 8})
    assert status == 400 and "more than the batch's 96 per request" in body["error"]["message"]
    status, body = request(server, "POST", "/v1/completions", {"prompt": [[1, 2], [10**6]], "max_tokens": 8})
    assert status == 400 and "vocabulary" in body["error"]["message"]
    status, body = request(server, "POST", "/v1/embeddings", {"input": "x"})
    assert status == 404 and "POST /v1/completions" in body["error"]["message"]
    assert request(server, "GET", "/health") == (200, {"status": "ok"})
    status, body = request(server, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in body["data"]] == ["tiny"]
    # refused requests left nothing behind: the next decodes as the first
    _, again = request(server, "POST", "/v1/completions", {"prompt": PROMPTS[2], "max_tokens": 6, "temperature": 0})
    assert again["choices"][0]["finish_reason"] in ("length", "stop")


def test_session_refusals_name_the_api_field_and_the_prompt(server):
    """What the session refuses (lengths, vocabulary) is said in the API's names, with ``param``
    set and, for a list of prompts, which prompt; a query string does not change the route."""
    long = " ".join(map(str, range(200)))
    status, body = request(server, "POST", "/v1/completions?api-version=1", {"prompt": "x", "max_tokens": 95})
    assert status == 400 and body["error"]["param"] == "prompt"
    assert "max_tokens (95)" in body["error"]["message"] and "max_new_tokens" not in body["error"]["message"]
    status, body = request(server, "POST", "/v1/completions", {"prompt": ["x", long], "max_tokens": 4})
    assert status == 400 and body["error"]["message"].startswith("prompt 1: prompt (")
    status, body = request(server, "POST", "/v1/chat/completions",
                           {"messages": [{"role": "user", "content": long}], "max_tokens": 4})
    assert status == 400 and body["error"]["param"] == "messages"
    assert body["error"]["message"].startswith("the conversation (")
    status, body = request(server, "POST", "/v1/completions", {"prompt": "x", "logit_bias": {"1000000": 3}})
    assert status == 400 and body["error"]["param"] == "logit_bias" and "vocabulary" in body["error"]["message"]
    status, body = request(server, "POST", "/v1/completions", {"prompt": "x", "stop_token_ids": [10**7]})
    assert status == 400 and body["error"]["param"] == "stop_token_ids"
    assert request(server, "GET", "/health?verbose=1") == (200, {"status": "ok"})


def test_options_and_other_methods_get_answers_not_html(server):
    host, port = server.httpd.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=60)
    connection.request("OPTIONS", "/v1/completions")
    response = connection.getresponse()
    assert response.status == 204 and response.getheader("Allow") == "GET, POST, OPTIONS" and response.read() == b""
    connection.request("GET", "/health")  # the connection serves on
    assert connection.getresponse().status == 200
    connection.close()
    for method in ("PUT", "DELETE", "PATCH"):
        status, body = request(server, method, "/v1/completions", {"prompt": "x"})
        assert status == 405 and f"method {method} is not allowed" in body["error"]["message"]


def test_requests_that_once_stopped_the_engine_or_dropped_the_connection(server, monkeypatch):
    """Each of these once took the engine thread down (every later request: 503) or closed the
    connection without an answer; now each gets an error body and the server keeps serving."""
    status, body = request(server, "POST", "/v1/completions", {"prompt": "x", "seed": 2**70, "max_tokens": 3})
    assert status == 400 and "seed must lie in" in body["error"]["message"]
    status, body = request(server, "POST", "/v1/completions", {"prompt": "x", "seed": 2**64 - 1, "n": 2, "max_tokens": 3})
    assert status == 400 and "seed must lie in" in body["error"]["message"]
    status, body = request(server, "POST", "/v1/completions", {"prompt": "x", "temperature": 5e-324, "max_tokens": 3})
    assert status == 400 and "temperature" in body["error"]["message"]
    status, body = request(server, "POST", "/v1/completions",
                           {"prompt": "x", "no_repeat_ngram_size": 97, "max_tokens": 3, "temperature": 0})
    assert status == 200 and body["choices"][0]["finish_reason"] in ("length", "stop")  # (an n no window fits)
    # a template that raises (as Llama 2's and Gemma's do for a system message): 400 naming messages
    monkeypatch.setattr(server, "chat_template", "{{ raise_exception('System role not supported') }}")
    status, body = request(server, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})
    assert status == 400 and body["error"]["param"] == "messages"
    assert "System role not supported" in body["error"]["message"]
    monkeypatch.undo()
    # anything else a handler did not foresee: a 500 with the API's error body, logged
    def broken(*args, **kwargs):
        raise RuntimeError("unforeseen")
    monkeypatch.setattr(server, "job", broken)
    status, body = request(server, "POST", "/v1/completions", {"prompt": "x"})
    assert status == 500 and body["error"]["type"] == "server_error"
    monkeypatch.undo()
    # a body the server will not read (no Content-Length): the answer closes the connection, so
    # the unread bytes are never parsed as a next request
    host, port = server.httpd.server_address[:2]
    with socket.create_connection((host, port), timeout=30) as raw:
        raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"11\r\n{\"prompt\": \"xyz\"}\r\n0\r\n\r\n")
        reply = b""
        while chunk := raw.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 411") and b"Connection: close" in reply and reply.count(b"HTTP/1.1") == 1
    assert request(server, "GET", "/health") == (200, {"status": "ok"})


def test_a_chat_without_a_template_is_refused_naming_messages(reference):
    import queue

    from dspark.serving import ProtocolError

    bare = OpenAIServer(reference, max_len=96, port=0)  # (never started: the refusal comes first)
    try:
        with pytest.raises(ProtocolError, match="no chat template") as caught:
            bare.submit(bare.job({"messages": [{"role": "user", "content": "x"}]}, chat=True), queue.Queue())
        assert caught.value.param == "messages"
    finally:
        bare.close()


def test_servers_are_refused_before_they_start():
    pipe = dspark.build_pipeline("ar", overrides=["target.device=cpu"])
    with pytest.raises(ValueError, match=r"max_logprobs must be an integer in \[0, 20\]"):
        OpenAIServer(pipe, max_len=64, port=0, max_logprobs=21)
    with pytest.raises(ValueError, match="default_max_tokens must be an integer >= 1 or None"):
        OpenAIServer(pipe, max_len=64, port=0, default_max_tokens=0)
    static = dspark.build_pipeline("ar", overrides=["target.device=cpu", "engine.batching=static"])
    with pytest.raises(ValueError, match="a Session needs continuous batching"):
        OpenAIServer(static, max_len=64, port=0)


def test_metrics_add_up_to_the_answers():
    """``/metrics`` after a few requests: finished requests by reason, tokens and the speculative
    counts equal the sums of the answers' usage; accepted drafts per position add up to the
    accepted total and never exceed the rounds that reached the position; one latency per request;
    a prompt sent twice in a row has its prefill skipped the second time (prefix-cache hits)."""
    pipe = dspark.build_pipeline("eagle3", overrides=OVERRIDES)
    with OpenAIServer(pipe, max_len=96, port=0, model_name="tiny") as server:
        bodies = [request(server, "POST", "/v1/completions", {"prompt": PROMPTS[i], "max_tokens": 6 + 3 * i,
                                                              "temperature": 0, "ignore_eos": True})[1]
                  for i in range(3)]
        bodies.append(request(server, "POST", "/v1/completions", {"prompt": PROMPTS[3], "max_tokens": 20,
                                                                  "temperature": 0, "stop": bodies[0]["choices"][0]["text"][-2:]})[1])
        bodies.append(request(server, "POST", "/v1/completions", {"prompt": PROMPTS[3], "max_tokens": 2})[1])
        host, port = server.httpd.server_address[:2]
        connection = http.client.HTTPConnection(host, port, timeout=60)
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        assert response.status == 200 and response.getheader("Content-Type").startswith("text/plain")
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    label = 'model_name="tiny"'
    usage = lambda key: sum(b["usage"][key] for b in bodies)  # noqa: E731
    spec = lambda key: sum(b["usage"]["speculative"][key] for b in bodies)  # noqa: E731
    reasons = [b["choices"][0]["finish_reason"] for b in bodies]
    for reason in ("stop", "length", "abort"):
        assert samples[f'dspark:request_success_total{{{label},finished_reason="{reason}"}}'] == reasons.count(reason)
    assert samples[f"dspark:generation_tokens_total{{{label}}}"] == usage("completion_tokens")
    assert samples[f"dspark:prompt_tokens_total{{{label}}}"] == usage("prompt_tokens")
    assert samples[f"dspark:target_forwards_total{{{label}}}"] == spec("target_forwards")
    assert samples[f"dspark:spec_decode_num_accepted_tokens_total{{{label}}}"] == spec("accepted_tokens") > 0
    assert samples[f"dspark:spec_decode_num_draft_tokens_total{{{label}}}"] == spec("drafted_tokens")
    accepted = [samples[f'dspark:spec_decode_num_accepted_tokens_per_pos{{{label},position="{k}"}}'] for k in range(7)]
    reached = [samples[f'dspark:spec_decode_num_reached_per_pos{{{label},position="{k}"}}'] for k in range(7)]
    assert sum(accepted) == spec("accepted_tokens") and all(a <= r for a, r in zip(accepted, reached))
    assert samples[f"dspark:num_requests_running{{{label}}}"] == samples[f"dspark:num_requests_waiting{{{label}}}"] == 0
    assert samples[f'dspark:e2e_request_latency_seconds_bucket{{{label},le="+Inf"}}'] == 5
    assert samples[f"dspark:time_to_first_token_seconds_count{{{label}}}"] == 5
    assert samples[f"dspark:prefix_cache_queries_total{{{label}}}"] == usage("prompt_tokens")
    # the last prompt is the one before: its slot held all of it but the last token (fed again)
    assert samples[f"dspark:prefix_cache_hits_total{{{label}}}"] == bodies[-1]["usage"]["prompt_tokens"] - 1


def test_tokenize_and_detokenize(server, reference):
    """vLLM's ``/tokenize`` (a prompt, or a conversation rendered as chat would render it) and
    ``/detokenize``; bad bodies named."""
    status, body = request(server, "POST", "/tokenize", {"prompt": PROMPTS[0], "model": "tiny"})
    tokens = reference.encode([PROMPTS[0]])[0]
    assert status == 200 and body == {"count": len(tokens), "max_model_len": 96 - 8, "tokens": tokens}
    _, chat = request(server, "POST", "/tokenize", {"messages": [{"role": "user", "content": "write a function"}]})
    assert chat["tokens"] == reference.encode(["<user> write a function\n<assistant> "])[0]
    status, body = request(server, "POST", "/detokenize", {"tokens": tokens})
    assert status == 200 and body == {"prompt": reference.tokenizer.decode(tokens, skip_special_tokens=False)}
    _, plain = request(server, "POST", "/tokenize", {"prompt": PROMPTS[0], "add_special_tokens": False})
    assert plain["tokens"] == reference.tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"]
    status, info = request(server, "GET", "/tokenizer_info")  # (lm-eval-harness's remote tokenizer reads these)
    assert status == 200 and info["eos_token"] == reference.tokenizer.eos_token and info["chat_template"] == TEMPLATE
    assert info["model_max_length"] == 96 - 8
    for path, bad, message in (("/tokenize", {"prompt": "x", "messages": []}, "either"),
                               ("/tokenize", {"messages": [{"role": "user", "content": "x"}], "add_special_tokens": True},
                                "applies to a prompt"),
                               ("/tokenize", {"prompt": "x", "add_special_tokens": "no"}, "must be true or false"),
                               ("/tokenize", {"prompt": ""}, "non-empty string"),
                               ("/detokenize", {"tokens": [1, 10**6]}, "outside the vocabulary"),
                               ("/detokenize", {"text": "x"}, "unsupported fields")):
        status, body = request(server, "POST", path, bad)
        assert status == 400 and message in body["error"]["message"], (path, bad)


def test_a_first_word_keeps_its_space_over_http():
    """Under a SentencePiece-style tokenizer (which drops the word-start space of the first token it
    decodes) a completion reads on from its prompt, as vLLM's: the text, the echoed text, a stop
    string starting with the space, the log-probability tokens and their offsets, streamed or not."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent.parent))
    from test_streaming import sentencepiece_pipeline

    pipe, tokenizer = sentencepiece_pipeline()
    paris = tokenizer.convert_tokens_to_ids("▁Paris")
    base = {"prompt": "The capital of France is", "max_tokens": 3, "logit_bias": {str(paris): 100}}
    with OpenAIServer(pipe, max_len=32, port=0) as server:
        _, body = request(server, "POST", "/v1/completions", {**base, "logprobs": 0})
        choice = choice_of(body)
        assert choice["text"] == " Paris Paris Paris"
        assert choice["logprobs"]["tokens"] == [" Paris"] * 3 and choice["logprobs"]["text_offset"] == [0, 6, 12]
        _, body = request(server, "POST", "/v1/completions", {**base, "echo": True})
        assert choice_of(body)["text"] == "The capital of France is Paris Paris Paris"
        _, body = request(server, "POST", "/v1/completions", {**base, "stop": [" Paris"], "include_stop_str_in_output": True})
        assert choice_of(body)["text"] == " Paris" and body["usage"]["completion_tokens"] == 1
        _, events = request(server, "POST", "/v1/completions", {**base, "stream": True, "logprobs": 0})
        chunks = [e["choices"][0] for e in events[:-1] if e["choices"]]
        assert "".join(c["text"] for c in chunks) == " Paris Paris Paris"
        assert [t for c in chunks if c["logprobs"] for t in c["logprobs"]["tokens"]] == [" Paris"] * 3


def choice_of(body: dict) -> dict:
    return body["choices"][0]


def test_tokens_inside_a_character_give_their_bytes_and_join_into_the_text(server):
    """Byte-level tokens that split a character: chat's ``bytes`` are each token's own bytes (joined,
    the character's UTF-8), and the token names join into the text — a token that leaves the
    character incomplete names nothing yet — so completions' offsets point into the text."""
    from dspark.serving.protocol import parse_request

    tokenizer = server.pipeline.tokenizer
    ids = tokenizer("日本語", add_special_tokens=False)["input_ids"]
    assert len(ids) == 9  # (a byte each)
    body = {"messages": [{"role": "user", "content": "x"}], "logprobs": True}
    chat = server.logprobs(parse_request(body, chat=True, model="tiny", default_max_tokens=None, max_logprobs=20),
                           ids, [-0.1] * len(ids), None)["content"]
    assert bytes(b for entry in chat for b in entry["bytes"]).decode() == "日本語"
    assert "".join(entry["token"] for entry in chat) == "日本語"
    text = server.logprobs(parse_request({"prompt": "x", "logprobs": 0}, chat=False, model="tiny", default_max_tokens=None,
                                         max_logprobs=20), ids, [-0.1] * len(ids), None)
    assert "".join(text["tokens"]) == "日本語" and text["text_offset"] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
