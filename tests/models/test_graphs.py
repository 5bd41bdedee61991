"""CUDA-graph replay of the round forward: bucketing, static buffers, and equality with eager rounds.

On the CPU the capture is the eager stand-in with the same static-output contract; the real CUDA
graphs run in the GPU-marked test (scripts/gpu_check.sh)."""

import pytest
import torch

from dspark.models.graphs import GraphedForward, GraphedFunction, eager_capture, graph_widths
from dspark.scheduling.schedulers import FixedScheduler
from helpers import ragged_prompts, tiny_hf_model
from test_speculative import PER_REQUEST, settings_per_request, spec_pipeline


def test_bucket_widths_end_at_the_round_width():
    assert graph_widths(8) == (1, 2, 4, 8)
    assert graph_widths(6) == (1, 2, 4, 6)
    assert graph_widths(1) == (1,)
    with pytest.raises(ValueError, match=">= 1"):
        graph_widths(0)


def graphed(pipe, capture=eager_capture):
    """Swap the engine's round forward (and the drafter's) for graphed ones, as engine.cuda_graphs
    does on CUDA."""
    engine = pipe.engine
    engine._round_forward = GraphedForward(engine.target, engine.drafter.gamma + 1, capture=capture)
    engine._static_shapes = True
    engine.trims_idle_slots = False  # (graphed rounds run over every slot)
    engine.drafter.use_graphs(capture)
    return engine._round_forward


@pytest.mark.parametrize("drafter", ["draft_model", "draft_model_adaptive", "draft_model_stop", "dspark",
                                     "dspark_scheduled", "eagle3", "eagle3_stop"])
def test_graphed_rounds_match_eager_rounds(drafter):
    """Greedy tokens equal plain decoding and sampled tokens equal the eager pipeline's; the
    scheduled drafter verifies prefixes of varying width, so several buckets are captured. The
    drafters replay their own forwards too — the draft model's catch-up and drafting steps (the
    adaptive scheduler skips rounds, so catch-ups are wider), DSpark's and EAGLE-3's round append
    fused with the next draft call — which advance the drafter's cache: a capture that left it
    advanced (the stand-in runs the function at capture and again at replay) would fail here."""
    target = tiny_hf_model("qwen3", scale=3.0)
    prompts = ragged_prompts(101, lengths=(5, 1, 9))
    expected = spec_pipeline(target, "none", 0).generate(prompts, max_new_tokens=12, ignore_eos=True).token_ids
    sampled = dict(max_new_tokens=12, temperature=1.0, seed=[1, 2, 3], ignore_eos=True)
    penalised = dict(repetition_penalty=1.5, presence_penalty=0.3, frequency_penalty=0.2)  # the drafters' running counts
    # the same calls in the same order (schedulers learn), rounds over every slot (as graphed ones)
    eager_pipe = spec_pipeline(target, drafter, 3, "engine.trim_idle_slots=false")
    eager_pipe.generate(prompts, max_new_tokens=12, ignore_eos=True)
    eager = eager_pipe.generate(prompts, **sampled).token_ids
    eager_penalised = eager_pipe.generate(prompts, **sampled, **penalised).token_ids
    # settings per request: two batches of them, then the first again (its graphs are replayed,
    # reading the settings they were captured with — equal ones)
    mixed = [settings_per_request(order) for order in (PER_REQUEST[:3], PER_REQUEST[2::-1], PER_REQUEST[:3])]
    eager_mixed = [eager_pipe.generate(prompts, max_new_tokens=12, seed=[1, 2, 3], ignore_eos=True, **m).token_ids
                   for m in mixed]
    # continuous batching: five requests through the three slots, admitted between graphed rounds
    more = ragged_prompts(101, lengths=(5, 1, 9, 4, 7), seed=5)
    refilled = dict(max_new_tokens=[12, 3, 5, 9, 4], temperature=1.0, seed=list(range(5)), ignore_eos=True)
    eager_pipe.engine.config.max_batch_size = 3
    eager_refilled = eager_pipe.generate(more, **refilled).token_ids
    pipe = spec_pipeline(target, drafter, 3)
    forward = graphed(pipe)
    assert pipe.generate(prompts, max_new_tokens=12, ignore_eos=True).token_ids == expected
    assert pipe.generate(prompts, **sampled).token_ids == eager
    assert pipe.generate(prompts, **sampled, **penalised).token_ids == eager_penalised
    assert [pipe.generate(prompts, max_new_tokens=12, seed=[1, 2, 3], ignore_eos=True, **m).token_ids
            for m in mixed] == eager_mixed
    assert 1 <= forward.num_graphs <= len(forward.widths)
    if drafter.startswith("dspark"):  # the block forward: one graph per sampling setting (penalties too)
        assert pipe.engine.drafter._draft_block.num_graphs == 5
    if drafter in ("dspark", "eagle3"):  # fused append + draft: per sampling setting (and verify width)
        assert pipe.engine.drafter._append_and_draft.num_graphs >= 2
    if drafter.startswith("draft_model"):
        assert pipe.engine.drafter._draft_steps.num_graphs >= 2 and pipe.engine.drafter._catch_up.num_graphs >= 1
    pipe.engine.config.max_batch_size = 3
    assert pipe.generate(more, **refilled).token_ids == eager_refilled


class EveryOtherRound(FixedScheduler):
    """Drafts in every other round: a drafted round's append, deferred to the next draft call,
    meets a round without drafts (whose target forward replays over the same static outputs)."""

    def __init__(self):
        super().__init__()
        self.rounds = 0

    def wants_drafts(self, active):
        self.rounds += 1
        return self.rounds % 2 == 1


def test_graphed_block_drafter_keeps_a_deferred_append_across_a_round_without_drafts():
    target = tiny_hf_model("qwen3", scale=3.0)
    prompts = ragged_prompts(101, lengths=(5, 1, 9))
    sampled = dict(max_new_tokens=16, temperature=1.0, seed=[1, 2, 3], ignore_eos=True)
    eager = spec_pipeline(target, "dspark", 3, "engine.trim_idle_slots=false")
    eager.engine.scheduler = EveryOtherRound()
    pipe = spec_pipeline(target, "dspark", 3)
    pipe.engine.scheduler = EveryOtherRound()
    graphed(pipe)
    assert pipe.generate(prompts, **sampled).token_ids == eager.generate(prompts, **sampled).token_ids
    with torch.inference_mode():
        for drafter in (eager.engine.drafter, pipe.engine.drafter):
            drafter.flush()
    context, expected = pipe.engine.drafter.cache, eager.engine.drafter.cache
    assert torch.equal(context.lengths, expected.lengths)
    # the context keys/values of every committed position (graphed forwards attend over the whole
    # cache, eager ones over a shorter prefix: equal up to float32 rounding)
    for b, length in enumerate(expected.lengths.tolist()):
        torch.testing.assert_close(context.buffer[:, b, ..., :length, :], expected.buffer[:, b, ..., :length, :],
                                   rtol=1e-4, atol=1e-5)


def test_graphed_function_keys_on_shapes_and_settings():
    calls = []

    def fn(x, scale):
        calls.append(scale)
        return x * scale, None

    graphed_fn = GraphedFunction(fn, capture=eager_capture)
    out, none = graphed_fn(torch.ones(2), 3)
    assert out.tolist() == [3.0, 3.0] and none is None
    again, _ = graphed_fn(torch.full((2,), 2.0), 3)
    assert again is out and out.tolist() == [6.0, 6.0]  # the static output, overwritten
    graphed_fn(torch.ones(3), 3)
    graphed_fn(torch.ones(2), 4)
    assert graphed_fn.num_graphs == 3
    graphed_fn.clear()
    assert graphed_fn.num_graphs == 0


def test_graphed_function_keeps_the_most_recently_used_graphs():
    captures = []

    def counting_capture(fn):
        captures.append(fn)
        return eager_capture(fn)

    graphed_fn = GraphedFunction(lambda x, scale: x * scale, capture=counting_capture, max_graphs=3)
    for scale in (1, 2, 3, 1, 4):  # 1 is used again before 4 arrives: 2 is the one dropped
        assert graphed_fn(torch.ones(2), scale).tolist() == [scale, scale]
    assert graphed_fn.num_graphs == 3 and len(captures) == 4
    assert graphed_fn(torch.ones(2), 1).tolist() == [1, 1] and len(captures) == 4  # kept
    assert graphed_fn(torch.ones(2), 2).tolist() == [2, 2] and len(captures) == 5  # dropped, captured again
    assert graphed_fn.num_graphs == 3
    with pytest.raises(ValueError, match="max_graphs must be >= 1"):
        GraphedFunction(lambda x: x, max_graphs=0)


def test_graphed_function_restores_what_it_preserves_after_a_capture():
    """Capturing runs the function more than once; state it advances in place comes out advanced
    once per call, the first included, when named in ``preserve`` (twice without)."""
    for preserve, after_first in ((True, [1, 2]), (False, [2, 4])):
        lengths = torch.zeros(2, dtype=torch.long)

        def advance(num_new):
            lengths.add_(num_new)
            return lengths * 10

        graphed_fn = GraphedFunction(advance, capture=eager_capture,
                                     preserve=(lambda: [lengths]) if preserve else None)
        graphed_fn(torch.tensor([1, 2]))
        assert lengths.tolist() == after_first
    out = graphed_fn(torch.tensor([1, 1]))  # a replay: once
    assert lengths.tolist() == [3, 5] and out.tolist() == [30, 50]


def test_capture_commits_nothing_and_outputs_are_static():
    target = tiny_hf_model("llama")
    pipe = spec_pipeline(target, "none", 0)
    model = pipe.engine.target
    cache = model.new_cache(2, 32)
    cache.set_lengths(torch.tensor([3, 5]))
    captures = []

    def counting_capture(fn):
        captures.append(fn)
        return eager_capture(fn)

    forward = GraphedForward(model, 4, capture=counting_capture)
    with torch.inference_mode():
        first = forward(torch.tensor([[1, 2, 3], [4, 5, 6]]), cache, torch.tensor([3, 1]), kv_len=32)
        assert cache.lengths.tolist() == [6, 6]  # the replay committed the real tokens only
        logits = first.logits.clone()
        forward(torch.tensor([[7, 8, 9], [1, 1, 1]]), cache, torch.tensor([1, 1]), kv_len=32)
    assert len(captures) == 1  # both forwards fell in the width-4 bucket
    assert not torch.equal(first.logits, logits)  # the second replay overwrote the static output
    with pytest.raises(ValueError, match="kv_len must be cache.max_len"):
        forward(torch.tensor([[1]]), cache, torch.tensor([1]), kv_len=16)
    with pytest.raises(ValueError, match="wider than the widest graph"):
        forward(torch.ones(2, 5, dtype=torch.long), cache, torch.tensor([5, 5]), kv_len=32)


def test_cuda_graphs_need_a_cuda_target():
    target = tiny_hf_model("llama")
    with pytest.raises(ValueError, match="engine.cuda_graphs needs a CUDA target"):
        spec_pipeline(target, "ngram", 3, "engine.cuda_graphs=true")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("drafter", ["ngram", "dspark", "eagle3", "draft_model"])
def test_cuda_graph_rounds_match_eager_on_gpu(drafter):
    import dspark

    target = tiny_hf_model("qwen3", scale=3.0)
    prompts = ragged_prompts(101, lengths=(5, 1, 9))

    def pipe(*overrides):
        section = {"name": drafter, "num_speculative_tokens": 3}
        if drafter == "dspark":
            section.update(path=None, head="markov", rank=16)
        if drafter == "eagle3":
            section.update(path=None)
        draft = tiny_hf_model("qwen3", seed=7, scale=3.0, num_hidden_layers=1) if drafter == "draft_model" else None
        return dspark.build_pipeline({"target": {"device": "cuda"}, "drafter": section}, target_model=target,
                                     draft_model=draft, overrides=list(overrides))

    full = "engine.trim_idle_slots=false"  # (eager rounds over every slot, as graphed ones)
    expected = pipe(full).generate(prompts, max_new_tokens=16, ignore_eos=True).token_ids
    graphs = pipe("engine.cuda_graphs=true")
    assert graphs.generate(prompts, max_new_tokens=16, ignore_eos=True).token_ids == expected
    sampled = dict(max_new_tokens=16, temperature=1.0, seed=[1, 2, 3], ignore_eos=True)
    assert graphs.generate(prompts, **sampled).token_ids == pipe(full).generate(prompts, **sampled).token_ids
    assert graphs.engine._round_forward.num_graphs >= 1
