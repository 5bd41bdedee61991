"""Metric definitions on hand-made acceptance traces."""

import torch

from dspark.stats import GenerationStats, RoundCounters, conditional_acceptance, mean_accepted_length


def test_tau_and_conditional_acceptance_of_a_known_trace():
    # one request, γ = 3, four rounds: (verified ℓ, accepted n)
    trace = [(3, 3), (3, 1), (3, 0), (2, 2)]
    counters = RoundCounters(batch=1, gamma=3, device="cpu")
    for ell, n in trace:
        counters.update(torch.tensor([False]), torch.tensor([ell]), torch.tensor([n]), torch.tensor([3]))
    stats = counters.stats([[0] * 10], wall=1.0, prefill=0.2)
    # position 1 reached in all 4 rounds, accepted in 3; position 2 reached in 3 (n>=1 and ℓ>=2), accepted in 2;
    # position 3 reached where ℓ>=3 and n>=2: only round 1, accepted there
    assert stats.reached_by_position == [4, 3, 1] and stats.accepted_by_position_counts == [3, 2, 1]
    assert stats.acceptance_by_position == [0.75, 2 / 3, 1.0]
    assert stats.mean_accepted_length == (6 + 4) / 4  # 6 accepted + one emitted token per forward
    assert stats.drafted_tokens == 12 and stats.verified_tokens == 11 and stats.accepted_tokens == 6
    assert stats.rounds == 4 and stats.target_forwards == 4


def test_finished_requests_do_not_count():
    counters = RoundCounters(batch=2, gamma=2, device="cpu")
    counters.update(torch.tensor([False, True]), torch.tensor([2, 0]), torch.tensor([1, 0]), torch.tensor([2, 2]))
    stats = counters.stats([[1, 2], [3]], wall=1.0, prefill=0.0)
    assert stats.target_forwards == 1 and stats.drafted_tokens == 2
    assert stats.per_request[1] == dict(generated=1, target_forwards=0, drafted=0, verified=0, accepted=0)


def test_helpers_and_merge():
    assert conditional_acceptance([2, 0], [1, 0]) == [0.5, None]
    assert mean_accepted_length(0, 0) == 0.0 and mean_accepted_length(3, 3) == 2.0
    a = GenerationStats(rounds=2, target_forwards=2, accepted_tokens=2, generated_tokens=4, wall_time_s=1.0,
                        reached_by_position=[2], accepted_by_position_counts=[2],
                        per_request=[dict(generated=4, target_forwards=2, drafted=2, verified=2, accepted=2)])
    b = GenerationStats(rounds=2, target_forwards=2, accepted_tokens=0, generated_tokens=2, wall_time_s=1.0,
                        reached_by_position=[2], accepted_by_position_counts=[0],
                        per_request=[dict(generated=2, target_forwards=2, drafted=2, verified=2, accepted=0)])
    merged = GenerationStats.merge([a, b])
    assert merged.mean_accepted_length == 1.5 and merged.acceptance_by_position == [0.5]
    assert merged.tokens_per_second == 3.0


def test_the_docs_define_the_metrics_as_the_bench_does():
    """docs/benchmarks.md shows dspark.stats.METRICS verbatim (the one definition every bench.md carries)."""
    from pathlib import Path

    from dspark.stats import metrics_markdown

    docs = (Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md").read_text()
    assert metrics_markdown() in docs


def test_tau_counts_the_tokens_kept_when_the_budget_ends_a_round():
    """A drafter that is the target itself has every draft accepted; a budget that ends a request
    inside a round drops the drafts past it, and τ counts the tokens kept — (generated − 1) per
    forward here (the first token comes from the prefill); acceptance by position leaves out the
    positions past the end (accepted, not needed), so its counts sum to the kept drafts and every
    position it counts was accepted."""
    import dspark

    tiny = ("{model_type: llama, vocab_size: 258, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, "
            "num_attention_heads: 2, num_key_value_heads: 1, head_dim: 16, max_position_embeddings: 512, seed: 0}")
    pipe = dspark.build_pipeline(None, overrides=[f"target.random={tiny}", "target.tokenizer=bytes", "target.device=cpu",
                                                  "drafter.name=draft_model", f"drafter.random={tiny}",
                                                  "drafter.num_speculative_tokens=4"])
    for budget in (3, 7, 12):
        stats = pipe.generate([[5, 6, 7, 8]], max_new_tokens=budget, ignore_eos=True).stats
        assert stats.generated_tokens == budget
        assert stats.mean_accepted_length == (budget - 1) / stats.target_forwards < 5.0
        assert sum(stats.accepted_by_position_counts) == stats.accepted_tokens
        assert stats.accepted_by_position_counts == stats.reached_by_position and stats.reached_by_position[0] > 0
