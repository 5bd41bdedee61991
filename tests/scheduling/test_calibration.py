"""Sequential Temperature and Platt scaling and the calibration metrics, on hand-made and synthetic data."""

import pytest
import torch

from dspark.scheduling import (apply_temperatures, auroc, brier_score, calibration_report, expected_calibration_error,
                               fit_platt, fit_sts)


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


def test_platt_scaling_moves_confidences_across_one_half_where_sts_cannot():
    """Under-confident confidences that sit below ½ for drafts accepted most of the time (as an
    EAGLE-3 head's top probability): STS fixes ½ in place and cannot lift them; the shift can."""
    g = torch.Generator().manual_seed(1)
    num_rounds, gamma = 6000, 4
    p = 0.5 + 0.45 * torch.rand(num_rounds, gamma, generator=g, dtype=torch.float64)  # true acceptance 0.5–0.95
    accepted = (torch.rand(num_rounds, gamma, generator=g, dtype=torch.float64) < p).long().cumprod(-1).sum(-1)
    confidence = torch.sigmoid(torch.logit(p) / 1.5 - 2.0)  # all below ½
    verified = torch.full((num_rounds,), gamma)
    fit, held_out = slice(0, 4000), slice(4000, None)
    temperatures, biases = fit_platt(confidence[fit], accepted[fit], verified[fit])
    # the true map is logit(p) = 1.5 · (logit(c) + 2): T = 1/1.5, b = 3 at every position (later
    # positions see fewer surviving rounds: a looser fit)
    assert torch.allclose(temperatures, torch.full((gamma,), 1 / 1.5, dtype=torch.float64), atol=0.25)
    assert torch.allclose(biases, torch.full((gamma,), 3.0, dtype=torch.float64), atol=0.6)
    before = calibration_report(confidence[held_out], accepted[held_out], verified[held_out])
    sts = calibration_report(confidence[held_out], accepted[held_out], verified[held_out],
                             fit_sts(confidence[fit], accepted[fit], verified[fit]))
    platt = calibration_report(confidence[held_out], accepted[held_out], verified[held_out], temperatures, biases)
    for b, s, a in zip(before, sts, platt):
        assert a["ece"] < 0.04 and a["ece"] < 0.5 * s["ece"] and a["brier"] < s["brier"] <= b["brier"] + 1e-12
        assert a["auroc"] == pytest.approx(b["auroc"], abs=1e-12)  # monotone: the ranking is kept
    # zero shifts are STS: the same map as temperatures alone
    c = confidence[:5]
    assert torch.equal(apply_temperatures(c, temperatures, torch.zeros(gamma)), apply_temperatures(c, temperatures))


def test_platt_keeps_the_identity_where_a_position_is_never_observed():
    confidence = torch.tensor([[0.6, 0.7], [0.3, 0.8]], dtype=torch.float64)
    # every round verified one draft and accepted it: position 2 never observed, position 1 always accepted
    temperatures, biases = fit_platt(confidence, torch.tensor([1, 1]), torch.tensor([1, 1]))
    assert temperatures[1] == 1.0 and biases[1] == 0.0
    assert torch.isfinite(temperatures).all() and torch.isfinite(biases).all() and biases[0] > 0
    with pytest.raises(ValueError, match=r"confidences must lie in \[0, 1\]"):
        fit_platt(torch.tensor([[1.5, 0.2]]), torch.tensor([1]), torch.tensor([2]))
