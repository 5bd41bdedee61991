"""Training the block drafter: the loss falls, the export loads as a drafter, and the same recipe
runs under Lightning's ddp strategy on two CPU processes (gloo)."""

import json
import math
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from dspark.data.corpus import Document
from dspark.data.tokenizer import train_tokenizer
from dspark.drafters.dspark import load_block_drafter
from dspark.models import load_model
from dspark.training import load_train_config, train
from dspark.training.recipes import read_logged, tokenizer_source, training_logs

CODE = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\n"
PROSE = "The function adds two numbers and returns their sum to the caller. "


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tokenizer and a tiny Qwen3 target checkpoint trained for a few steps on a tiny corpus."""
    root = tmp_path_factory.mktemp("assets")
    tokenizer = train_tokenizer([CODE * 20, PROSE * 20], vocab_size=512)
    tokenizer.save_pretrained(root / "tok")
    from dspark.models import random_hf_model

    target = random_hf_model(dict(model_type="qwen3", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                  max_position_embeddings=256, tie_word_embeddings=True), seed=0)
    target.save_pretrained(root / "target")
    tokenizer.save_pretrained(root / "target")
    return root


def corpus():
    splits = ["train"] * 6 + ["validation", "test"]
    return [Document(f"m{i}.py", "code", s, CODE * 20) for i, s in enumerate(splits)] + \
           [Document(f"d{i}", "prose", s, PROSE * 20) for i, s in enumerate(splits)]


def drafter_config(root, run, *extra):
    return [f"teacher={root / 'target'}", f"tokenizer={root / 'tok'}", "kind=drafter",
            "model={gamma: 3, head: markov, num_layers: 1, rank: 8, target_layers: [0, 2]}", "seq_len=48",
            "batch_size=4", "anchors_per_sequence=4", "precision=32-true", "val_every=6", "log_every=1",
            "optim.warmup_steps=2", "optim.lr=3e-3", "save_dtype=float32", f"run_dir={run / 'run'}",
            f"output_dir={run / 'out'}", *extra]


def test_training_lowers_the_loss_and_exports_a_loadable_drafter(assets, tmp_path):
    cfg = load_train_config(None, drafter_config(assets, tmp_path, "max_steps=12"))
    report = train(cfg, documents=corpus())
    losses = read_logged(training_logs(tmp_path / "run"), "train/loss")
    assert losses[-1][1] < losses[0][1]
    assert {"test/code_tau_greedy", "test/code_acceptance_1", "test/prose_loss"} <= set(report["test"])
    target = load_model(assets / "target")
    net = load_block_drafter(tmp_path / "out", target)
    assert net.args.head == "markov" and net.args.target_layers == (0, 2)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["target"] == str(assets / "target")


@pytest.mark.slow
def test_recipe_runs_under_ddp_on_two_cpu_processes(assets, tmp_path):
    """`dspark train drafter ... strategy=ddp devices=2 accelerator=cpu`: two processes, gloo."""
    fake_stdlib = tmp_path / "stdlib"
    (fake_stdlib / "pkg").mkdir(parents=True)
    for i in range(80):  # enough files that every split gets some
        (fake_stdlib / "pkg" / f"module_{i}.py").write_text(f'"""{PROSE * 4}"""\n\n' + CODE * 8)
    args = drafter_config(assets, tmp_path, "max_steps=4", "strategy=ddp", "devices=2", "accelerator=cpu", "threads=1",
                          f"corpus={{root: {fake_stdlib}}}", "max_eval_blocks=2")
    config = tmp_path / "train.yaml"
    OmegaConf.save(OmegaConf.from_dotlist([a for a in args if not a.startswith("kind=")]), config)
    done = subprocess.run([sys.executable, "-m", "dspark.cli", "train", "drafter", "--config", str(config)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "distributed_backend=gloo" in done.stderr and "All distributed processes registered" in done.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()
    net = load_block_drafter(tmp_path / "out", load_model(assets / "target"))
    assert torch.isfinite(net.context_proj.weight).all()



def test_eagle3_recipe_trains_and_exports_a_loadable_head(assets, tmp_path):
    from dspark.drafters.eagle3 import load_eagle3

    def eagle_config(model, *extra):
        return [a for a in drafter_config(assets, tmp_path, *extra) if not a.startswith("model=")] + [f"model={model}"]

    cfg = load_train_config(None, eagle_config("{architecture: eagle3, gamma: 3, target_layers: [0, 1, 2]}", "max_steps=8"))
    report = train(cfg, documents=corpus())
    losses = read_logged(training_logs(tmp_path / "run"), "train/soft_ce")
    assert losses[-1][1] < losses[0][1]
    assert {"test/code_tau_greedy", "test/code_acceptance_3"} <= set(report["test"])
    head = load_eagle3(tmp_path / "out", load_model(assets / "target"))
    assert head.args.gamma == 3 and head.args.target_layers == (0, 1, 2)
    # a reduced draft vocabulary: the most frequent tokens of the training stream
    from dspark.training.data import token_stream
    from dspark.training.eagle3 import frequent_tokens
    from transformers import AutoTokenizer

    cfg = load_train_config(None, eagle_config("{architecture: eagle3, gamma: 3, target_layers: [0, 1, 2], "
                                               "draft_vocab_size: 40}", "max_steps=4",
                                               f"run_dir={tmp_path / 'run_vocab'}", f"output_dir={tmp_path / 'out_vocab'}"))
    report = train(cfg, documents=corpus())
    head = load_eagle3(tmp_path / "out_vocab", load_model(assets / "target"))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source(cfg))
    stream = token_stream([d for d in corpus() if d.split == "train"], tokenizer)
    assert torch.equal(head.d2t, frequent_tokens(stream, 40, head.args.vocab_size))
    assert math.isfinite(report["test"]["test/code_loss"])
    with pytest.raises(ValueError, match=r"unknown eagle3 model keys \['head'\]"):
        train(load_train_config(None, eagle_config("{architecture: eagle3, head: markov}", "max_steps=1")),
              documents=corpus())
