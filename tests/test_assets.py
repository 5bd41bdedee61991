"""The embedded dspark-tiny models: shipped inside the package, loaded like any HF checkpoint."""

import shutil

import pytest
import torch

import dspark
from dspark import assets
from dspark.models import CheckpointError, load_model


def test_target_loads_like_any_checkpoint_and_matches_transformers():
    from transformers import AutoModelForCausalLM

    path = assets.resolve_model("dspark-tiny")
    ours = load_model("dspark-tiny", dtype="float32")
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert ours.args.model_type == "qwen3" and 4e6 <= sum(p.numel() for p in theirs.parameters()) <= 10e6
    ids = torch.randint(3, ours.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = theirs(ids).logits
        got = ours(ids, ours.new_cache(2, 48)).logits
    assert (got - expected).abs().max() <= 1e-4


def test_draft_is_small_and_shares_the_vocabulary():
    target = load_model("dspark-tiny")
    draft = load_model("dspark-tiny-draft")
    n_target = sum(p.numel() for p in target.parameters()) - (0 if target.args.tie_word_embeddings else target.lm_head.weight.numel())
    n_draft = sum(p.numel() for p in draft.parameters()) - (0 if draft.args.tie_word_embeddings else draft.lm_head.weight.numel())
    assert n_draft <= n_target / 8
    assert draft.vocab_size == target.vocab_size == 4096


def test_shipped_files_fit_the_budget_and_manifest_records_provenance():
    total = sum(f.stat().st_size for f in (assets.ASSETS / "dspark-tiny").rglob("*") if f.is_file())
    assert total <= 40e6
    manifest = assets.manifest()
    assert manifest["corpus"]["python"] and len(manifest["corpus"]["sha256"]) == 64
    assert manifest["tokenizer"] == {"vocab_size": 4096, "eos_id": 0, "pad_id": 1, "mask_id": 2}


def test_default_pipeline_generates_offline():
    pipe = dspark.build_pipeline("default", overrides=["target.device=cpu"])
    result = pipe.generate(["def fibonacci(n):"], max_new_tokens=24)
    assert result.texts[0].strip() and result.stats.mean_accepted_length > 1.0
    plain = dspark.build_pipeline(None, overrides=["target.device=cpu"])  # built-in defaults: the same target
    assert plain.generate(["def fibonacci(n):"], max_new_tokens=24).token_ids == result.token_ids


def test_missing_or_corrupt_shipped_file_is_named(tmp_path, monkeypatch):
    copy = tmp_path / "dspark-tiny"
    shutil.copytree(assets.ASSETS / "dspark-tiny", copy)
    (copy / "target" / "tokenizer.json").unlink()
    monkeypatch.setattr(assets, "ASSETS", tmp_path)
    with pytest.raises(assets.MissingAssetError, match=r"dspark-tiny/target/tokenizer.json is missing"):
        assets.resolve_model("dspark-tiny")
    weights = copy / "draft" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"cannot read .*dspark-tiny/draft/model.safetensors"):
        load_model("dspark-tiny-draft")
    with pytest.raises(KeyError, match="unknown embedded model 'dspark-huge'; embedded models: dspark-tiny"):
        assets.resolve_model("dspark-huge")


def assert_greedy_lossless_and_accepted(config: str, *overrides: str) -> None:
    """A shipped drafter's greedy tokens equal plain decoding's, and it gets drafts accepted."""
    prompts = ["def fibonacci(n):", "The module provides"]
    expected = dspark.build_pipeline("ar", overrides=["target.device=cpu"]).generate(
        prompts, max_new_tokens=32, ignore_eos=True)
    spec = dspark.build_pipeline(config, overrides=["target.device=cpu", *overrides])
    result = spec.generate(prompts, max_new_tokens=32, ignore_eos=True)
    assert result.token_ids == expected.token_ids
    assert result.stats.mean_accepted_length > 1.2  # trained: drafts get accepted


@pytest.mark.parametrize("name, head", [("dspark-tiny-dspark", "markov"), ("dspark-tiny-dspark-rnn", "rnn"),
                                        ("dspark-tiny-dflash", "none")])
def test_shipped_block_drafters_fit_the_target_and_are_lossless(name, head):
    from dspark.drafters.dspark import load_block_drafter

    target = load_model("dspark-tiny")
    net = load_block_drafter(name, target)
    assert net.args.head == head and net.args.gamma == 7 and net.args.target_layers == (1, 3, 5)
    weights = assets.resolve_model(name) / "model.safetensors"
    assert weights.stat().st_size < 8e6  # the target's embedding and LM head are shared, not stored
    assert_greedy_lossless_and_accepted("dspark", f"drafter.path={name}")


def test_shipped_eagle3_fits_the_target_and_is_lossless():
    from dspark.drafters.eagle3 import load_eagle3

    target = load_model("dspark-tiny")
    head = load_eagle3("dspark-tiny-eagle3", target)
    assert head.args.gamma == 7 and tuple(head.args.target_layers) == (1, 3, 5) and head.args.draft_vocab_size == 0
    assert (assets.resolve_model("dspark-tiny-eagle3") / "model.safetensors").stat().st_size < 4e6  # LM head shared
    assert_greedy_lossless_and_accepted("eagle3")


def test_shipped_drafters_record_the_embedded_target_and_warn_on_another(caplog):
    """Every shipped target-reading drafter records the embedded target's identity: on it (any
    dtype) no warning; on a same-shape target with other weights a warning names the checkpoint."""
    import json

    from dspark.drafters.checkpoint import target_identity
    from dspark.drafters.dspark import load_block_drafter
    from dspark.drafters.eagle3 import load_eagle3

    target = load_model("dspark-tiny")
    for name in assets.TARGET_DRAFTERS:
        recorded = json.loads((assets.resolve_model(name) / "config.json").read_text())["target_identity"]
        assert recorded == target_identity(target), name
    load_block_drafter("dspark-tiny-dspark", load_model("dspark-tiny", dtype="bfloat16"))
    assert "another target" not in caplog.text
    other = load_model("dspark-tiny")
    with torch.no_grad():
        other.lm_head.weight.mul_(1.01)
    load_eagle3("dspark-tiny-eagle3", other)
    assert "dspark-tiny/eagle3' was trained for another target of the same shape" in caplog.text


def test_the_ablation_was_trained_alike():
    """DSpark (Markov, RNN), DFlash and EAGLE-3: same data, steps and seed (their metrics.json record it)."""
    import json

    configs = {name: json.loads((assets.resolve_model(name) / "metrics.json").read_text())["config"]
               for name in assets.TARGET_DRAFTERS}
    keys = ("seq_len", "batch_size", "max_steps", "seed", "anchors_per_sequence", "loss_weights", "optim", "corpus",
            "train_data")
    reference = configs["dspark-tiny-dspark"]
    for name, config in configs.items():
        assert {k: config.get(k) for k in keys} == {k: reference.get(k) for k in keys}, name
        if name in assets.BLOCK_DRAFTERS:
            assert config["model"]["num_layers"] == reference["model"]["num_layers"], name


@pytest.mark.parametrize("name, config, overrides", [
    ("dspark-tiny-dspark", "configs/train/dspark.yaml", []),
    ("dspark-tiny-dspark-rnn", "configs/train/dspark.yaml", ["model.head=rnn"]),
    ("dspark-tiny-dflash", "configs/train/dflash.yaml", []),
    ("dspark-tiny-eagle3", "configs/train/eagle3.yaml", []),
])
def test_the_training_configs_reproduce_the_shipped_drafters(name, config, overrides):
    """The recipe a shipped drafter's metrics.json records is what its training config (the command the
    docs give) runs today: model, data, steps, optimiser, loss and seed."""
    import json
    from dataclasses import asdict
    from pathlib import Path

    from dspark.training import load_train_config

    root = Path(__file__).resolve().parents[1]
    recorded = json.loads((assets.resolve_model(name) / "metrics.json").read_text())["config"]
    current = json.loads(json.dumps(asdict(load_train_config(root / config, overrides))))
    keys = ("model", "teacher", "seq_len", "batch_size", "max_steps", "optim", "precision", "anchors_per_sequence",
            "loss_weights", "distill_temperature", "ce_weight", "seed", "corpus", "save_dtype")
    assert {k: current.get(k) for k in keys} == {k: recorded.get(k) for k in keys}
