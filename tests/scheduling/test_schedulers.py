"""The scheduler config section end to end: verified prefixes shrink, outputs do not change, and
bad settings are refused before any work."""

import pytest
import torch

import dspark
from dspark.scheduling import ThroughputProfile, register_scheduler

from helpers import fake_clock_scheduler, ragged_prompts, tiny_hf_model


def scheduled(target, scheduler: dict, drafter: str = "dspark", dtype: str = "float32"):
    if scheduler.get("name") in ("dspark", "adaptive"):  # decisions from wall time are not reproducible
        scheduler = {"measured_fallback": False, **scheduler}
    section = ({"name": "dspark", "num_speculative_tokens": 4, "path": None, "rank": 16} if drafter == "dspark"
               else {"name": drafter, "num_speculative_tokens": 4})
    return dspark.build_pipeline({"target": {"device": "cpu", "dtype": dtype}, "drafter": section,
                                  "scheduler": scheduler}, target_model=target)


@pytest.mark.parametrize("scheduler", ["threshold", "dspark", "dspark_tokens"])
def test_schedulers_verify_less_and_change_nothing(scheduler, tmp_path):
    target = tiny_hf_model("qwen3", scale=3.0)
    prompts = ragged_prompts(101, lengths=(5, 1, 9, 3))
    plain = dspark.build_pipeline({"target": {"device": "cpu"}, "drafter": "none"}, target_model=target)
    expected = plain.generate(prompts, max_new_tokens=20, ignore_eos=True).token_ids
    profile = tmp_path / "sps.json"
    ThroughputProfile([1, 4, 8, 12, 20], [1.0, 0.97, 0.9, 0.6, 0.25]).save(profile)
    section = {"threshold": {"name": "threshold", "threshold": 0.3},
               "dspark": {"name": "dspark", "profile": str(profile)},  # padded cost: whole depths
               "dspark_tokens": {"name": "dspark", "profile": str(profile), "cost": "tokens"}}[scheduler]
    result = scheduled(target, section).generate(prompts, max_new_tokens=20, ignore_eos=True)
    assert result.token_ids == expected
    assert 0 < result.stats.verified_tokens < result.stats.drafted_tokens


def test_when_verification_never_pays_the_dspark_scheduler_is_plain_decoding(tmp_path):
    target = tiny_hf_model("llama", scale=3.0)
    prompts = ragged_prompts(101, lengths=(4, 7))
    plain = dspark.build_pipeline({"target": {"device": "cpu"}, "drafter": "none"}, target_model=target)
    expected = plain.generate(prompts, max_new_tokens=12, ignore_eos=True).token_ids
    # doubling the forward (2 → 4 tokens) more than halves the step rate: no draft can pay even
    # at confidence 1, so no round drafts at all
    hopeless = tmp_path / "hopeless.json"
    ThroughputProfile([1, 2, 3], [1.0, 1.0, 0.4]).save(hopeless)
    result = scheduled(target, {"name": "dspark", "profile": str(hopeless)}).generate(
        prompts, max_new_tokens=12, ignore_eos=True)
    assert result.token_ids == expected
    assert result.stats.drafted_tokens == 0 and result.stats.mean_accepted_length == 1.0
    # a draft could pay if it were confident enough (2·SPS(4) > SPS(2)), but this random drafter's
    # never are: idle rounds back off, drafting in rounds 1, 3, 6, 11 of 11
    unlikely = tmp_path / "unlikely.json"
    ThroughputProfile([1, 2, 4], [1.0, 1.0, 0.55]).save(unlikely)
    result = scheduled(target, {"name": "dspark", "profile": str(unlikely)}).generate(
        prompts, max_new_tokens=12, ignore_eos=True)
    assert result.token_ids == expected and result.stats.verified_tokens == 0
    assert result.stats.rounds == 11 and result.stats.drafted_tokens == 4 * 2 * 4
    assert result.stats.predicted_tau == 1.0  # skipped rounds promise (and deliver) one token
    always = scheduled(target, {"name": "dspark", "profile": str(unlikely), "idle_backoff": 0}).generate(
        prompts, max_new_tokens=12, ignore_eos=True)
    assert always.token_ids == expected and always.stats.drafted_tokens == 11 * 2 * 4


register_scheduler("dspark_slow_drafts_test")(fake_clock_scheduler(4.0))
register_scheduler("dspark_cheap_drafts_test")(fake_clock_scheduler(0.5))


def test_the_measured_fallback_drafts_only_where_drafted_rounds_are_faster(tmp_path):
    target = tiny_hf_model("llama", scale=3.0)
    prompts = ragged_prompts(101, lengths=(4, 7, 2))
    plain = dspark.build_pipeline({"target": {"device": "cpu"}, "drafter": "none"}, target_model=target)
    expected = plain.generate(prompts, max_new_tokens=40, ignore_eos=True).token_ids
    profile = tmp_path / "sps.json"  # verification is free: every offered draft is verified
    ThroughputProfile([1, 1000], [1.0, 1.0]).save(profile)
    runs = {}
    for name in ("dspark_slow_drafts_test", "dspark_cheap_drafts_test"):
        pipe = scheduled(target, {"name": name, "profile": str(profile), "measured_fallback": True})
        stats = [pipe.generate(prompts, max_new_tokens=40, ignore_eos=True) for _ in range(2)]
        assert all(s.token_ids == expected for s in stats)
        runs[name] = [s.stats.drafted_tokens / (4 * 3 * s.stats.rounds) for s in stats]  # share of drafted rounds
    # a drafted round costs 4 plain ones: the random drafter's 1-2 tokens per round do not pay, so
    # after trying both, rounds are plain but for probes; at half the cost nearly every round drafts
    assert runs["dspark_slow_drafts_test"][1] < 0.25 < 0.9 < runs["dspark_cheap_drafts_test"][1]


def test_the_asynchronous_scheduler_takes_its_capacity_from_the_previous_round(tmp_path):
    from dspark.records import DraftProposal
    from dspark.scheduling import AsyncDSparkScheduler, survival, throughput_lengths
    from dspark.scheduling.schedulers import AsyncDSparkSchedulerConfig

    profile = tmp_path / "sps.json"
    ThroughputProfile([1, 2, 4, 6, 8], [1.0, 1.0, 0.9, 0.75, 0.5]).save(profile)  # best: depth 2 if sure
    scheduler = AsyncDSparkScheduler(AsyncDSparkSchedulerConfig(profile=str(profile), measured_fallback=False))
    active = torch.ones(2, dtype=torch.bool)

    def proposal(confidence):
        return DraftProposal(tokens=torch.zeros(2, 3, dtype=torch.long), num_tokens=torch.tensor([3, 3]),
                             confidence=torch.tensor(confidence, dtype=torch.float64))

    sure, unsure = proposal([[0.99, 0.99, 0.99], [0.99, 0.99, 0.99]]), proposal([[0.05, 0.1, 0.1], [0.04, 0.1, 0.1]])
    # first round: no capacity yet, the synchronous rule; the engine reads the width itself
    first = scheduler.schedule(sure, active)
    assert scheduler.known_width() is None
    assert first.tolist() == throughput_lengths(survival(sure.confidence), sure.num_tokens, active,
                                                scheduler.profile.sps, padded=True).tolist()
    found = throughput_lengths(survival(sure.confidence), sure.num_tokens, active, scheduler.profile.sps,
                               padded=True, early_stop=False).max()
    scheduler.summary_read(scheduler.round_summary().tolist())
    assert scheduler.capacity == int(found) == 2
    # second round: this round's drafts are unlikely, but the width was fixed by the last round
    assert scheduler.schedule(unsure, active).tolist() == [scheduler.capacity] * 2
    assert scheduler.known_width() == scheduler.capacity
    scheduler.summary_read(scheduler.round_summary().tolist())
    assert scheduler.capacity == 0  # … and they set the next round's capacity
    assert scheduler.schedule(sure, active).tolist() == [0, 0] and not scheduler.wants_drafts([True, True])
    scheduler.reset()
    assert scheduler.capacity is None and scheduler.round_summary() is None


@pytest.mark.slow
@pytest.mark.parametrize("cost", ["padded", "tokens"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])])
def test_the_compiled_choice_equals_the_eager_one(cost, device, tmp_path):
    """engine.compile compiles the dspark scheduler's choice (``Scheduler.compile``): on random
    confidences — sure and unsure rows, finished requests, proposals shorter than γ — it returns
    the eager scheduler's lengths exactly, early stop or the whole-path search alike."""
    from dspark.records import DraftProposal
    from dspark.scheduling import DSparkScheduler
    from dspark.scheduling.schedulers import DSparkSchedulerConfig

    profile = tmp_path / "sps.json"
    ThroughputProfile([1, 2, 4, 8, 16, 32], [1.0, 0.98, 0.9, 0.7, 0.45, 0.25]).save(profile)
    config = DSparkSchedulerConfig(profile=str(profile), cost=cost, measured_fallback=False)
    eager, compiled = DSparkScheduler(config), DSparkScheduler(config)
    compiled.compile(device)
    generator = torch.Generator().manual_seed(0)
    checked = set()
    for batch, gamma in ((1, 7), (5, 4)):
        for trial in range(6):
            confidence = torch.rand(batch, gamma, generator=generator, dtype=torch.float64) ** (0.1 + trial / 3)
            num_tokens = torch.randint(0, gamma + 1, (batch,), generator=generator)
            active = torch.rand(batch, generator=generator) < 0.8
            proposal = DraftProposal(tokens=torch.zeros(batch, gamma, dtype=torch.long, device=device),
                                     num_tokens=num_tokens.to(device), confidence=confidence.to(device))
            active = active.to(device)
            for early_stop in (True, False):
                expected = eager.lengths(proposal, active, early_stop=early_stop)
                assert torch.equal(compiled.lengths(proposal, active, early_stop=early_stop), expected)
                checked.add(tuple(expected.tolist()))
    assert len(checked) > 8  # the trials exercise different choices, not one answer


def test_the_load_bound_reads_the_cost_table(tmp_path):
    from dspark.scheduling import DSparkScheduler
    from dspark.scheduling.schedulers import DSparkSchedulerConfig

    profile = tmp_path / "sps.json"
    ThroughputProfile([1, 8, 16, 32, 64], [1.0, 1.0, 0.9, 0.4, 0.2]).save(profile)
    padded = DSparkScheduler(DSparkSchedulerConfig(profile=str(profile)))
    assert padded.any_draft_can_pay(8, 8)  # 16 tokens: 2 · 0.9 > 1.0
    assert not padded.any_draft_can_pay(16, 3)  # 32 tokens: 2 · 0.4 ≤ 0.9, however few are active
    assert not padded.any_draft_can_pay(4, 0)
    per_token = DSparkScheduler(DSparkSchedulerConfig(profile=str(profile), cost="tokens"))
    assert per_token.any_draft_can_pay(16, 3)  # 3 → 4 tokens costs nothing here


def test_bad_scheduler_settings_are_refused(tmp_path):
    target = tiny_hf_model("llama")
    with pytest.raises(ValueError, match="scheduler 'threshold' reads draft confidences, which the 'ngram' drafter"):
        scheduled(target, {"name": "threshold"}, drafter="ngram")
    with pytest.raises(Exception, match=r"scheduler.threshold must be in \[0, 1\], got 1.5"):
        scheduled(target, {"name": "threshold", "threshold": 1.5})
    profile = tmp_path / "sps.json"
    ThroughputProfile([1, 2], [1.0, 0.5], dtype="bfloat16").save(profile)
    with pytest.raises(ValueError, match=r"another set-up: dtype 'bfloat16' \(this run: 'float32'\)"):
        scheduled(target, {"name": "dspark", "profile": str(profile)})
    with pytest.raises(Exception, match="unknown key scheduler.treshold"):
        scheduled(target, {"name": "threshold", "treshold": 0.5})
    with pytest.raises(Exception, match="scheduler.cost must be 'padded' or 'tokens', got 'ragged'"):
        scheduled(target, {"name": "dspark", "cost": "ragged"})
    with pytest.raises(Exception, match="scheduler.idle_backoff must be >= 0"):
        scheduled(target, {"name": "dspark", "idle_backoff": -1})
    with pytest.raises(Exception, match="scheduler.fallback_window must be >= 2, got 1"):
        scheduled(target, {"name": "dspark", "fallback_window": 1})
    with pytest.raises(Exception, match="scheduler.fallback_probe_limit must be >= 1, got 0"):
        scheduled(target, {"name": "adaptive", "fallback_probe_limit": 0})


def test_profiling_measures_a_positive_cost_curve():
    from dspark.models import load_model
    from dspark.scheduling import profile_target

    target = load_model(tiny_hf_model("llama"))
    profile = profile_target(target, (1, 2, 4), context_length=16, repeats=2, model_name="tiny")
    assert profile.token_counts == [1, 2, 4] and all(s > 0 for s in profile.steps_per_second)
    assert profile.dtype == "float32" and profile.model == "tiny"
    assert torch.all(profile.sps(torch.tensor([1, 3, 100])) > 0)


def test_stats_compare_predicted_with_realised_tokens_per_round():
    target = tiny_hf_model("llama", scale=3.0)
    prompts = ragged_prompts(101, lengths=(4, 7, 2))
    confident = scheduled(target, {"name": "fixed"}).generate(prompts, max_new_tokens=12, ignore_eos=True).stats
    # predicted = Σ (1 + Σ_{j≤ℓ} a_j) over request-rounds, so per round it lies in [1, 1 + γ]
    assert confident.predicted_tau is not None and 1.0 <= confident.predicted_tau <= 5.0
    assert confident.predicted_tokens == pytest.approx(confident.predicted_tau * confident.target_forwards)
    blind = scheduled(target, {"name": "fixed"}, drafter="ngram").generate(prompts, max_new_tokens=12, ignore_eos=True)
    assert blind.stats.predicted_tau is None


def test_adaptive_scheduler_estimates_acceptance_from_earlier_rounds(tmp_path):
    from dspark.records import DraftProposal
    from dspark.scheduling import AdaptiveScheduler
    from dspark.scheduling.schedulers import AdaptiveSchedulerConfig

    profile = tmp_path / "sps.json"
    ThroughputProfile([1, 2, 4, 6, 8], [1.0, 1.0, 0.9, 0.6, 0.45]).save(profile)
    scheduler = AdaptiveScheduler(AdaptiveSchedulerConfig(profile=str(profile), decay=0.5))
    proposal = DraftProposal(tokens=torch.zeros(2, 3, dtype=torch.long), num_tokens=torch.tensor([3, 3]))
    active = torch.ones(2, dtype=torch.bool)
    assert scheduler.acceptance(3, "cpu").tolist() == [0.5, 0.5, 0.5]  # the prior, before any data
    # two requests verify 3 drafts: one accepts 2, one accepts 0 → reached (2, 1, 1), accepted (1, 1, 0)
    scheduler.record(torch.tensor([3, 3]), torch.tensor([2, 0]))
    assert scheduler.acceptance(3, "cpu").tolist() == pytest.approx([1.5 / 3, 1.5 / 2, 0.5 / 2])
    scheduler.record(torch.tensor([3, 3]), torch.tensor([3, 3]))  # decay 0.5: reached (3, 2.5, 2.5)
    assert scheduler.acceptance(3, "cpu").tolist() == pytest.approx([3.0 / 4, 3.0 / 3.5, 2.5 / 3.5])
    # the schedule reads only these estimates (the same for both requests), never this round's drafts
    lengths = scheduler.schedule(proposal, active)
    assert lengths[0] == lengths[1] and 1 <= lengths[0] <= 3
    # exploration: a cost table under which no estimate could pay for depth 1 — while position 1
    # has under one (decayed) observation, every offered request still verifies one draft
    ThroughputProfile([1, 2, 4, 8], [1.0, 0.5, 0.25, 0.125]).save(profile)
    cautious = AdaptiveScheduler(AdaptiveSchedulerConfig(profile=str(profile), decay=0.5))
    offered = DraftProposal(tokens=torch.zeros(2, 3, dtype=torch.long), num_tokens=torch.tensor([3, 0]))
    assert cautious.schedule(offered, active).tolist() == [1, 0]  # nothing known: explore (none offered: 0)
    cautious.record(torch.tensor([1, 0]), torch.tensor([0, 0]))  # reached[0] = 1
    assert cautious.schedule(offered, active).tolist() == [0, 0]
    cautious.record(torch.tensor([0, 0]), torch.tensor([0, 0]))  # decays to 0.5: stale again
    assert cautious.schedule(offered, active).tolist() == [1, 0]
    with pytest.raises(ValueError, match=r"scheduler.decay must be in \[0, 1\)"):
        AdaptiveSchedulerConfig(decay=1.0)


def test_adaptive_scheduler_keeps_what_it_learnt_when_proposals_narrow(tmp_path):
    """A drafter that stops early proposes narrower blocks in some rounds: the counts of the
    positions they share are kept (they were reset to the prior at every change of width)."""
    from dspark.scheduling import AdaptiveScheduler
    from dspark.scheduling.schedulers import AdaptiveSchedulerConfig

    profile = tmp_path / "sps.json"
    ThroughputProfile([1, 2, 4, 8], [1.0, 1.0, 0.9, 0.6]).save(profile)
    scheduler = AdaptiveScheduler(AdaptiveSchedulerConfig(profile=str(profile), decay=0.5))
    scheduler.acceptance(4, "cpu")
    scheduler.record(torch.tensor([4]), torch.tensor([4]))  # reached (1, 1, 1, 1), accepted (1, 1, 1, 1)
    learnt = scheduler.acceptance(4, "cpu").tolist()
    assert learnt == pytest.approx([0.75] * 4)
    assert scheduler.acceptance(3, "cpu").tolist() == pytest.approx(learnt[:3])  # a narrower round
    scheduler.record(torch.tensor([3]), torch.tensor([3]))  # positions 1-3 learn more, position 4 decays
    assert scheduler.acceptance(4, "cpu").tolist() == pytest.approx([2.0 / 2.5] * 3 + [1.0 / 1.5])
    assert scheduler.acceptance(6, "cpu").tolist()[4:] == [0.5, 0.5]  # a wider one: the new positions at the prior


@register_scheduler("observing_test")
class _ObservingScheduler(dspark.scheduling.Scheduler):
    """Verifies nothing and records what the engine reports of each drafted round."""

    seen: list = []

    def schedule(self, proposal, active):
        return torch.zeros_like(proposal.num_tokens)

    def observe(self, widest: int, offered: int) -> None:
        self.seen.append((widest, offered))


def test_drafts_of_finished_requests_are_not_reported_as_offered():
    """A finished request rides along in its slot, and a drafter may still propose for it; what the
    engine tells the scheduler (``observe``) counts the unfinished requests' drafts alone — else a
    round where nothing that could be verified was offered would look like one where verifying did
    not pay, and the idle back-off would skip drafting for no reason."""
    from dataclasses import replace
    from dspark.drafters import register_drafter
    from dspark.drafters.ngram import NgramDrafter

    @register_drafter("drafts_for_finished_test")
    class DraftsForFinished(NgramDrafter):  # proposes for finished rows only
        def propose(self, state, uniforms):
            proposal = super().propose(state, uniforms)
            return replace(proposal, num_tokens=torch.where(state.done, proposal.tokens.shape[1], 0))

    target = tiny_hf_model("qwen3", scale=2.0)
    pipe = dspark.build_pipeline({"target": {"device": "cpu"}, "scheduler": {"name": "observing_test"},
                                  "drafter": {"name": "drafts_for_finished_test", "num_speculative_tokens": 3}},
                                 target_model=target, overrides=["engine.batching=static"])
    _ObservingScheduler.seen.clear()
    pipe.generate(ragged_prompts(101, lengths=(4, 6)), max_new_tokens=[2, 8], ignore_eos=True)
    assert len(_ObservingScheduler.seen) >= 5  # rounds after the first request finished
    assert set(_ObservingScheduler.seen) == {(0, 0)}
