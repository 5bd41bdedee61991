"""Drafter checkpoints: a hand-edited or damaged ``config.json`` is refused by name, before the
weights are read."""

import json

import pytest

from dspark.drafters.block_model import BlockDrafter, BlockDrafterArgs
from dspark.drafters.dspark import load_block_drafter, save_block_drafter
from dspark.drafters.eagle3 import load_eagle3, save_eagle3
from dspark.drafters.eagle_model import Eagle3Args, Eagle3Head
from dspark.models import CheckpointError, load_model

from helpers import tiny_hf_model

DROP = object()  # a key removed from the spec


@pytest.fixture
def saved(tmp_path):
    """A block drafter checkpoint for a tiny target, its weights removed (a config error comes first)."""
    target = load_model(tiny_hf_model("qwen3"))
    save_block_drafter(BlockDrafter(BlockDrafterArgs.for_target(target, gamma=3, num_layers=1, target_layers=(0, 2),
                                                                head="markov", rank=8)), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    return tmp_path / "config.json", target


@pytest.mark.parametrize("changes, message", [
    ({"gamma": DROP, "rank": DROP}, r"missing keys \['gamma', 'rank'\]; allowed keys: hidden_size, .*, rank "
                                    r"\(optional: context_input_norm, confidence, anchor_predicts\)"),
    ({"num_layers": DROP, "num_layer": 1},
     r"missing keys \['num_layers'\]; unknown key 'num_layer' \(did you mean 'num_layers'\?\); allowed keys"),
    ({"colour": "blue"}, r"unknown key 'colour'; allowed keys"),
    ({"gamma": "3"}, r"gamma must be an integer, got \"3\""),
    ({"num_layers": True}, r"num_layers must be an integer, got true"),
    ({"rms_norm_eps": None}, r"rms_norm_eps must be a number, got null"),
    ({"target_layers": 2}, r"target_layers must be a list of integers, got 2"),
    ({"intermediate_size": 0}, r"intermediate_size must be an integer >= 1, got 0")])
def test_a_hand_edited_spec_is_refused_naming_the_file_and_the_keys(saved, changes, message):
    config_file, target = saved
    config = json.loads(config_file.read_text())
    spec = {**config["block_drafter"], **changes}
    config["block_drafter"] = {k: v for k, v in spec.items() if v is not DROP}
    config_file.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message) as caught:
        load_block_drafter(config_file.parent, target)
    assert str(caught.value).startswith(f"{config_file}: ")


@pytest.mark.parametrize("text, message", [
    ("[1, 2]", r"config.json must hold a JSON object, got list \[1, 2\]"),
    ('{"block_drafter": [1, 2]}', r"config.json: 'block_drafter' must be a JSON object .*, got list \[1, 2\]"),
    ('{"block_drafter": ', r"cannot read .*config.json: Expecting value")])
def test_a_config_that_is_no_json_object_is_refused(saved, text, message):
    config_file, target = saved
    config_file.write_text(text)
    with pytest.raises(CheckpointError, match=message):
        load_block_drafter(config_file.parent, target)


def test_a_misspelt_eagle3_key_is_refused_with_a_near_miss(tmp_path):
    target = load_model(tiny_hf_model("qwen3"))
    save_eagle3(Eagle3Head(Eagle3Args.for_target(target, gamma=3, target_layers=(0, 1, 2))), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["eagle3"]["draft_vocab"] = config["eagle3"].pop("draft_vocab_size")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"unknown key 'draft_vocab' \(did you mean 'draft_vocab_size'\?\)"):
        load_eagle3(tmp_path, target)
