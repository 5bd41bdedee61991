"""The draft-model drafter: its cache stays in step with the target's, its q is what it sampled from."""

import pytest
import torch

import dspark
from dspark.drafters.draft_model import DraftModelConfig, DraftModelDrafter
from dspark.models import load_model
from dspark.samplers import DefaultSampler

from helpers import ragged_prompts, tiny_hf_model


def test_build_time_errors():
    target = load_model(tiny_hf_model("llama"))
    with pytest.raises(ValueError, match="needs a draft model: set drafter.path"):
        DraftModelDrafter(DraftModelConfig(path=None), target=target, sampler=DefaultSampler())
    with pytest.raises(ValueError, match=r"draft model vocabulary \(64 tokens\) differs from the target's \(101 tokens\)"):
        DraftModelDrafter(DraftModelConfig(), target=target, sampler=DefaultSampler(),
                          draft_model=tiny_hf_model("llama", vocab_size=64))
    with pytest.raises(ValueError, match="num_speculative_tokens must be an integer >= 1"):
        DraftModelDrafter(DraftModelConfig(num_speculative_tokens=0), target=target, sampler=DefaultSampler(),
                          draft_model=tiny_hf_model("llama"))


def test_pipeline_reports_missing_draft_model():
    with pytest.raises(ValueError, match="needs a draft model"):
        dspark.build_pipeline({"target": {"device": "cpu"}, "drafter": {"name": "draft_model", "path": None}},
                              target_model=tiny_hf_model("llama"))


@pytest.mark.parametrize("scheduled", [False, True])
def test_draft_cache_tracks_committed_context(scheduled, tmp_path):
    """After every round the draft cache holds the committed tokens minus the anchor, less one
    pending token exactly when a round accepted all γ drafts — also when a scheduler verifies
    fewer drafts than were fed (the adaptive scheduler with a cost table that stops at depth 1–2)."""
    from dspark.scheduling import ThroughputProfile

    overrides = []
    if scheduled:
        ThroughputProfile([1, 6, 9, 12], [1.0, 0.9, 0.55, 0.3]).save(tmp_path / "sps.json")
        overrides = ["scheduler.name=adaptive", f"scheduler.profile={tmp_path / 'sps.json'}"]
    target = tiny_hf_model("qwen3", scale=3.0)
    pipe = dspark.build_pipeline({"target": {"device": "cpu"}, "drafter": {"name": "draft_model", "num_speculative_tokens": 3}},
                                 target_model=target, draft_model=tiny_hf_model("qwen3", seed=1, num_hidden_layers=1),
                                 overrides=overrides)
    drafter, engine = pipe.drafter, pipe.engine
    checks = []
    original_commit = drafter.commit

    def checked_commit(state, proposal, result, target_output):
        original_commit(state, proposal, result, target_output)
        active = ~state.done
        expected = state.lengths - 1 - drafter.pending.long()
        checks.append(bool(((drafter.cache.lengths == expected) | ~active).all()))
        checks.append(bool(((engine._cache.lengths == state.lengths - 1) | ~active).all()))

    drafter.commit = checked_commit
    stats = pipe.generate(ragged_prompts(101, lengths=(3, 7, 1)), max_new_tokens=25, temperature=1.0, seed=3,
                          ignore_eos=True).stats
    assert checks and all(checks)
    if scheduled:
        assert 0 < stats.verified_tokens < stats.drafted_tokens


def test_proposal_q_is_the_processed_draft_distribution():
    target = load_model(tiny_hf_model("llama", scale=3.0), dtype="float64")
    draft_hf = tiny_hf_model("llama", seed=2, scale=3.0)
    drafter = DraftModelDrafter(DraftModelConfig(num_speculative_tokens=2), target=target, sampler=DefaultSampler(),
                                draft_model=draft_hf)
    params = dspark.SamplingParams(0.7, top_k=5)
    pipe = dspark.build_pipeline({"target": {"device": "cpu", "dtype": "float64"}}, target_model=target)
    proposals = []
    pipe.engine.drafter = drafter
    original = drafter.propose
    drafter.propose = lambda state, u: proposals.append((state.tokens.clone(), state.lengths.clone(), original(state, u))) or proposals[-1][2]
    pipe.generate([[5, 9, 2]], max_new_tokens=4, temperature=0.7, top_k=5, seed=1, ignore_eos=True)
    tokens, lengths, proposal = proposals[0]
    context = tokens[0, : lengths[0]]
    with torch.no_grad():
        logits = draft_hf.double()(context.unsqueeze(0)).logits[0, -1]
    q1 = DefaultSampler().probs(logits, params)
    assert torch.allclose(proposal.probs[0, 0], q1, atol=1e-6)
    assert q1[proposal.tokens[0, 0]] > 0
