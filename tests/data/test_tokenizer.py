"""The corpus tokenizer: special ids, exact round trips, determinism, and the shipped prompt sets."""

import json

import pytest

from dspark.assets import PROMPT_SETS, prompt_set_path
from dspark.data.eval_sets import read_jsonl
from dspark.data.tokenizer import train_tokenizer

TEXTS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.\n"] * 50


def test_special_tokens_are_distinct_and_first():
    tok = train_tokenizer(TEXTS, vocab_size=600)
    assert (tok.eos_token_id, tok.pad_token_id, tok.mask_token_id) == (0, 1, 2)


def test_round_trip_of_unseen_text_and_bytes():
    tok = train_tokenizer(TEXTS, vocab_size=600)
    for text in ("naïve café ✓ \t\n  x = {1: 'ß'}", "\x00\x01 binary-ish", "emoji 🙂 and 中文"):
        assert tok.decode(tok(text)["input_ids"]) == text


def test_training_is_deterministic(tmp_path):
    a, b = train_tokenizer(TEXTS, vocab_size=600), train_tokenizer(TEXTS, vocab_size=600)
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()


def test_bad_vocab_size():
    with pytest.raises(ValueError, match=r"vocab_size must be in \[512, 65536\]"):
        train_tokenizer(TEXTS, vocab_size=100)


def shipped_tokenizer():
    from transformers import AutoTokenizer

    from dspark.assets import ASSETS

    return AutoTokenizer.from_pretrained(ASSETS / "dspark-tiny" / "tokenizer")


def test_shipped_tokenizer_ids_are_stable():
    tok = shipped_tokenizer()
    assert len(tok) == 4096
    assert (tok.eos_token, tok.pad_token, tok.mask_token) == ("<|endoftext|>", "<|pad|>", "<|mask|>")
    assert (tok.eos_token_id, tok.pad_token_id, tok.mask_token_id) == (0, 1, 2)


@pytest.mark.parametrize("name", PROMPT_SETS)
def test_shipped_prompt_sets_round_trip_exactly(name):
    tok = shipped_tokenizer()
    records = read_jsonl(prompt_set_path(name))
    assert len(records) >= (80 if name != "calibration" else 100)
    assert len({r["id"] for r in records}) == len(records)
    for record in records:
        ids = tok(record["prompt"])["input_ids"]
        assert tok.decode(ids) == record["prompt"]
        assert len(ids) == record["num_tokens"] and 100 <= len(ids) <= 300
    expected_split = "validation" if name == "calibration" else "test"
    assert {r["split"] for r in records} == {expected_split}


def test_read_jsonl_names_the_bad_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "ok"}) + "\n{broken\n")
    with pytest.raises(ValueError, match=r"p.jsonl:2: not valid JSON"):
        read_jsonl(path)
    path.write_text(json.dumps({"text": "no prompt"}) + "\n")
    with pytest.raises(ValueError, match=r"p.jsonl:1: each line needs a string field 'prompt'"):
        read_jsonl(path)
