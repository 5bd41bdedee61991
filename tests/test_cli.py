"""The dspark console script."""

import json
import re
import sys

import pytest

from dspark.cli import main


def test_generate_prints_text_and_summary(capsys, tmp_path):
    stats = tmp_path / "stats.json"
    code = main(["generate", "--config", "ar", "--prompt", "Hello", "--max-new-tokens", "5", "--stats-json", str(stats),
                 "target.device=cpu", "engine.max_batch_size=2"])
    out = capsys.readouterr()
    assert code == 0
    assert "[dspark]" in out.err and "tau=1.00" in out.err
    assert json.loads(stats.read_text())["generated_tokens"] <= 5


def test_generate_token_ids(capsys):
    assert main(["generate", "--config", "ar", "--prompt-ids", "1 2 3", "--prompt-ids", "4,5", "--print-ids", "--max-new-tokens", "3",
                 "--temperature", "1.0", "target.device=cpu"]) == 0
    out = capsys.readouterr().out
    assert "--- request 1" in out


def test_bad_override_is_a_clear_error(capsys):
    assert main(["generate", "--prompt", "x", "drafter.num_speculatve_tokens=3"]) == 2
    assert "unknown key drafter.num_speculatve_tokens" in capsys.readouterr().err
    assert main(["generate", "--config", "ar", "--prompt", "x", "--max-new-tokens", "0", "target.device=cpu"]) == 2
    assert "max_new_tokens must be an integer >= 1" in capsys.readouterr().err
    assert main(["generate", "--config", "ar", "--prompt", "x", "drafter._target_=nope.mod.Cls"]) == 2
    assert "cannot import module 'nope.mod'" in capsys.readouterr().err


def test_a_component_switched_by_name_is_an_override_not_a_prompt(capsys):
    assert main(["generate", "--config", "ar", "--prompt-ids", "1 2 3", "--print-ids", "--max-new-tokens", "3",
                 "drafter=ngram", "drafter.num_speculative_tokens=2", "target.device=cpu"]) == 0
    out = capsys.readouterr()
    assert "--- request" not in out.out and len(out.out.split()) == 3  # one prompt: drafter=ngram is not a second
    assert "acceptance by position [-, -]" in out.err  # drafting two tokens (the ar config drafts none)


def test_generate_with_no_flags_uses_the_embedded_models(capsys):
    """`dspark generate "def fibonacci(n):"` — the README's first command — runs offline as is."""
    assert main(["generate", "def fibonacci(n):", "--max-new-tokens", "16", "target.device=cpu"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() and "tau=" in out.err and "acceptance by position" in out.err  # speculative by default


def test_unknown_flag_is_rejected(capsys):
    try:
        main(["generate", "--max-new-tokns", "3", "x"])
    except SystemExit as exit_:
        assert exit_.code == 2
    assert "unrecognized arguments: --max-new-tokns" in capsys.readouterr().err


def test_data_regenerate_checks_its_config_before_any_work(capsys):
    assert main(["data", "regenerate", "samples_per_temperature=100", "batch_size=64"]) == 2
    assert "must be a multiple of batch_size (64)" in capsys.readouterr().err
    assert main(["data", "regenerate", "temperatur=1"]) == 2
    assert "temperatur" in capsys.readouterr().err


def test_stream_prints_what_generate_prints(capsys):
    """`--stream` writes the text as rounds finish; the whole equals the batch output, text and ids."""
    for extra in ([], ["--print-ids"]):
        args = ["generate", "def fibonacci(n):", "--max-new-tokens", "24", "--temperature", "1.0", "--seed", "3",
                "--config", "draft_model", "target.device=cpu", *extra]
        assert main(args) == 0
        plain = capsys.readouterr().out
        assert main([*args, "--stream"]) == 0
        assert capsys.readouterr().out == plain
    with pytest.raises(SystemExit, match="--stream prints one request as it is generated; got 2 prompts"):
        main(["generate", "a", "b", "--stream", "target.device=cpu"])


def test_stop_token_id_ends_the_request(capsys):
    args = ["generate", "--config", "ar", "--prompt-ids", "5 6 7", "--print-ids", "--max-new-tokens", "8",
            "--ignore-eos", "target.device=cpu"]
    assert main(args) == 0
    free = [int(t) for t in capsys.readouterr().out.split()]
    assert main([*args, "--stop-token-id", str(free[2])]) == 0
    assert [int(t) for t in capsys.readouterr().out.split()] == free[:free.index(free[2]) + 1]
    assert main([*args, "--stop-token-id", str(free[2]), "--min-new-tokens", "5"]) == 0
    held = [int(t) for t in capsys.readouterr().out.split()]
    assert free[2] not in held[:5] and (len(held) == 8 or held[-1] == free[2])


def test_penalties_are_the_apis(capsys):
    """--repetition-penalty / --presence-penalty / --frequency-penalty give generate()'s tokens, with a
    drafter too; a value out of range is named."""
    import dspark

    prompt = "def fibonacci(n):"
    penalties = dict(repetition_penalty=1.3, presence_penalty=0.2, frequency_penalty=0.1, no_repeat_ngram_size=3,
                     logit_bias={5: -3.0, 40: 2.5})
    want = dspark.build_pipeline("configs/ar.yaml", overrides=["target.device=cpu"]).generate(
        [prompt], max_new_tokens=12, ignore_eos=True, **penalties).token_ids[0]
    for config in ("ar", "eagle3"):
        assert main(["generate", "--config", config, "--prompt", prompt, "--print-ids", "--max-new-tokens", "12",
                     "--ignore-eos", "--repetition-penalty", "1.3", "--presence-penalty", "0.2",
                     "--frequency-penalty", "0.1", "--no-repeat-ngram-size", "3", "--logit-bias", '{"5": -3, "40": 2.5}',
                     "target.device=cpu"]) == 0
        assert [int(t) for t in capsys.readouterr().out.split()] == want
    assert main(["generate", "--config", "ar", "--prompt", prompt, "--presence-penalty", "3", "target.device=cpu"]) == 2
    assert "presence_penalty must be a number in [-2, 2]" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--logit-bias must be a JSON object"):
        main(["generate", "--config", "ar", "--prompt", prompt, "--logit-bias", "[1, 2]", "target.device=cpu"])


def test_stop_string_ends_the_request(capsys):
    args = ["generate", "--config", "ar", "def add(a, b):", "--max-new-tokens", "24", "--ignore-eos", "target.device=cpu"]
    assert main(args) == 0
    free = capsys.readouterr().out
    stop = free.strip()[4:7]
    assert main([*args, "--stop", stop]) == 0
    cut = capsys.readouterr().out
    assert stop in cut and len(cut) < len(free) and free.startswith(cut.rstrip("\n"))


def test_logprobs_prints_each_token_with_the_targets_log_probability(capsys):
    import dspark

    args = ["generate", "--config", "ar", "def add(a, b):", "--max-new-tokens", "6", "--temperature", "1.0",
            "--seed", "2", "--ignore-eos", "target.device=cpu"]
    assert main([*args, "--logprobs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = dspark.build_pipeline("ar", overrides=["target.device=cpu"]).generate(
        ["def add(a, b):"], max_new_tokens=6, temperature=1.0, seed=2, ignore_eos=True, logprobs=True)
    table = [line.split("\t") for line in lines[-6:]]  # after the text (which may span lines)
    assert "\n".join(lines[:-6]) == expected.texts[0]
    assert [int(row[0]) for row in table] == expected.token_ids[0]
    assert [float(row[-1]) for row in table] == [round(x, 4) for x in expected.logprobs[0]]
    assert main([*args, "--logprobs", "--print-ids"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == " ".join(map(str, expected.token_ids[0]))
    assert [len(line.split("\t")) for line in out[1:]] == [2] * 6  # id and log-probability
    top = dspark.build_pipeline("ar", overrides=["target.device=cpu"]).generate(
        ["def add(a, b):"], max_new_tokens=6, temperature=1.0, seed=2, ignore_eos=True, logprobs=True, top_logprobs=3)
    assert main([*args, "--top-logprobs", "3", "--print-ids"]) == 0  # implies --logprobs
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()[1:]]
    assert [[pair.split("=")[0] for pair in row[2].split()] for row in rows] == [
        [str(token) for token, _ in alternatives] for alternatives in top.top_logprobs[0]]


def test_prompt_logprobs_print_the_prompts_scores(capsys):
    import dspark

    args = ["generate", "--config", "ar", "def add(a, b):", "--max-new-tokens", "3", "--print-ids", "target.device=cpu"]
    expected = dspark.build_pipeline("ar", overrides=["target.device=cpu"]).generate(
        ["def add(a, b):"], max_new_tokens=3, prompt_logprobs=True)
    assert main([*args, "--prompt-logprobs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "prompt:" and lines[-2] == "generated:"
    rows = [line.split("\t") for line in lines[1:-2]]
    assert [row[1] for row in rows] == ["-"] + [f"{x:.4f}" for x in expected.prompt_logprobs[0][1:]]
    with pytest.raises(SystemExit, match="--prompt-logprobs scores the prompts as given"):
        main([*args, "--prompt-logprobs", "--chat"])
    ranked = dspark.build_pipeline("ar", overrides=["target.device=cpu"]).generate(
        ["def add(a, b):"], max_new_tokens=3, prompt_logprobs=True, prompt_top_logprobs=2)
    assert main([*args, "--prompt-top-logprobs", "2"]) == 0  # (implies --prompt-logprobs)
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split("\t") for line in lines[1:-2]]
    assert rows[0][2] == "-" and [[pair.split("=")[0] for pair in row[2].split()] for row in rows[1:]] == [
        [str(token) for token, _ in alternatives] for alternatives in ranked.prompt_top_logprobs[0][1:]]
    with pytest.raises(SystemExit, match="--prompt-top-logprobs must be >= 0"):
        main([*args, "--prompt-top-logprobs", "-1"])


def test_prompts_file_and_output_jsonl(capsys, tmp_path):
    """A batch from a JSONL file, written as JSON lines in prompt order (the same outputs as the
    Python API); a bad file is refused naming the line, before any work."""
    import dspark

    prompts = ["def add(a, b):", "The river", "import os"]
    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(prompts[1:])))
    output = tmp_path / "out.jsonl"
    assert main(["generate", "--config", "ar", "--prompt", prompts[0], "--prompts-file", str(source),
                 "--output", str(output), "--max-new-tokens", "5", "--logprobs", "--ignore-eos",
                 "target.device=cpu"]) == 0
    assert capsys.readouterr().out == ""  # the outputs went to the file
    records = [json.loads(line) for line in output.read_text().splitlines()]
    expected = dspark.build_pipeline("ar", overrides=["target.device=cpu"]).generate(
        prompts, max_new_tokens=5, ignore_eos=True, logprobs=True)
    assert [r["prompt"] for r in records] == prompts
    assert [r["token_ids"] for r in records] == expected.token_ids
    assert [r["text"] for r in records] == expected.texts
    assert [len(r["logprobs"]) for r in records] == [5, 5, 5]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"text": "no prompt"}) + "\n")
    with pytest.raises(SystemExit, match="bad.jsonl:2: each line needs a string field 'prompt'"):
        main(["generate", "--prompts-file", str(bad), "target.device=cpu"])
    with pytest.raises(SystemExit, match="--prompts-file .*missing.jsonl is not a file"):
        main(["generate", "--prompts-file", str(tmp_path / "missing.jsonl"), "target.device=cpu"])
    with pytest.raises(SystemExit, match="its directory does not exist"):
        main(["generate", "--prompts-file", str(source), "--output", str(tmp_path / "no" / "out.jsonl"),
              "target.device=cpu"])
    # a line's own budget; the others keep --max-new-tokens
    source.write_text(json.dumps({"prompt": prompts[1], "max_new_tokens": 2}) + "\n" + json.dumps({"prompt": prompts[2]}) + "\n")
    assert main(["generate", "--config", "ar", "--prompt", prompts[0], "--prompts-file", str(source),
                 "--output", str(output), "--max-new-tokens", "5", "--ignore-eos", "target.device=cpu"]) == 0
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["token_ids"] for r in records] == [expected.token_ids[0], expected.token_ids[1][:2], expected.token_ids[2]]
    # a line's own sampling settings and seed (the first prompt keeps the flags'); JSON's string keys
    # of logit_bias read as token ids
    source.write_text(json.dumps({"prompt": prompts[1], "temperature": 0.8, "top_p": 0.9, "seed": 7}) + "\n"
                      + json.dumps({"prompt": prompts[2], "logit_bias": {"32": -100, "10": 5.0},
                                    "repetition_penalty": 1.3}) + "\n")
    assert main(["generate", "--config", "ar", "--prompt", prompts[0], "--prompts-file", str(source),
                 "--output", str(output), "--max-new-tokens", "5", "--ignore-eos", "--seed", "3",
                 "target.device=cpu"]) == 0
    records = [json.loads(line) for line in output.read_text().splitlines()]
    per_request = dspark.build_pipeline("ar", overrides=["target.device=cpu"]).generate(
        prompts, max_new_tokens=5, ignore_eos=True, temperature=[0.0, 0.8, 0.0], top_p=[1.0, 0.9, 1.0],
        seed=[3, 7, 5], logit_bias=[None, None, {32: -100, 10: 5.0}], repetition_penalty=[1.0, 1.0, 1.3])
    assert [r["token_ids"] for r in records] == per_request.token_ids
    assert per_request.token_ids[0] == expected.token_ids[0] and per_request.token_ids[2] != expected.token_ids[2]
    # a line's own stops: a stop id (one, or a list), min_new_tokens, ignore_eos
    stop_id = expected.token_ids[1][2]
    source.write_text(json.dumps({"prompt": prompts[1], "stop_token_ids": stop_id}) + "\n"
                      + json.dumps({"prompt": prompts[2], "stop_token_ids": [expected.token_ids[2][1]],
                                    "min_new_tokens": 3, "ignore_eos": False}) + "\n")
    assert main(["generate", "--config", "ar", "--prompt", prompts[0], "--prompts-file", str(source),
                 "--output", str(output), "--max-new-tokens", "5", "--ignore-eos", "target.device=cpu"]) == 0
    records = [json.loads(line) for line in output.read_text().splitlines()]
    stops = dspark.build_pipeline("ar", overrides=["target.device=cpu"]).generate(
        prompts, max_new_tokens=5, ignore_eos=[True, True, False], stop_token_ids=[None, [stop_id],
                                                                                  [expected.token_ids[2][1]]],
        min_new_tokens=[0, 0, 3])
    assert [r["token_ids"] for r in records] == stops.token_ids
    assert stops.token_ids[1] == expected.token_ids[1][:3]
    source.write_text(json.dumps({"prompt": prompts[1], "logit_bias": [32, -100]}) + "\n")
    with pytest.raises(SystemExit, match="request 0's logit_bias .*must be a JSON object"):
        main(["generate", "--config", "ar", "--prompts-file", str(source), "target.device=cpu"])
    source.write_text(json.dumps({"prompt": prompts[1]}) + "\n" + json.dumps({"prompt": prompts[2], "top_k": -2}) + "\n")
    capsys.readouterr()
    assert main(["generate", "--config", "ar", "--prompts-file", str(source), "target.device=cpu"]) != 0
    assert "request 1: top_k must be an integer in [0, 2147483647]" in capsys.readouterr().err


def test_chat_renders_each_prompt_as_a_user_message(capsys, tmp_path):
    import dspark

    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    args = ["generate", "--config", "ar", "Name a river.", "--max-new-tokens", "6", "--print-ids", "--ignore-eos",
            "target.device=cpu"]
    assert main([*args, "--chat", "--chat-template", str(template)]) == 0
    expected = dspark.build_pipeline("ar", overrides=["target.device=cpu"]).chat(
        [[{"role": "user", "content": "Name a river."}]], chat_template=template.read_text(), max_new_tokens=6,
        ignore_eos=True)
    assert capsys.readouterr().out.split() == [str(t) for t in expected.token_ids[0]]
    with pytest.raises(SystemExit, match="no chat template.*--chat-template FILE"):  # the shipped tokenizer has none
        main([*args, "--chat"])
    with pytest.raises(SystemExit, match="--chat-template applies with --chat"):
        main([*args, "--chat-template", str(template)])
    with pytest.raises(SystemExit, match="--chat takes text prompts"):
        main(["generate", "--prompt-ids", "1 2", "--chat", "target.device=cpu"])
    # template variables: a JSON object, with --chat
    template.write_text(template.read_text() + "{% if greeting is defined %}{{ greeting }}{% endif %}")
    assert main([*args, "--chat", "--chat-template", str(template), "--chat-template-kwargs", '{"greeting": "Hi"}']) == 0
    expected = dspark.build_pipeline("ar", overrides=["target.device=cpu"]).chat(
        [[{"role": "user", "content": "Name a river."}]], chat_template=template.read_text(),
        chat_template_kwargs={"greeting": "Hi"}, max_new_tokens=6, ignore_eos=True)
    assert capsys.readouterr().out.split() == [str(t) for t in expected.token_ids[0]]
    with pytest.raises(SystemExit, match="--chat-template-kwargs must be a JSON object"):
        main([*args, "--chat", "--chat-template", str(template), "--chat-template-kwargs", "[1]"])
    with pytest.raises(SystemExit, match="--chat-template-kwargs is not JSON"):
        main([*args, "--chat", "--chat-template", str(template), "--chat-template-kwargs", "{nope"])
    with pytest.raises(SystemExit, match="--chat-template-kwargs applies with --chat"):
        main([*args, "--chat-template-kwargs", "{}"])


def test_serve_answers_each_request_line_as_it_finishes(capsys, monkeypatch):
    """Request lines on stdin, one refused (named, the others go on): each finished request's line
    carries its output — what ``generate`` gives it alone — and where it came from."""
    import io

    import dspark

    requests = [{"prompt": "def add(a, b):", "id": "a", "max_new_tokens": 12},
                {"prompt": "The river", "temperature": 0.8, "seed": 5, "stop": "e"},
                {"prompt": "import os", "temperature": -1},
                {"prompt": "class Stack:", "max_new_tokens": 3, "logit_bias": {"0": -100}}]
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(json.dumps(r) + "\n" for r in requests) + "\n"))
    assert main(["serve", "--config", "ar", "--max-len", "64", "--max-new-tokens", "8", "target.device=cpu",
                 "engine.max_batch_size=2"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    errors = [r for r in records if "error" in r]
    assert len(errors) == 1 and errors[0]["line"] == 3 and "temperature" in errors[0]["error"]
    done = {r["line"]: r for r in records if "error" not in r}
    assert sorted(done) == [1, 2, 4] and done[1]["id"] == "a" and done[4]["request"] == 2
    pipe = dspark.build_pipeline("ar", overrides=["target.device=cpu"])
    alone = [pipe.generate(["def add(a, b):"], max_new_tokens=12),
             pipe.generate(["The river"], max_new_tokens=8, temperature=0.8, seed=5, stop=["e"]),
             pipe.generate(["class Stack:"], max_new_tokens=3, logit_bias={0: -100})]
    for line, result in zip((1, 2, 4), alone):
        assert done[line]["token_ids"] == result.token_ids[0] and done[line]["text"] == result.texts[0]
        assert done[line]["stats"]["generated"] == len(result.token_ids[0])


def test_serve_streams_each_requests_tokens_and_text(capsys, monkeypatch):
    """``--stream``: before a request's result line, lines with its new tokens and text, which
    add up to its output and its text."""
    import io

    requests = [{"prompt": "def add(a, b):", "max_new_tokens": 10}, {"prompt": "The river", "max_new_tokens": 6}]
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(json.dumps(r) + "\n" for r in requests)))
    assert main(["serve", "--config", "ar", "--max-len", "64", "--stream", "target.device=cpu",
                 "engine.max_batch_size=2"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for request in (0, 1):
        mine = [r for r in records if r["request"] == request]
        events, result = mine[:-1], mine[-1]
        assert "stats" in result and all("stats" not in e for e in events)
        assert sum((e["token_ids"] for e in events), []) == result["token_ids"]
        assert "".join(e["text"] for e in events) == result["text"]


@pytest.mark.parametrize("stop_signal", ["SIGINT", "SIGTERM"])
def test_serve_http_answers_the_openai_api_until_interrupted(stop_signal):
    """``dspark serve --port 0 --warm-up``: says how long the warm-up took and where it listens,
    answers a completion with what ``generate`` gives alone, and stops cleanly on Ctrl-C (SIGINT) or
    SIGTERM — even started as a shell starts a background job, with SIGINT ignored (it then hung)."""
    import os
    import signal
    import subprocess
    import urllib.request

    import dspark

    process = subprocess.Popen(
        [sys.executable, "-X", "faulthandler", "-m", "dspark.cli", "serve", "--port", "0", "--config", "ar",
         "--max-len", "64", "--served-model-name", "tiny", "--warm-up", "target.device=cpu",
         "engine.max_batch_size=2"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # as `dspark serve ... &` in a script
    try:
        lines = [process.stderr.readline() for _ in range(3)]
        assert "warming up over 1 to 2 rows" in lines[0] and re.search(r"warmed up in \d+\.\d s", lines[1]), lines
        line = lines[2]
        match = re.search(r"serving the OpenAI API at (http://\S+)/v1 \(model 'tiny'", line)
        assert match, line
        request = urllib.request.Request(match.group(1) + "/v1/completions", data=json.dumps(
            {"prompt": "def add(a, b):", "max_tokens": 10, "temperature": 0}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            body = json.loads(response.read())
        expected = dspark.build_pipeline("ar", overrides=["target.device=cpu"]).generate(["def add(a, b):"],
                                                                                         max_new_tokens=10)
        assert body["choices"][0]["text"] == expected.texts[0] and body["model"] == "tiny"
        process.send_signal(getattr(signal, stop_signal))
        try:
            assert process.wait(timeout=30) == 0
        except subprocess.TimeoutExpired:  # fail with every thread's stack
            process.send_signal(signal.SIGABRT)  # faulthandler prints each thread's traceback
            _, stderr = process.communicate(timeout=30)
            pytest.fail(f"dspark serve did not stop within 30 s of {stop_signal}; its threads:\n" + stderr[-6000:])
    finally:
        process.kill()
        process.wait()


def test_serve_flags_that_do_not_go_together():
    with pytest.raises(SystemExit, match="--stream is for JSON lines on stdin"):
        main(["serve", "--port", "0", "--stream", "--config", "ar"])
    with pytest.raises(SystemExit, match="--max-logprobs applies with --port"):
        main(["serve", "--max-logprobs", "2", "--config", "ar"])


def test_generate_structured_outputs(capsys, tmp_path):
    """``--choice``, ``--regex``, ``--json-schema``: the printed output follows each; a grammar that
    does not compile, or a missing schema file, is a clear error before any decoding."""
    base = ["generate", "def parse(config):", "--config", "eagle3", "--max-new-tokens", "24", "target.device=cpu"]
    assert main([*base, "--choice", "yes", "--choice", "not sure", "--temperature", "1"]) == 0
    assert capsys.readouterr().out.strip() in {"yes", "not sure"}
    assert main([*base, "--regex", "[0-9]{2,4}"]) == 0
    assert re.fullmatch(r"[0-9]{2,4}", capsys.readouterr().out.strip())
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}')
    assert main([*base, "--json-schema", str(schema), "--compact-json"]) == 0
    assert isinstance(json.loads(capsys.readouterr().out)["n"], int)
    with pytest.raises(SystemExit, match="regex grammar does not compile: Regex parsing error"):
        main([*base, "--regex", "("])
    with pytest.raises(SystemExit, match="is not a file"):
        main([*base, "--json-schema", str(tmp_path / "missing.json")])


def test_json_lines_carry_their_own_structured_outputs(capsys, monkeypatch, tmp_path):
    """A prompts-file line or a served request line may ask for a structured output with the
    OpenAI server's fields (``guided_choice``, ``response_format``, ...): each output follows its
    own, a line without one follows the flags' (or none); a bad one is named."""
    import io

    options = ["yes", "no"]
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    lines = [{"prompt": "# ok?\n", "guided_choice": options},
             {"prompt": "x = ", "structured_outputs": {"json": schema, "disable_any_whitespace": True}},
             {"prompt": "count = "}]
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert main(["generate", "--config", "eagle3", "--prompts-file", str(source), "--output", str(out),
                 "--regex", "[1-9][0-9]?", "--max-new-tokens", "24", "target.device=cpu"]) == 0
    texts = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert texts[0] in options and isinstance(json.loads(texts[1])["n"], int) and re.fullmatch(r"[1-9][0-9]?", texts[2])
    source.write_text(json.dumps({"prompt": "x", "guided_regex": "("}) + "\n" + json.dumps({"prompt": "y"}) + "\n")
    with pytest.raises(SystemExit, match=r"request 0: the regex grammar does not compile"):
        main(["generate", "--config", "ar", "--prompts-file", str(source), "target.device=cpu"])
    source.write_text(json.dumps({"prompt": "y"}) + "\n" + json.dumps({"prompt": "x", "guided_choice": []}) + "\n")
    with pytest.raises(SystemExit, match=r"in.jsonl: request 2: choices are a non-empty list"):
        main(["generate", "--config", "ar", "--prompt", "z", "--prompts-file", str(source), "target.device=cpu"])
    requests = [{"prompt": "# ok?\n", "guided_choice": options}, {"prompt": "x", "guided_choice": []},
                {"prompt": "y = ", "response_format": {"type": "json_object"}, "max_new_tokens": 4}]
    capsys.readouterr()
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(json.dumps(r) + "\n" for r in requests)))
    assert main(["serve", "--config", "ar", "--max-len", "64", "--max-new-tokens", "8", "target.device=cpu"]) == 0
    records = {r["line"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert records[1]["text"] in options and "non-empty list" in records[2]["error"] and "text" in records[3]


def test_generate_tells_overrides_prompts_and_line_keys_apart(capsys, tmp_path):
    """`temperature=0.8` was decoded as a second prompt (the setting ignored); a misspelt setting
    in a --prompts-file line was ignored; --stats-json into a missing directory failed after the
    decoding; sampling without --seed was the same on every run."""
    base = ["generate", "--config", "ar", "--max-new-tokens", "4", "target.device=cpu"]
    with pytest.raises(SystemExit, match=r"unknown config section\(s\) \['temperature'\].*goes in --prompt"):
        main([*base, "def f():", "temperature=0.8"])
    assert main([*base, "--prompt", "self.value=0"]) == 0
    lines = tmp_path / "prompts.jsonl"
    lines.write_text(json.dumps({"prompt": "def f():", "temprature": 0.9}) + "\n")
    with pytest.raises(SystemExit, match=r"request 0: unknown key 'temprature' \(did you mean 'temperature'\?\)"):
        main([*base, "--prompts-file", str(lines)])
    lines.write_text(json.dumps({"prompt": "def f():", "id": 7, "reference": "x"}) + "\n")  # an eval set's own data
    capsys.readouterr()
    assert main([*base, "--prompts-file", str(lines)]) == 0
    assert "keys that are no setting, ignored: id, reference" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--stats-json .* its directory does not exist"):
        main([*base, "--prompt", "x", "--stats-json", str(tmp_path / "no" / "stats.json")])
    outputs = set()
    for _ in range(3):
        main([*base, "--prompt", "def f():", "--temperature", "1.0", "--print-ids", "--max-new-tokens", "12",
              "--ignore-eos"])
        outputs.add(capsys.readouterr().out)
    assert len(outputs) > 1  # fresh seeds: a 12-token sample repeating thrice has probability ~0 here


def test_generate_refuses_an_output_file_that_is_a_directory(tmp_path, monkeypatch):
    """--output DIR and --stats-json DIR raised IsADirectoryError once everything was generated."""
    import dspark.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("the target loaded before the check"))
    for flag in ("--output", "--stats-json"):
        with pytest.raises(SystemExit, match=f"{flag} {re.escape(str(tmp_path))} is a directory: name a file"):
            main(["generate", "--config", "ar", "--prompt", "x", flag, str(tmp_path), "target.device=cpu"])


def test_generate_names_a_prompt_ids_value_that_is_not_token_ids():
    with pytest.raises(SystemExit, match=r"--prompt-ids takes integer token ids separated by spaces or commas, e\.g\. "
                                         r"'1 2 3'; got '1 x'"):
        main(["generate", "--config", "ar", "--prompt-ids", "1 x", "target.device=cpu"])


def test_export_refuses_an_out_directory_that_is_a_file(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("")
    for out in (taken, taken / "sub"):
        assert main(["export", "eagle3", "--drafter", "dspark-tiny-eagle3", "--target", "dspark-tiny",
                     "--out", str(out)]) == 2
        assert f"--out '{out}' must be a directory (created if missing), but '{taken}' is a file" in \
            capsys.readouterr().err
