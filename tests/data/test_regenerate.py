"""`dspark data regenerate`: train-split prompts continued by the target, and drafter training on them."""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from dspark.data.regenerate import FORMAT, load_regenerate_config, load_regenerated, regenerate
from dspark.data.tokenizer import train_tokenizer
from dspark.training import load_train_config, train
from dspark.training.data import CorpusDataModule, token_stream

from helpers import CODE, PROSE, corpus


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    """A tiny random Qwen3 checkpoint directory with its tokenizer."""
    from dspark.models import random_hf_model

    root = tmp_path_factory.mktemp("regen") / "target"
    tokenizer = train_tokenizer([CODE * 20, PROSE * 20], vocab_size=512)
    model = random_hf_model(dict(model_type="qwen3", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                 max_position_embeddings=256, tie_word_embeddings=True), seed=0)
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def regen_config(target_dir, output, **overrides):
    items = {"target": str(target_dir), "prompt_tokens": 8, "new_tokens": 12, "samples_per_temperature": 4,
             "batch_size": 2, "temperatures": "[0.0, 1.0]", "compile": "false", "output": str(output), **overrides}
    return load_regenerate_config(None, [f"{k}={v}" for k, v in items.items()])


@pytest.fixture(scope="module")
def regenerated(target_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "regen.safetensors"
    report = regenerate(regen_config(target_dir, path), documents=corpus(), progress=False)
    return path, report


def test_greedy_samples_are_the_targets_own_continuations_of_train_split_windows(target_dir, regenerated):
    from safetensors import safe_open

    path, report = regenerated
    with safe_open(str(path), framework="pt") as f:
        tokens, offsets = f.get_tensor("tokens"), f.get_tensor("sample_offsets")
        meta = json.loads(f.metadata()["dspark"])
    assert meta["format"] == FORMAT and meta["samples"] == report["samples"] == 8 == len(offsets) - 1
    assert int(offsets[-1]) == len(tokens) == report["tokens"]
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    train_text = token_stream([d for d in corpus() if d.split == "train"], tokenizer).tolist()
    hf = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32)
    eos = tokenizer.eos_token_id
    for i in range(8):
        sample = tokens[offsets[i]:offsets[i + 1]].tolist()
        prompt, continuation = sample[:8], sample[8:]
        assert any(train_text[s:s + 8] == prompt for s in range(len(train_text) - 7))  # a window of the train split
        assert continuation[-1] == eos and 1 <= len(continuation) <= 13  # EOS closes every sample
        if i < 4:  # the greedy half: exactly what transformers' greedy generate writes
            want = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=eos,
                               pad_token_id=eos)[0, 8:].tolist()
            got = continuation if len(continuation) < 13 else continuation[:-1]  # drop the closing EOS we added
            assert got == (want[:want.index(eos) + 1] if eos in want else want)


def test_drafter_trains_on_regenerated_text_and_refuses_another_targets(target_dir, regenerated, tmp_path):
    path, _ = regenerated
    base = [f"teacher={target_dir}", "kind=drafter", f"train_data={path}",
            "model={gamma: 3, head: markov, num_layers: 1, rank: 8, target_layers: [0, 2]}", "seq_len=24",
            "batch_size=2", "anchors_per_sequence=2", "precision=32-true", "val_every=4", "max_steps=4",
            "save_dtype=float32", f"run_dir={tmp_path / 'run'}", f"output_dir={tmp_path / 'out'}"]
    report = train(load_train_config(None, base), documents=corpus())
    assert report["config"]["train_data"] == str(path) and (tmp_path / "out" / "model.safetensors").is_file()

    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    vocab = len(tokenizer)
    stream = load_regenerated(path, target=str(target_dir), vocab_size=vocab)
    data = CorpusDataModule(tokenizer, seq_len=8, batch_size=2, num_samples=4, train_stream=stream, documents=corpus())
    data.setup()
    assert data.streams["train"] is stream and "test/prose" in data.streams  # evaluation stays on the corpus

    with pytest.raises(ValueError, match="was written by target .* this run trains for 'other'"):
        load_regenerated(path, target="other", vocab_size=vocab)
    with pytest.raises(ValueError, match=f"vocabulary {vocab}.*vocabulary 4096"):
        load_regenerated(path, target=str(target_dir), vocab_size=4096)


def test_bad_regenerate_inputs_are_refused_before_any_work(target_dir, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="multiple of batch_size"):
        regen_config(target_dir, tmp_path / "x", samples_per_temperature=5)
    with pytest.raises(ValueError, match="temperatures must be a non-empty list of values >= 0"):
        regen_config(target_dir, tmp_path / "x", temperatures="[-1.0]")
    with pytest.raises(ValueError, match="prompt_tokens must be >= 1"):
        regen_config(target_dir, tmp_path / "x", prompt_tokens=0)
    # each of these was met only once the corpus was built (and the output ones once everything was generated)
    with pytest.raises(ValueError, match="temperature must be a number >= 0 .* at least 1e-06"):
        regen_config(target_dir, tmp_path / "x", temperatures="[1e-9]")
    with pytest.raises(ValueError, match=f"regenerate.output '{tmp_path}' is a directory: name the safetensors file"):
        regen_config(target_dir, tmp_path)
    (tmp_path / "taken").write_text("")
    with pytest.raises(ValueError, match=f"cannot be written: '{tmp_path / 'taken'}' is a file"):
        regen_config(target_dir, tmp_path / "taken" / "x.safetensors")
    with pytest.raises(ValueError, match="unknown dtype 'float8'; allowed: float32"):
        regen_config(target_dir, tmp_path / "x", dtype="float8")
    import dspark.data.corpus

    monkeypatch.setattr(dspark.data.corpus, "build_corpus", lambda **k: pytest.fail("the corpus was built first"))
    with pytest.raises(FileNotFoundError, match="regenerate.target '\\S*nowhere' has no config.json"):
        regenerate(regen_config(tmp_path / "nowhere", tmp_path / "x"), progress=False)
    with pytest.raises(FileNotFoundError, match="dspark data regenerate"):
        load_regenerated(tmp_path / "missing.safetensors", target="t", vocab_size=8)
    other = tmp_path / "other.safetensors"
    save_file({"tokens": torch.zeros(4, dtype=torch.int32)}, str(other))
    with pytest.raises(ValueError, match="is not a `dspark data regenerate` file"):
        load_regenerated(other, target="t", vocab_size=8)
    bad = tmp_path / "bad.safetensors"
    save_file({"tokens": torch.tensor([1, 9], dtype=torch.int32)}, str(bad),
              metadata={"dspark": json.dumps({"format": FORMAT, "target": "t", "vocab_size": 8})})
    with pytest.raises(ValueError, match=r"token ids outside \[0, 8\)"):
        load_regenerated(bad, target="t", vocab_size=8)
    with pytest.raises(ValueError, match="train_data .* is for `draft` and `drafter` runs"):
        load_train_config(None, ["kind=target", "model={model_type: qwen3}", f"train_data={bad}"])
