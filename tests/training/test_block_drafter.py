"""Training the block drafter: the loss falls, the export loads as a drafter, and the same recipe
runs under Lightning's ddp strategy on two CPU processes (gloo)."""

import json
import math
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from dspark.drafters.checkpoint import target_identity
from dspark.drafters.dspark import load_block_drafter
from dspark.models import load_model
from dspark.training import load_train_config, train
from dspark.training.recipes import read_logged, tokenizer_source, training_logs
from drafter_runs import drafter_config
from helpers import CODE, PROSE, corpus


def test_training_lowers_the_loss_and_exports_a_loadable_drafter(assets, tmp_path, caplog):
    cfg = load_train_config(None, drafter_config(assets, tmp_path, "max_steps=12"))
    report = train(cfg, documents=corpus())
    losses = read_logged(training_logs(tmp_path / "run"), "train/loss")
    assert losses[-1][1] < losses[0][1]
    assert {"test/code_tau_greedy", "test/code_acceptance_1", "test/prose_loss"} <= set(report["test"])
    target = load_model(assets / "target")
    net = load_block_drafter(tmp_path / "out", target)
    assert net.args.head == "markov" and net.args.target_layers == (0, 2)
    recorded = json.loads((tmp_path / "out" / "config.json").read_text())
    assert recorded["target"] == str(assets / "target")
    assert recorded["target_identity"] == target_identity(target) and "another target" not in caplog.text


def test_a_drafter_in_deepspecs_dflash_form_trains(assets, tmp_path):
    """No sequential head, no confidence head (no W1, no confidence term), context into the keys and
    values without the input norm: the loss still falls and the export loads as that drafter."""
    model = "model={gamma: 3, head: none, rank: 0, confidence: none, context_input_norm: false, target_layers: [0, 2]}"
    args = [a for a in drafter_config(assets, tmp_path, "max_steps=12") if not a.startswith("model=")] + [model]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "calibration.json").write_text('{"temperatures": [2.0, 2.0, 2.0]}')  # the old weights'
    train(load_train_config(None, args), documents=corpus())
    # (set aside: drafter.calibration auto would have applied it to the new weights)
    assert not (tmp_path / "out" / "calibration.json").exists()
    assert (tmp_path / "out" / "calibration.stale.json").read_text() == '{"temperatures": [2.0, 2.0, 2.0]}'
    losses = read_logged(training_logs(tmp_path / "run"), "train/loss")
    assert losses[-1][1] < losses[0][1]
    net = load_block_drafter(tmp_path / "out", load_model(assets / "target"))
    assert (net.args.confidence, net.args.rank, net.args.context_input_norm) == ("none", 0, False)
    assert net.confidence is None and net.token_embedding is None


@pytest.mark.slow
def test_recipe_runs_under_ddp_on_two_cpu_processes(assets, tmp_path):
    """`dspark train drafter ... strategy=ddp devices=2 accelerator=cpu`: two processes, gloo, both
    writing the same teacher cache."""
    fake_stdlib = tmp_path / "stdlib"
    (fake_stdlib / "pkg").mkdir(parents=True)
    for i in range(80):  # enough files that every split gets some
        (fake_stdlib / "pkg" / f"module_{i}.py").write_text(f'"""{PROSE * 4}"""\n\n' + CODE * 8)
    args = drafter_config(assets, tmp_path, "max_steps=4", "strategy=ddp", "devices=2", "accelerator=cpu", "threads=1",
                          f"corpus={{root: {fake_stdlib}}}", "max_eval_blocks=2", f"teacher_cache.dir={tmp_path / 'cache'}")
    config = tmp_path / "train.yaml"
    OmegaConf.save(OmegaConf.from_dotlist([a for a in args if not a.startswith("kind=")]), config)
    done = subprocess.run([sys.executable, "-m", "dspark.cli", "train", "drafter", "--config", str(config)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "distributed_backend=gloo" in done.stderr and "All distributed processes registered" in done.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()
    net = load_block_drafter(tmp_path / "out", load_model(assets / "target"))
    assert torch.isfinite(net.context_proj.weight).all()
    entries = list((tmp_path / "cache" / "entries").glob("*/*"))
    assert len(entries) >= 8 and all(e.suffix == ".safetensors" for e in entries)  # no torn temporary files
    assert "teacher cache" in done.stderr and "computed and written" in done.stderr


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
    # a reduced draft vocabulary: the most frequent tokens of the training stream; no per-head q/k
    # norms although the target has them (a head the EAGLE / SpecForge format can hold)
    from dspark.training.data import token_stream
    from dspark.training.eagle3 import frequent_tokens
    from transformers import AutoTokenizer

    cfg = load_train_config(None, eagle_config("{architecture: eagle3, gamma: 3, target_layers: [0, 1, 2], "
                                               "draft_vocab_size: 40, qk_norm: false}", "max_steps=4",
                                               f"run_dir={tmp_path / 'run_vocab'}", f"output_dir={tmp_path / 'out_vocab'}"))
    report = train(cfg, documents=corpus())
    head = load_eagle3(tmp_path / "out_vocab", load_model(assets / "target"))
    assert load_model(assets / "target").args.qk_norm and not head.args.qk_norm
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source(cfg))
    stream = token_stream([d for d in corpus() if d.split == "train"], tokenizer)
    assert torch.equal(head.d2t, frequent_tokens(stream, 40, head.args.vocab_size))
    assert math.isfinite(report["test"]["test/code_loss"])
    with pytest.raises(ValueError, match=r"unknown eagle3 model keys \['head'\]"):
        train(load_train_config(None, eagle_config("{architecture: eagle3, head: markov}", "max_steps=1")),
              documents=corpus())


def test_a_teacher_or_tokenizer_the_recipe_cannot_use_is_refused(assets, tmp_path):
    """Once these trained silently on text the teacher never saw tokenized that way, or failed
    deep inside with an AttributeError (a teacher on the transformers adapter)."""
    import shutil

    from dspark.assets import ASSETS
    from dspark.models import random_hf_model
    from dspark.tokenization import byte_tokenizer

    def run(*extra):
        args = [a for a in drafter_config(assets, tmp_path, "max_steps=1")
                if not a.startswith(tuple(f"{e.split('=')[0]}=" for e in extra))]
        train(load_train_config(None, [*args, *extra]), documents=corpus())

    teacher = tmp_path / "teacher"  # a teacher checkpoint with its own tokenizer, another one named
    shutil.copytree(assets / "target", teacher)
    byte_tokenizer().save_pretrained(teacher)
    with pytest.raises(ValueError, match="is not the teacher's .* leave tokenizer unset"):
        run(f"teacher={teacher}")
    with pytest.raises(ValueError, match=r"tokenizer has 4096 tokens, more than the teacher's vocabulary \(\d+\)"):
        run(f"tokenizer={ASSETS / 'dspark-tiny' / 'tokenizer'}")
    gpt2 = tmp_path / "gpt2"
    random_hf_model(dict(model_type="gpt2", vocab_size=512, n_embd=32, n_layer=2, n_head=2, n_positions=128)
                    ).save_pretrained(gpt2)
    with pytest.raises(ValueError, match="trains against a target dspark runs natively"):
        run(f"teacher={gpt2}")
