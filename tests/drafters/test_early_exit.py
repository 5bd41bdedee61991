"""The early-exit drafter: the target's first layers, final norm and LM head, weights shared.

Greedy equivalence and the chi-square checks run it with the other drafters
(``tests/test_speculative.py``: ``early_exit``); here, what it drafts with and what it refuses."""

from __future__ import annotations

import pytest
import torch

import dspark
from dspark.models import load_model

from helpers import ragged_prompts, tiny_hf_model


def _pipeline(target, **drafter):
    return dspark.build_pipeline({"target": {"device": "cpu", "dtype": "float64"},
                                  "drafter": {"name": "early_exit", "num_speculative_tokens": 3, **drafter}},
                                 target_model=target)


@pytest.mark.parametrize("layers", [1, 2])
def test_the_early_exit_is_the_targets_layer_output_through_its_norm_and_lm_head(layers):
    """Logits of the cut model = the target's final norm and LM head over its ``layers``-th layer's
    output, position by position (float64), over a prompt and then one token more."""
    target = load_model(tiny_hf_model("qwen3", scale=3.0), dtype="float64")
    view = target.early_exit(layers)
    assert view.num_layers == layers and view.cache_shape()[0] == layers
    tokens = torch.tensor(ragged_prompts(101, lengths=(9, 9), seed=layers))
    full, cut = target.new_cache(2, 16), view.new_cache(2, 16)
    for part in (tokens[:, :8], tokens[:, 8:]):
        expected = target.logits_of(target(part, full, hidden_layers=(layers - 1,)).hidden_states[0])
        assert torch.allclose(view(part, cut).logits, expected, atol=1e-12, rtol=0)


def test_drafts_are_drawn_from_the_early_exits_distribution():
    """The first draft's ``q`` (temperature 1, nothing else) is the softmax of the early exit's
    logits after the prompt and the anchor."""
    target = tiny_hf_model("qwen3", scale=3.0)
    pipe = _pipeline(target, exit_layer=2)
    seen = []
    pipe.engine.round_hooks.append(lambda proposal, result, active: seen.append(proposal.probs[:, 0].clone()))
    prompt = ragged_prompts(101, lengths=(6,), seed=3)[0]
    out = pipe.generate([prompt], max_new_tokens=2, temperature=1.0, seed=5, ignore_eos=True)
    view = pipe.target.early_exit(2)
    logits = view(torch.tensor([prompt + out.token_ids[0][:1]]), view.new_cache(1, 16)).logits[:, -1]
    assert torch.allclose(seen[0], torch.softmax(logits, -1), atol=1e-12, rtol=0)


def test_the_drafter_shares_the_targets_weights_and_leaves_them_as_they_were():
    target = tiny_hf_model("llama", scale=3.0)
    pipe = _pipeline(target, exit_layer=1)
    model, native = pipe.engine.drafter.model, pipe.target
    before = {name: value.clone() for name, value in native.state_dict().items()}
    shared = [(model.embed_tokens.weight, native.embed_tokens.weight), (model.norm, native.norm),
              (model.lm_head.weight, native.lm_head.weight), (model.layers[0].wqkv.weight, native.layers[0].wqkv.weight)]
    assert all(a.data_ptr() == b.data_ptr() for a, b in shared)
    assert len(model.layers) == 1 and sum(p.numel() for p in model.parameters()) < sum(
        p.numel() for p in native.parameters())
    pipe.generate(ragged_prompts(101, lengths=(5, 2)), max_new_tokens=12, temperature=1.0, seed=1, ignore_eos=True)
    assert all(torch.equal(before[name], value) for name, value in native.state_dict().items())


def test_the_default_exit_is_half_the_targets_layers():
    pipe = _pipeline(tiny_hf_model("qwen3", num_hidden_layers=4), exit_layer=None)
    assert pipe.engine.drafter.model.num_layers == 2


@pytest.mark.parametrize("exit_layer", [0, 2, 5, -1])
def test_an_exit_outside_the_targets_layers_is_refused(exit_layer):
    with pytest.raises(ValueError, match=r"drafter.exit_layer: an early exit keeps 1 to 1 of this model's 2 decoder"):
        _pipeline(tiny_hf_model("llama"), exit_layer=exit_layer)


def test_a_target_without_a_native_implementation_is_refused():
    with pytest.raises(ValueError, match=r"needs a target with a native implementation \(target.backend=native"):
        dspark.build_pipeline({"target": {"device": "cpu", "backend": "hf"}, "drafter": {"name": "early_exit"}},
                              target_model=tiny_hf_model("llama"))


def test_a_one_layer_target_and_a_draft_model_are_refused():
    with pytest.raises(ValueError, match="at least 2 decoder layers"):
        _pipeline(tiny_hf_model("llama", num_hidden_layers=1))
    with pytest.raises(ValueError, match="takes no draft model"):
        dspark.build_pipeline({"target": {"device": "cpu"}, "drafter": {"name": "early_exit"}},
                              target_model=tiny_hf_model("llama"), draft_model=tiny_hf_model("llama", seed=2))


def test_calibration_auto_is_refused_for_it_has_no_checkpoint():
    """``auto`` reads ``calibration.json`` beside a checkpoint: an early exit has none, so ``auto``
    would keep the raw confidences without a word."""
    with pytest.raises(ValueError, match=r"no checkpoint for drafter.calibration=auto.*--output FILE"):
        dspark.build_pipeline({"target": {"device": "cpu"}, "drafter": {"name": "early_exit", "calibration": "auto"}},
                              target_model=tiny_hf_model("llama", num_hidden_layers=2))
