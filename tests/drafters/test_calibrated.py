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
