"""Sequential Temperature Scaling and the calibration metrics, on hand-made and synthetic data."""

import pytest
import torch

from dspark.scheduling import (apply_temperatures, auroc, brier_score, calibration_report, expected_calibration_error,
                               fit_sts)


def test_metrics_on_hand_made_examples():
    probs, labels = torch.tensor([0.9, 0.9, 0.1, 0.1]), torch.tensor([1, 0, 0, 0])
    # two bins used: 0.9 (mean label 0.5, gap 0.4) and 0.1 (mean label 0, gap 0.1), each half the data
    assert expected_calibration_error(probs, labels, bins=10) == pytest.approx(0.25)
    assert brier_score(probs, labels) == pytest.approx((0.01 + 0.81 + 0.01 + 0.01) / 4)
    assert auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.75)
    assert auroc(torch.tensor([0.5, 0.5]), torch.tensor([0, 1])) == pytest.approx(0.5)  # ties count one half


def synthetic_rounds(num_rounds=6000, gamma=4, overconfidence=2.5, seed=0):
    """True conditional acceptance p_k per round and position; the reported confidences are
    over-confident: c_k = σ(overconfidence · logit(p_k))."""
    g = torch.Generator().manual_seed(seed)
    p = 0.15 + 0.8 * torch.rand(num_rounds, gamma, generator=g, dtype=torch.float64)
    survive = torch.rand(num_rounds, gamma, generator=g, dtype=torch.float64) < p
    accepted = survive.long().cumprod(-1).sum(-1)
    confidence = torch.sigmoid(overconfidence * torch.logit(p))
    return confidence, accepted, torch.full((num_rounds,), gamma)


def test_sts_undoes_overconfidence_and_keeps_the_ranking():
    confidence, accepted, verified = synthetic_rounds()
    temperatures = fit_sts(confidence[:4000], accepted[:4000], verified[:4000])
    assert ((temperatures > 1.8) & (temperatures < 3.5)).all()  # recognises the over-confidence (true: 2.5)
    held_out = slice(4000, None)
    before = calibration_report(confidence[held_out], accepted[held_out], verified[held_out])
    after = calibration_report(confidence[held_out], accepted[held_out], verified[held_out], temperatures)
    for b, a in zip(before, after):
        assert a["ece"] < 0.5 * b["ece"] and a["ece"] < 0.04
        assert a["brier"] < b["brier"]
        assert a["auroc"] == pytest.approx(b["auroc"], abs=1e-12)  # temperature scaling is monotone


def test_temperatures_of_one_change_nothing_and_bad_confidences_are_refused():
    c = torch.tensor([[0.2, 0.7], [0.9, 0.4]], dtype=torch.float64)
    assert torch.allclose(apply_temperatures(c, torch.ones(2)), c)
    with pytest.raises(ValueError, match=r"confidences must lie in \[0, 1\]"):
        fit_sts(torch.tensor([[1.5, 0.2]]), torch.tensor([1]), torch.tensor([2]))
    with pytest.raises(ValueError, match=r"confidence must be \[N, γ\]"):
        fit_sts(torch.tensor([0.5, 0.2]), torch.tensor([1]), torch.tensor([2]))
