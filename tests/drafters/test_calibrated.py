"""Finding a drafter's calibration beside its checkpoint (``drafter.calibration: auto``)."""

import json

import pytest
import torch

import dspark

from helpers import tiny_hf_model


def test_auto_reads_the_file_beside_the_checkpoint_and_skips_one_fitted_at_a_smaller_gamma(tmp_path):
    draft_dir = tmp_path / "draft"
    tiny_hf_model("qwen3", seed=1, num_hidden_layers=1).save_pretrained(draft_dir)
    (draft_dir / "calibration.json").write_text(json.dumps({"temperatures": [2.0, 0.5], "biases": [1.0, -1.0]}))

    def calibration(gamma, **section):
        return dspark.build_pipeline({"target": {"device": "cpu"}, "drafter": {
            "name": "draft_model", "num_speculative_tokens": gamma, "path": str(draft_dir), **section}},
            target_model=tiny_hf_model("qwen3")).drafter.calibration

    found = calibration(2)
    assert torch.equal(found.sampled[0], torch.tensor([2.0, 0.5], dtype=torch.float64))
    assert found.greedy is found.sampled  # one map: both modes
    with pytest.warns(UserWarning, match="calibrates 2 draft positions, fewer than the 3 drafted: the confidences "
                                         "stay raw"):
        assert calibration(3) is None
    assert calibration(2, calibration=None) is None
    with pytest.raises(ValueError, match="expected at least 3 positive temperatures"):  # a named file must cover γ
        calibration(3, calibration=str(draft_dir / "calibration.json"))
    (draft_dir / "calibration.json").write_text("{broken")
    with pytest.raises(ValueError, match="cannot read confidence temperatures"):  # a broken file is not skipped
        calibration(2)


def test_a_file_fitted_for_another_drafter_is_refused(tmp_path):
    """A calibration file records the drafter ``dspark calibrate`` fitted it for: another drafter
    refuses it, found beside its checkpoint or named, naming both (it was applied silently); the
    file's own drafter, or a file that does not say (the shipped DSpark map), applies."""
    draft_dir = tmp_path / "draft"
    tiny_hf_model("qwen3", seed=1, num_hidden_layers=1).save_pretrained(draft_dir)
    beside = draft_dir / "calibration.json"

    def calibration(**section):
        return dspark.build_pipeline({"target": {"device": "cpu"}, "drafter": {
            "name": "draft_model", "num_speculative_tokens": 2, "path": str(draft_dir), **section}},
            target_model=tiny_hf_model("qwen3")).drafter.calibration

    refused = "fitted for drafter 'eagle3', not for this 'draft_model' drafter"
    for content in ({"temperatures": [2.0, 0.5], "drafter": "eagle3"},
                    {"greedy": {"temperatures": [2.0, 0.5], "drafter": "eagle3"}}):  # (a greedy map alone)
        beside.write_text(json.dumps(content))
        with pytest.raises(ValueError, match=f"{beside}: its confidence maps were {refused}"):
            calibration()
        with pytest.raises(ValueError, match=refused):
            calibration(calibration=str(beside))
    assert calibration(calibration=None) is None
    beside.write_text(json.dumps({"temperatures": [2.0, 0.5], "drafter": "draft_model"}))
    assert calibration().drafter == "draft_model"
    beside.write_text(json.dumps({"temperatures": [2.0, 0.5], "drafter": 3}))
    with pytest.raises(ValueError, match="'drafter' must be the name of the drafter"):
        calibration()


def test_a_drafter_built_without_a_pipeline_refuses_another_drafters_file_too(tmp_path):
    """The check lives where the file is read (``find_calibration``), so a drafter class built
    directly — a user's script, a subclass — refuses a file fitted for another drafter as
    ``build_pipeline`` does."""
    from dspark.drafters.draft_model import DraftModelConfig, DraftModelDrafter
    from dspark.models import load_model
    from dspark.samplers import DefaultSampler

    draft_dir = tmp_path / "draft"
    tiny_hf_model("qwen3", seed=1, num_hidden_layers=1).save_pretrained(draft_dir)
    named = tmp_path / "eagle3_calibration.json"
    named.write_text(json.dumps({"temperatures": [2.0, 0.5], "drafter": "eagle3"}))
    (draft_dir / "calibration.json").write_text(named.read_text())
    target = load_model(tiny_hf_model("qwen3"))
    for calibration in (str(named), "auto"):
        with pytest.raises(ValueError, match="fitted for drafter 'eagle3', not for this 'draft_model' drafter"):
            DraftModelDrafter(DraftModelConfig(path=str(draft_dir), num_speculative_tokens=2, calibration=calibration),
                              target=target, sampler=DefaultSampler())
    kept = DraftModelDrafter(DraftModelConfig(path=str(draft_dir), num_speculative_tokens=2, calibration=None),
                             target=target, sampler=DefaultSampler())
    assert kept.calibration is None
