"""Streaming: the ids handed to ``on_tokens`` as rounds finish are each request's output, in
order, read with the round's one host read; TextStreamer turns them into the same text."""

import pytest
import torch

import dspark
from dspark import streaming
from dspark.scheduling import ThroughputProfile
from dspark.streaming import TextStreamer

from helpers import ragged_prompts, tiny_hf_model


def collect():
    calls: list[tuple[int, list[int]]] = []
    return calls, lambda index, ids: calls.append((index, list(ids)))


@pytest.mark.parametrize("drafter", ["none", "ngram", "dspark", "dspark_async"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_streamed_ids_are_the_output(drafter, temperature, tmp_path):
    """Three requests in batches of two (the pipeline's chunks map back to request indices), each
    call at most γ + 1 tokens, and their concatenation per request equals ``token_ids`` — also
    beside a scheduler that reads its own summary with the round's status."""
    target = tiny_hf_model("qwen3", scale=3.0)
    block = {"name": "dspark", "num_speculative_tokens": 3, "path": None, "rank": 16}
    section = {"none": "none", "ngram": {"name": "ngram", "num_speculative_tokens": 3, "min_n": 1, "max_n": 2},
               "dspark": block, "dspark_async": block}[drafter]
    overrides = ["engine.max_batch_size=2"]
    if drafter == "dspark_async":
        ThroughputProfile([1, 4, 8, 12], [1.0, 0.95, 0.8, 0.5]).save(tmp_path / "sps.json")
        overrides += ["scheduler.name=dspark_async", f"scheduler.profile={tmp_path / 'sps.json'}",
                      "scheduler.measured_fallback=false"]
    pipe = dspark.build_pipeline({"target": {"device": "cpu"}, "drafter": section}, target_model=target,
                                 overrides=overrides)
    expected = pipe.generate(ragged_prompts(101, lengths=(5, 1, 9)), max_new_tokens=20, temperature=temperature,
                             seed=2, ignore_eos=True)
    calls, on_tokens = collect()
    prompts = ragged_prompts(101, lengths=(5, 1, 9))
    result = pipe.generate(prompts, max_new_tokens=20, temperature=temperature, seed=2, ignore_eos=True,
                           on_tokens=on_tokens)
    streamed = {i: [] for i in range(len(prompts))}
    for index, ids in calls:
        assert 1 <= len(ids) <= pipe.drafter.gamma + 1
        streamed[index] += ids
    assert [streamed[i] for i in range(len(prompts))] == result.token_ids
    assert result.token_ids == expected.token_ids and result.stats.verified_tokens == expected.stats.verified_tokens
    if result.stats.accepted_tokens:  # rounds that accepted drafts hand over several tokens at once
        assert max(len(ids) for _, ids in calls) > 1


def test_streaming_stops_at_eos_and_adds_no_host_read(monkeypatch):
    target = tiny_hf_model("llama", scale=3.0)
    prompts = ragged_prompts(101, lengths=(4, 6))
    pipe = dspark.build_pipeline({"target": {"device": "cpu"},
                                  "drafter": {"name": "ngram", "num_speculative_tokens": 3, "min_n": 1, "max_n": 2}},
                                 target_model=target)
    free = pipe.generate(prompts, max_new_tokens=16, ignore_eos=True).token_ids
    eos = free[0][5]
    pipe.engine.eos_token_ids = (eos,)
    reads, original = [], torch.Tensor.tolist

    def counted(tensor):
        reads.append(tensor.numel())
        return original(tensor)

    monkeypatch.setattr(torch.Tensor, "tolist", counted)
    plain = pipe.generate(prompts, max_new_tokens=16)
    plain_reads = len(reads)
    reads.clear()
    calls, on_tokens = collect()
    streamed = pipe.generate(prompts, max_new_tokens=16, on_tokens=on_tokens)
    assert len(reads) == plain_reads  # the window rides on the status read
    assert streamed.token_ids == plain.token_ids and streamed.token_ids[0][-1] == eos
    assert [sum((ids for i, ids in calls if i == b), []) for b in range(2)] == streamed.token_ids


def test_bad_callback_is_refused_before_work():
    pipe = dspark.build_pipeline({"target": {"device": "cpu"}, "drafter": "none"}, target_model=tiny_hf_model("qwen3"))
    with pytest.raises(TypeError, match="on_tokens must be a callable"):
        pipe.generate([[3, 4]], max_new_tokens=2, on_tokens="print")


def test_text_streamer_writes_the_decoded_text_and_holds_split_characters():
    """Fed one token at a time, the shipped byte-level tokenizer splits multi-byte characters:
    no written piece carries U+FFFD, and the pieces add up to the decoded text."""
    from dspark.assets import resolve_model
    from dspark.tokenization import load_tokenizer

    tokenizer = load_tokenizer(resolve_model("dspark-tiny"))
    text = "héllo wörld ✓ 日本語 — naïve café"
    ids = tokenizer(text)["input_ids"]
    pieces: list[tuple[int, str]] = []
    streamer = TextStreamer(tokenizer, lambda index, piece: pieces.append((index, piece)))
    for token in ids:
        streamer(0, [token])
    streamer.finish()
    assert all("\ufffd" not in piece for _, piece in pieces)
    assert "".join(piece for _, piece in pieces) == tokenizer.decode(ids, skip_special_tokens=True) == streamer.texts[0]
    assert len(pieces) < len(ids)  # some characters waited for their other bytes


def test_text_streamer_follows_each_request():
    pipe = dspark.build_pipeline("draft_model", overrides=["target.device=cpu"])
    written: dict[int, str] = {}
    streamer = TextStreamer(pipe.tokenizer, lambda index, piece: written.__setitem__(index, written.get(index, "") + piece))
    result = pipe.generate(["def add(a, b):", "The river"], max_new_tokens=20, temperature=1.0, seed=1,
                           on_tokens=streamer)
    streamer.finish()
    assert [written.get(i, "") for i in range(2)] == result.texts


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])])
def test_a_stop_check_ends_a_request_between_rounds(device):
    """The engine's ``stop_check`` (what stop strings use): request 0 ends after its 7th token,
    mid-round; on CUDA the done flag and the cut length are written to the device between rounds."""
    target = tiny_hf_model("qwen3", scale=3.0)
    pipe = dspark.build_pipeline({"target": {"device": device},
                                  "drafter": {"name": "dspark", "num_speculative_tokens": 4, "path": None, "rank": 16}},
                                 target_model=target)
    prompts = ragged_prompts(101, lengths=(5, 2, 8))
    free = pipe.generate(prompts, max_new_tokens=24, ignore_eos=True)
    seen: dict[int, int] = {}

    def stop_after_seven(index: int, ids: list[int]) -> int | None:
        before = seen.get(index, 0)
        seen[index] = before + len(ids)
        return 7 - before if index == 0 and before < 7 <= before + len(ids) else None

    calls, on_tokens = collect()
    ids, stats, *_ = pipe.engine.generate(prompts, max_new_tokens=24, params=dspark.SamplingParams(), seeds=[0, 1, 2],
                                      ignore_eos=True, on_tokens=on_tokens, stop_check=stop_after_seven)
    assert ids == [free.token_ids[0][:7], *free.token_ids[1:]]
    assert [sum((got for i, got in calls if i == b), []) for b in range(3)] == ids
    assert stats.generated_tokens == sum(map(len, ids))


def test_text_streamer_decodes_a_window_not_the_whole_output():
    """A long stream (split characters across window moves included) writes exactly the decoded
    text, and no call decodes more than a window's tokens: streaming stays linear in the output."""
    from dspark.assets import resolve_model
    from dspark.tokenization import load_tokenizer

    tokenizer = load_tokenizer(resolve_model("dspark-tiny"))
    ids = tokenizer("héllo wörld ✓ 日本語 — naïve café. " * 40)["input_ids"]
    decoded_lengths = []

    class Counting:
        def decode(self, token_ids, **kwargs):
            decoded_lengths.append(len(token_ids))
            return tokenizer.decode(token_ids, **kwargs)

    pieces = []
    streamer = TextStreamer(Counting(), lambda index, piece: pieces.append(piece))
    for start in range(0, len(ids), 3):  # rounds of three tokens
        streamer(0, ids[start:start + 3])
    streamer.finish()
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == streamer.texts[0]
    assert all("\ufffd" not in piece for piece in pieces)
    assert len(ids) > 8 * streaming.WINDOW_TOKENS
    assert max(decoded_lengths) <= streaming.WINDOW_TOKENS + 3 + 8  # a window, a round, split characters


def sentencepiece_pipeline():
    """A tiny target under a SentencePiece-style tokenizer (:func:`helpers.sentencepiece_style_tokenizer`)."""
    from helpers import sentencepiece_style_tokenizer

    tokenizer = sentencepiece_style_tokenizer()
    target = tiny_hf_model("llama", vocab_size=len(tokenizer), eos_token_id=2)
    return dspark.build_pipeline({"target": {"device": "cpu"}, "drafter": {"name": "ngram", "num_speculative_tokens": 3}},
                                 target_model=target, tokenizer=tokenizer), tokenizer


def test_a_first_word_keeps_its_space_in_every_text():
    """A SentencePiece tokenizer drops the word-start space of the first token it decodes
    (``▁Paris`` alone reads ``Paris``): the text of an output, streamed or not, alone or in a
    session, is read on from its prompt — the text ``decode(prompt + output)`` adds to
    ``decode(prompt)``, as vLLM's is."""
    pipe, tokenizer = sentencepiece_pipeline()
    prompt, paris = "The capital of France is", tokenizer.convert_tokens_to_ids("▁Paris")
    streamer = TextStreamer(tokenizer, on_text=lambda i, text: None)
    result = pipe.generate([prompt], max_new_tokens=3, logit_bias={paris: 100.0}, on_tokens=streamer)
    streamer.finish()
    assert result.token_ids == [[paris] * 3]
    assert result.texts == [" Paris Paris Paris"] and streamer.texts == {0: " Paris Paris Paris"}
    session = pipe.session(max_len=32)
    request = session.submit(prompt, max_new_tokens=3, logit_bias={paris: 100.0})
    while session.unfinished:
        session.step()
    assert session.result(request).text == " Paris Paris Paris"
    # free generations of several prompts: the same rule, whatever the tokens
    prompts = ["The capital of", "France is Paris .", "a river", "and"]
    free = pipe.generate(prompts, max_new_tokens=12, temperature=1.0, seed=3, ignore_eos=True)
    for prompt_text, ids, text in zip(prompts, free.token_ids, free.texts):
        context = tokenizer.encode(prompt_text)
        whole, head = (tokenizer.decode(x, skip_special_tokens=True) for x in (context + ids, context))
        assert whole.startswith(head) and text == whole[len(head):]


def test_a_streamer_forgets_finished_requests():
    """``finish(i)`` drops request i's window; with ``keep_texts=False`` no text is kept (a
    long-running server passes each piece on and would otherwise hold every request's text)."""
    from helpers import sentencepiece_style_tokenizer

    tokenizer, pieces = sentencepiece_style_tokenizer(), []
    streamer = TextStreamer(tokenizer, on_text=lambda i, text: pieces.append((i, text)), keep_texts=False)
    for request in range(50):
        streamer.start(request, tokenizer.encode("The capital of France is"))
        streamer(request, tokenizer.encode("Paris ."))
        streamer.finish(request)
    assert streamer._streams == {} and streamer.texts == {}
    assert "".join(text for i, text in pieces if i == 7) == " Paris ."


def test_byte_fallback_text_streams_whole_characters():
    """A SentencePiece byte-fallback tokenizer (:func:`helpers.byte_fallback_tokenizer`) writes
    non-Latin text as runs of ``<0xNN>`` tokens and decodes a run at once (U+FFFD throughout when
    it is not valid UTF-8): no window — the prompt's context, a window moving on, a token's own
    context — may start mid-character. Streamed in rounds of random sizes, from a prompt whose last
    tokens start inside a character, the text is the output's continuation of the prompt, with no
    U+FFFD in any piece; per-token names (the server's log-probability tokens) join into it too."""
    import random

    from helpers import byte_fallback_tokenizer

    tokenizer = byte_fallback_tokenizer()
    prompt = tokenizer.encode("Hello 日本語", add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(prompt[-streaming.CONTEXT_TOKENS]) == "<0x97>"  # mid-character
    ids = tokenizer.encode("のテキスト 😀 and Paris, Ünïcödé — ✓ 日本。" * 12, add_special_tokens=False)
    assert len(ids) > 4 * streaming.WINDOW_TOKENS
    head = tokenizer.decode(prompt, skip_special_tokens=True)
    expected = tokenizer.decode(prompt + ids, skip_special_tokens=True)[len(head):]
    assert streaming.decode_continuation(tokenizer, prompt[-streaming.CONTEXT_TOKENS:], ids) == expected
    rng = random.Random(0)
    for _ in range(3):
        pieces: list[str] = []
        streamer = TextStreamer(tokenizer, lambda index, piece: pieces.append(piece))
        streamer.start(0, prompt)
        at = 0
        while at < len(ids):
            step = rng.randint(1, 6)
            streamer(0, ids[at:at + step])
            at += step
        streamer.finish()
        assert "".join(pieces) == streamer.texts[0] == expected
        assert all("\ufffd" not in piece for piece in pieces)
    context = prompt + ids
    names = [streaming.decode_continuation(tokenizer, context[:len(prompt) + j][-streaming.CONTEXT_TOKENS:], [token])
             .rstrip(streaming.REPLACEMENT) for j, token in enumerate(ids)]
    assert "".join(names) == expected


def test_a_stream_goes_on_after_its_text_is_rewritten():
    """A decoding may rewrite text already written (here: a stray lead byte makes the run of byte
    tokens before it invalid, so the character they wrote turns into U+FFFD): what was written
    stays, and what follows is written — the stream does not stop for good."""
    from helpers import byte_fallback_tokenizer

    tokenizer = byte_fallback_tokenizer()
    byte = lambda value: tokenizer.convert_tokens_to_ids(f"<0x{value:02X}>")  # noqa: E731
    words = tokenizer.encode(" world, the capital of France is Paris.", add_special_tokens=False)
    pieces: list[str] = []
    streamer = TextStreamer(tokenizer, lambda index, piece: pieces.append(piece))
    streamer.start(0, tokenizer.encode("Hello", add_special_tokens=False))
    for token in [byte(0xE6), byte(0x97), byte(0xA5), byte(0xE6), *words]:  # 日, then a lone lead byte
        streamer(0, [token])
    assert pieces[0] == "日"
    assert "".join(pieces).endswith(" world, the capital of France is Paris.")
