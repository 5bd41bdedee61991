"""``drafter.min_survival`` (:mod:`dspark.drafters.early_stop`) with each left-to-right drafter
that carries confidences: where requests stop, what the proposal holds, bad values."""

import pytest
import torch

import dspark

from helpers import ragged_prompts, tiny_hf_model

STOPPING_DRAFTERS = ["eagle3", "draft_model"]


def stopping_pipeline(drafter: str, target_hf, gamma: int, **section):
    """A randomly initialised EAGLE-3 head, or a small random draft model, over ``target_hf`` (float64)."""
    if drafter == "eagle3":
        config, draft = {"name": "eagle3", "num_speculative_tokens": gamma, "path": None, **section}, None
    else:
        config = {"name": "draft_model", "num_speculative_tokens": gamma, **section}
        draft = tiny_hf_model("qwen3", seed=1, scale=3.0, num_hidden_layers=1)
    return dspark.build_pipeline({"target": {"device": "cpu", "dtype": "float64"}, "drafter": config},
                                 target_model=target_hf, draft_model=draft)


@pytest.mark.parametrize("drafter", STOPPING_DRAFTERS)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_min_survival_stops_each_request_where_its_survival_falls(drafter, temperature):
    """Each request offers its drafts up to the last ``k`` with ``Π_{i≤k} c_i ≥ min_survival``
    (``c_k``: the drafter's top probability at position k, which the proposal carries as
    confidence); the proposal is as wide as the longest offer, so drafting and verification both
    stop early. Greedy output stays plain decoding's."""
    target_hf = tiny_hf_model("qwen3", scale=3.0)
    prompts = ragged_prompts(101, lengths=(5, 1, 9, 3))
    decode = dict(max_new_tokens=20, temperature=temperature, seed=3, ignore_eos=True)
    # the threshold: the median survival after two drafts when drafting all γ (so some requests stop early, some not)
    pipe, every = stopping_pipeline(drafter, target_hf, 5), []
    pipe.engine.round_hooks.append(lambda proposal, result, active: every.append(proposal))
    pipe.generate(prompts, **decode)
    threshold = float(torch.cat([p.confidence.double().cumprod(1)[:, 1] for p in every]).median())
    pipe, seen = stopping_pipeline(drafter, target_hf, 5, min_survival=threshold), []
    pipe.engine.round_hooks.append(lambda proposal, result, active: seen.append((proposal, active)))
    result = pipe.generate(prompts, **decode)
    widths, offers = set(), set()
    for proposal, active in seen:
        survival = proposal.confidence.double().cumprod(1)  # [B, width]
        width = proposal.tokens.shape[1]
        widths.add(width)
        assert width == int(proposal.num_tokens.max()) and proposal.confidence.shape == proposal.tokens.shape
        for b, offered in enumerate(proposal.num_tokens.tolist()):
            if not active[b]:  # finished: offers nothing
                assert offered == 0
                continue
            offers.add(offered)
            assert (survival[b, :offered] >= threshold).all()
            if offered < width:  # its survival fell below at the next draft
                assert survival[b, offered] < threshold
        assert proposal.probs is None if temperature == 0 else proposal.probs.shape[:2] == (len(active), width)
    assert len(offers) > 1 and max(widths) < 5  # the rule took effect, and not uniformly
    assert result.stats.drafted_tokens == sum(int(p.num_tokens.sum()) for p, _ in seen)
    if temperature == 0:
        plain = dspark.build_pipeline({"target": {"device": "cpu", "dtype": "float64"}}, target_model=target_hf)
        assert result.token_ids == plain.generate(prompts, max_new_tokens=20, ignore_eos=True).token_ids


RANGE = r"drafter.min_survival must be a number in \[0, 1\] \(0 = always draft γ tokens\), got "
TYPE = r"invalid value in section 'drafter': Value '.*' of type '.*' could not be converted to Float\s+full_key: min_survival"


@pytest.mark.parametrize("drafter", STOPPING_DRAFTERS)
@pytest.mark.parametrize("bad, message", [(-0.1, RANGE + "-0.1"), (1.5, RANGE + "1.5"), (float("nan"), RANGE + "nan"),
                                          (True, TYPE), ("high", TYPE)])
def test_bad_min_survival_is_refused(drafter, bad, message):
    with pytest.raises(ValueError, match=message):
        stopping_pipeline(drafter, tiny_hf_model("qwen3"), 3, min_survival=bad)
