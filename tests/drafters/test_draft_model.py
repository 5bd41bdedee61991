"""The draft-model drafter: its cache stays in step with the target's, its q is what it sampled from."""

import pytest
import torch

import dspark
from dspark.drafters.draft_model import DraftModelConfig, DraftModelDrafter
from dspark.models import load_model
from dspark.samplers import DefaultSampler

from dspark.scheduling import AdaptiveScheduler, register_scheduler

from helpers import fake_clock_scheduler, ragged_prompts, tiny_hf_model


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


register_scheduler("adaptive_slow_drafts_test")(fake_clock_scheduler(3.0, base=AdaptiveScheduler))


@pytest.mark.parametrize("mode", ["fixed", "scheduled", "unverified", "skipping", "skipping_static", "stopping",
                                  "skipping_refilled"])
def test_draft_cache_tracks_committed_context(mode, tmp_path):
    """After every round the draft cache holds a prefix of the committed tokens, at most
    ``drafter.max_lag`` short of all but the anchor — also when a scheduler verifies fewer drafts
    than were fed (the adaptive scheduler with a cost table that stops at depth 1–2), when it
    skips rounds (a fake clock on which drafting does not pay, so skipped runs reach the catch-up
    bound; also with the static shapes of ``engine.compile``, where a catch-up is padded to one of
    three widths), when drafting stops early (``min_survival``: the last draft of a stopped round is
    fed, unlike ``x_γ``), and when requests take the slots of finished ones between skipped rounds
    (continuous batching, two slots). At the end its keys and values equal a fresh forward over the
    committed tokens."""
    from dspark.drafters.draft_model import MAX_LAG
    from dspark.scheduling import ThroughputProfile

    ThroughputProfile([1, 6, 9, 12], [1.0, 0.9, 0.55, 0.3]).save(tmp_path / "sps.json")
    # SPS ∝ tokens^-0.99: only a draft of confidence ≈ 1 could pay, so rounds draft and verify
    # nothing (but for the adaptive scheduler's exploration of position 1)
    ThroughputProfile(list(range(1, 13)), [t ** -0.99 for t in range(1, 13)]).save(tmp_path / "idle.json")
    overrides = {"fixed": [],
                 "scheduled": ["scheduler.name=adaptive", "scheduler.measured_fallback=false"],
                 "unverified": ["scheduler.name=adaptive", "scheduler.measured_fallback=false",
                                "scheduler.idle_backoff=0", f"scheduler.profile={tmp_path / 'idle.json'}"],
                 "skipping": ["scheduler.name=adaptive_slow_drafts_test", "scheduler.idle_backoff=0"],
                 "skipping_static": ["scheduler.name=adaptive_slow_drafts_test", "scheduler.idle_backoff=0"],
                 "skipping_refilled": ["scheduler.name=adaptive_slow_drafts_test", "scheduler.idle_backoff=0",
                                       "engine.max_batch_size=2"],
                 # γ = 5, a threshold near the 80th percentile of the survival after two drafts:
                 # rounds stop after 2 drafts (x_2 fed) or after 4 (x_4 fed, x_5 never drafted)
                 "stopping": ["drafter.num_speculative_tokens=5", "drafter.min_survival=0.000235"]}[mode]
    if mode in ("scheduled", "skipping", "skipping_static", "skipping_refilled"):
        overrides.append(f"scheduler.profile={tmp_path / 'sps.json'}")
    target = tiny_hf_model("qwen3", scale=3.0)
    pipe = dspark.build_pipeline({"target": {"device": "cpu"}, "drafter": {"name": "draft_model", "num_speculative_tokens": 3}},
                                 target_model=target, draft_model=tiny_hf_model("qwen3", seed=1, num_hidden_layers=1),
                                 overrides=overrides)
    drafter, engine = pipe.drafter, pipe.engine
    checks, lags, widths, fed, last = [], [], [], [], {}
    original_commit = drafter.commit

    def checked_commit(state, proposal, result, target_output):
        original_commit(state, proposal, result, target_output)
        active = ~state.done
        lag = state.lengths - 1 - drafter.cache.lengths  # committed tokens before the anchor it lacks
        checks.append(bool((((lag >= 0) & (lag <= drafter.max_lag)) | ~active).all()))
        checks.append(bool(((engine._cache.lengths[:state.batch_size] == state.lengths - 1) | ~active).all()))
        lags.append(drafter.max_lag)
        widths.append(proposal.tokens.shape[1])
        fed.append(drafter.fed_steps)
        last["state"] = state

    drafter.commit = checked_commit
    fed_widths = []
    if mode == "skipping_static":  # engine.compile's shapes (whole-cache reads, bucketed widths), run eagerly
        drafter._static_kv = True
        forward = drafter._forward
        drafter._forward = lambda tokens, *args, **kwargs: fed_widths.append(tokens.shape[1]) or forward(
            tokens, *args, **kwargs)
    max_new = 90 if mode.startswith("skipping") else 25
    prompts = ragged_prompts(101, lengths=(3, 7, 1, 5, 2) if mode == "skipping_refilled" else (3, 7, 1))
    stats = pipe.generate(prompts, max_new_tokens=[30, 90, 45, 60, 20] if mode == "skipping_refilled" else max_new,
                          temperature=1.0, seed=3, ignore_eos=True).stats
    assert checks and all(checks)
    if mode == "scheduled":
        assert 0 < stats.verified_tokens < stats.drafted_tokens
    if mode == "unverified":  # drafted every round, mostly verifying nothing: the narrowed proposal is empty
        assert stats.drafted_tokens == 3 * stats.target_forwards and stats.verified_tokens < stats.target_forwards / 2
    if mode.startswith("skipping"):  # long runs of skipped rounds, fed in bounded catch-up steps
        assert max(lags) == MAX_LAG - 1 and stats.drafted_tokens < 3 * 3 * stats.rounds / 4
    if mode == "skipping_static":  # every catch-up width met, padded to three
        assert set(fed_widths) == {1, 2, MAX_LAG + 1}
    if mode == "stopping":  # rounds stopped after 2 drafts and after 4, none drafted all 5
        assert set(fed) == {2, 4} and max(widths) < 5
    state, cache = last["state"], drafter.cache
    fresh = drafter.model.new_cache(state.batch_size, cache.max_len)
    drafter.model(state.tokens[:, :int(cache.lengths.max())], fresh, cache.lengths.clone(),
                  kv_len=int(cache.lengths.max()))
    for b, length in enumerate(cache.lengths.tolist()):
        for layer in range(len(cache.buffer)):
            torch.testing.assert_close(cache.buffer[layer][b, ..., :length, :], fresh.buffer[layer][b, ..., :length, :],
                                       rtol=1e-4, atol=1e-5)


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
    # its confidence: the draft model's top probability before the sampler's processing (not x_1's q)
    assert drafter.provides_confidence
    assert proposal.confidence[0, 0].item() == pytest.approx(torch.softmax(logits, -1).max().item(), abs=1e-6)


def test_a_misspelt_backend_or_random_spec_key_is_refused_naming_it():
    """``drafter.backend`` is named as such (not ``target.backend``); a random draft model's spec key
    that its config does not know is refused (transformers' configs keep any keyword: a typo left
    the default, 32 layers)."""
    spec = {"model_type": "llama", "vocab_size": 101, "hidden_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 64}
    with pytest.raises(ValueError, match="drafter.backend must be one of auto, native, hf; got 'natve'"):
        dspark.build_pipeline({"target": {"device": "cpu"}, "drafter": {"name": "draft_model", "num_speculative_tokens": 2,
                                                                      "random": spec, "backend": "natve"}},
                              target_model=tiny_hf_model("llama"))
    with pytest.raises(ValueError, match=r"\['num_hidden_layer'\] are not llama config keys"):
        dspark.build_pipeline({"target": {"device": "cpu"}, "drafter": {
            "name": "draft_model", "num_speculative_tokens": 2,
            "random": {**{k: v for k, v in spec.items() if k != "num_hidden_layers"}, "num_hidden_layer": 1}}},
            target_model=tiny_hf_model("llama"))
