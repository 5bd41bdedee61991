"""The EAGLE-3 head: its pair cache, training-time test against inference drafting, the draft
vocabulary, checkpoints and bad input."""

import math

import pytest
import torch

import dspark
from dspark.drafters.eagle3 import load_eagle3, save_eagle3
from dspark.drafters.eagle_model import Eagle3Args, Eagle3Head
from dspark.models import load_model
from dspark.models.native import build_attention_mask
from dspark.training.eagle3 import Eagle3Module
from dspark.training.modules import OptimConfig

from helpers import ragged_prompts, tiny_hf_model


def eagle_pipeline(target_hf, gamma=3, *overrides, **drafter):
    return dspark.build_pipeline({"target": {"device": "cpu", "dtype": "float64"},
                                  "drafter": {"name": "eagle3", "num_speculative_tokens": gamma, "path": None,
                                              **drafter}},
                                 target_model=target_hf, overrides=list(overrides))


def sharpen(head: Eagle3Head, scale: float = 20.0) -> None:
    """Scale up a random head so its drafts depend visibly on its inputs."""
    with torch.no_grad():
        for p in head.parameters():
            if p.dim() == 2:
                p.mul_(scale)


def capture_proposals(pipe):
    seen = []
    original = pipe.drafter.propose
    pipe.drafter.propose = lambda state, u: seen.append(original(state, u)) or seen[-1]
    return seen


def test_training_time_test_equals_inference_drafting():
    """Teacher-forced unrolling on prompt + anchor + the drafted tokens gives the drafter's own q
    at every step (free-running and teacher-forced agree where the tokens agree)."""
    target_hf = tiny_hf_model("qwen3", scale=2.0)
    gamma = 5
    pipe = eagle_pipeline(target_hf, gamma)
    sharpen(pipe.drafter.head)
    seen = capture_proposals(pipe)
    prompt = [5, 17, 33, 2, 90, 41, 7]
    result = pipe.generate([prompt], max_new_tokens=2, temperature=1.0, seed=11, ignore_eos=True)
    proposal = seen[0]
    anchor = result.token_ids[0][0]
    sequence = torch.tensor([prompt + [anchor] + proposal.tokens[0].tolist() + [0]])  # one label slot past the drafts
    module = Eagle3Module(pipe.drafter.head, pipe.target, OptimConfig(), 1, anchors=1)
    hidden, _ = module.target_pass(sequence)
    logits, _ = module.draft_blocks(sequence, [h.double() for h in hidden], torch.tensor([[len(prompt)]]))
    q_training = torch.softmax(logits[0, 0], -1)  # [γ, V]
    assert torch.allclose(q_training, proposal.probs[0], atol=1e-9)
    # a different draft token at step 2 changes steps 3.. (the head reads its inputs)
    altered = sequence.clone()
    altered[0, len(prompt) + 2] = (altered[0, len(prompt) + 2] + 1) % 101
    logits_altered, _ = module.draft_blocks(altered, [h.double() for h in module.target_pass(altered)[0]],
                                            torch.tensor([[len(prompt)]]))
    assert torch.allclose(logits_altered[0, 0, :2], logits[0, 0, :2], atol=1e-9)
    assert not torch.allclose(logits_altered[0, 0, 2], logits[0, 0, 2], atol=1e-6)


@pytest.mark.parametrize("compiled, refilled", [(False, False), (False, True), pytest.param(True, False, marks=pytest.mark.slow)])
def test_pair_cache_equals_recomputation_over_the_accepted_prefix(compiled, refilled):
    """After rounds with rejections, the committed pair keys/values equal one causal pass over
    (target feature p, token p + 1) for every committed position but the anchor — also when
    compiled rounds append their pairs in the next round's draft call (flushed here), and when
    requests took the slots of finished ones (continuous batching, two slots)."""
    target_hf = tiny_hf_model("llama", scale=2.0)
    pipe = eagle_pipeline(target_hf, 3, *(["engine.compile=true", "engine.trim_idle_slots=false"] if compiled else []),
                          *(["engine.max_batch_size=2"] if refilled else []))
    drafter, target = pipe.drafter, pipe.target
    prompts = ragged_prompts(101, lengths=(5, 9, 2, 7, 4) if refilled else (5, 9, 2))
    result = pipe.generate(prompts, max_new_tokens=[6, 15, 9, 12, 10] if refilled else 15, temperature=1.0, seed=4,
                           ignore_eos=True)
    assert result.stats.accepted_tokens < result.stats.verified_tokens  # there were rejections
    if compiled:
        assert drafter._deferred is not None  # the last round's pairs wait for the next draft call
        with torch.inference_mode():
            drafter.flush()
    # compiled kernels evaluate the float32 rotary angles' cos/sin themselves: float32-ulp differences
    atol = 1e-6 if compiled else 1e-9
    layer = drafter.head.layer
    state = pipe.engine._live.state  # each slot's last request: prompt and generated tokens
    with torch.inference_mode():  # every row's pairs (rounds may have run over the first slots alone)
        drafter.use_rows(state.batch_size, state)
    for b in range(state.batch_size):
        tokens = state.tokens[b, :state.lengths[b]].unsqueeze(0)
        pairs = tokens.shape[1] - 1
        assert drafter.cache.lengths[b].item() == pairs
        out = target(tokens[:, :pairs], target.new_cache(1, pairs), hidden_layers=drafter.hidden_layers, kv_len=pairs)
        rope = target.rotary(torch.arange(pairs).unsqueeze(0), torch.float64)
        _, kv = layer.project_pair(target.embed_tokens(tokens[:, 1:]), drafter.head.fuse(out.hidden_states), rope)
        assert torch.allclose(drafter.cache.keys[0, b, :, :pairs], kv[0, :, 0].transpose(0, 1), atol=atol)
        assert torch.allclose(drafter.cache.values[0, b, :, :pairs], kv[0, :, 1].transpose(0, 1), atol=atol)


def test_round_commits_leave_the_last_pairs_output_for_the_next_draft():
    """After every round, the drafter's first feature for the next round is the layer's output at
    the last committed pair, as one causal pass over all pairs gives it (commit computes that one
    output only, not one per appended pair)."""
    target_hf = tiny_hf_model("llama", scale=2.0)
    pipe = eagle_pipeline(target_hf, 3)
    drafter, target, layer = pipe.drafter, pipe.target, pipe.drafter.head.layer
    after_commit, original = [], drafter.commit
    drafter.commit = lambda *a: (original(*a), after_commit.append((drafter.cache.lengths[0].item(),
                                                                   drafter.last_output[0].clone())))
    prompt = ragged_prompts(101, lengths=(6,))[0]
    result = pipe.generate([prompt], max_new_tokens=12, temperature=1.0, seed=5, ignore_eos=True)
    tokens = torch.tensor(prompt + result.token_ids[0]).unsqueeze(0)
    pairs = tokens.shape[1] - 1
    out = target(tokens[:, :pairs], target.new_cache(1, pairs), hidden_layers=drafter.hidden_layers, kv_len=pairs)
    features = drafter.head.fuse(out.hidden_states)
    q, kv = layer.project_pair(target.embed_tokens(tokens[:, 1:]), features,
                               target.rotary(torch.arange(pairs).unsqueeze(0), torch.float64))
    causal = build_attention_mask(torch.zeros(1, dtype=torch.long), pairs, pairs)
    d = layer.attend(features, q, kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2), causal)  # [1, pairs, H]
    appended = [length - before for (before, _), (length, _) in zip(after_commit, after_commit[1:])]
    assert max(appended) >= 3  # some rounds kept several pairs
    for length, last_output in after_commit:
        assert torch.allclose(last_output, d[0, length - 1], atol=1e-9)


def test_draft_vocabulary_puts_no_mass_outside_it():
    target_hf = tiny_hf_model("llama", scale=2.0)
    pipe = eagle_pipeline(target_hf, 3, draft_vocab_size=20)
    d2t = torch.randperm(101, generator=torch.Generator().manual_seed(0))[:20]
    pipe.drafter.head.set_draft_vocabulary(d2t)
    seen = capture_proposals(pipe)
    pipe.generate([[4, 8, 15, 16]], max_new_tokens=8, temperature=1.0, seed=2, ignore_eos=True)
    for proposal in seen:
        outside = torch.ones(101, dtype=torch.bool)
        outside[d2t] = False
        assert proposal.probs[..., outside].abs().max() == 0
        assert torch.isin(proposal.tokens, d2t).all()


def test_checkpoint_round_trip_and_bad_input(tmp_path):
    target = load_model(tiny_hf_model("qwen3"))
    head = Eagle3Head(Eagle3Args.for_target(target, gamma=3, target_layers=(0, 1, 1), draft_vocab_size=10))
    head.set_draft_vocabulary(torch.arange(10) * 3)
    save_eagle3(head, tmp_path / "eagle")
    loaded = load_eagle3(tmp_path / "eagle", target)
    assert torch.equal(loaded.d2t, torch.arange(10) * 3) and loaded.args == head.args
    with pytest.raises(ValueError, match=r"target_layers \[5\] are outside the target's layers 0..2"):
        Eagle3Args.for_target(target, gamma=3, target_layers=(0, 1, 5))
    with pytest.raises(ValueError, match="must name the target layers to fuse"):
        Eagle3Args.for_target(target, gamma=3, target_layers=())
    with pytest.raises(ValueError, match=r"d2t maps to target ids \[101\] outside the target's vocabulary \[0, 101\)"):
        head.set_draft_vocabulary(torch.tensor([101] + list(range(9))))
    with pytest.raises(ValueError, match="two draft ids to the same target id"):
        head.set_draft_vocabulary(torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match=r"draft_vocab_size must be in \[0, 101\]"):
        Eagle3Args.for_target(target, gamma=3, target_layers=(0, 1, 1), draft_vocab_size=500)
    other = load_model(tiny_hf_model("qwen3", hidden_size=48))
    with pytest.raises(ValueError, match="trained for another target: hidden_size 64 \\(target: 48\\)"):
        load_eagle3(tmp_path / "eagle", other)
    with pytest.raises(Exception, match="holds no 'block_drafter' drafter"):
        from dspark.drafters.dspark import load_block_drafter
        load_block_drafter(tmp_path / "eagle", target)
    # architecture keys are for random heads; with a checkpoint they must agree with it
    target_hf, path = tiny_hf_model("qwen3"), f"drafter.path={tmp_path / 'eagle'}"
    with pytest.raises(ValueError, match=r"drafter.draft_vocab_size=12 contradicts the checkpoint .* which has "
                                         r"draft_vocab_size=10: architecture keys build a randomly initialised"):
        eagle_pipeline(target_hf, 3, path, "drafter.draft_vocab_size=12")
    with pytest.raises(ValueError, match=r"drafter.target_layers=\[0, 2, 2\] contradicts .* target_layers=\[0, 1, 1\]"):
        eagle_pipeline(target_hf, 3, path, "drafter.target_layers=[0,2,2]")
    agreeing = eagle_pipeline(target_hf, 3, path, "drafter.target_layers=[0,1,1]", "drafter.draft_vocab_size=10")
    assert agreeing.drafter.head.args == head.args


@pytest.mark.parametrize("draft_vocab_size", [0, 60])
def test_a_few_training_steps_bring_the_head_closer_to_the_target(draft_vocab_size):
    """Also with a reduced draft vocabulary: the loss is then to the target restricted to it."""
    target = load_model(tiny_hf_model("qwen3", scale=2.0))
    head = Eagle3Head(Eagle3Args.for_target(target, gamma=3, target_layers=(0, 1, 1), draft_vocab_size=draft_vocab_size))
    if draft_vocab_size:
        head.set_draft_vocabulary(torch.arange(41, 101))
    module = Eagle3Module(head, target, OptimConfig(), 20, anchors=4)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2)
    batch = torch.randint(3, 101, (4, 33), generator=torch.Generator().manual_seed(0))
    losses, distances = [], []
    for _ in range(20):
        loss, weighted, *_ = module.step(batch, torch.Generator().manual_seed(1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        distances.append(weighted["tv"].item())
    # the soft cross-entropy is bounded below by the (high) entropy of this random target; the
    # distance to it, ‖p_draft − p_target‖₁, is what falls (with a draft vocabulary it cannot fall
    # below twice the target's mass outside it, here about 40% of the tokens)
    assert all(math.isfinite(v) for v in losses + distances)
    assert losses[-1] < losses[0] and distances[-1] < (0.5 if not draft_vocab_size else 1.0) * distances[0]


def test_the_draft_vocabulary_is_the_most_frequent_tokens():
    from dspark.training.eagle3 import frequent_tokens

    stream = torch.tensor([5, 5, 5, 2, 2, 9, 9, 7, 1])
    assert frequent_tokens(stream, 3, 12).tolist() == [2, 5, 9]  # 5 (×3), then 2 and 9 (×2)
    assert frequent_tokens(stream, 4, 12).tolist() == [1, 2, 5, 9]  # ties at one use: the lower id, 1


def test_confidence_is_the_heads_top_probability():
    """Without ``min_survival`` the proposal still carries, per draft, the largest entry of the
    softmax of the head's logits (what a confidence scheduler reads; uncalibrated) — not the
    drafted token's probability, which would let the choice to verify a draft depend on its value."""
    target_hf = tiny_hf_model("qwen3", scale=3.0)
    pipe = eagle_pipeline(target_hf, 3)
    seen = capture_proposals(pipe)
    pipe.generate(ragged_prompts(101, lengths=(4, 7)), max_new_tokens=6, ignore_eos=True)
    drafter = pipe.drafter
    proposal = seen[0]
    assert proposal.tokens.shape[1] == 3 and (proposal.num_tokens == 3).all()
    # recompute the first draft's probability from a fresh pipeline at the same point
    fresh = eagle_pipeline(target_hf, 3)
    original = fresh.drafter.propose
    firsts = []

    def first_logits(state, uniforms):
        firsts.append(torch.softmax(fresh.drafter.head.logits(fresh.drafter.last_output, fresh.drafter.target), -1))
        return original(state, uniforms)

    fresh.drafter.propose = first_logits
    fresh.generate(ragged_prompts(101, lengths=(4, 7)), max_new_tokens=6, ignore_eos=True)
    expected = firsts[0].amax(-1)
    torch.testing.assert_close(proposal.confidence[:, 0], expected.to(proposal.confidence.dtype))
    assert drafter.provides_confidence and ((proposal.confidence > 0) & (proposal.confidence <= 1)).all()


@pytest.mark.parametrize("value", [0, -3])
def test_the_intermediate_size_of_a_random_head_must_be_positive(value):
    """0 was silently taken for the target's width (a falsy ``or``), a negative one failed inside torch."""
    with pytest.raises(ValueError, match=rf"drafter.intermediate_size must be an integer >= 1 \(null: the target's "
                                         rf"MLP width\), got {value}"):
        eagle_pipeline(tiny_hf_model("qwen3"), intermediate_size=value)


def test_eagle3_sizes_are_integers_and_none_is_the_default():
    target = load_model(tiny_hf_model("qwen3"))
    for key, value, allowed in (("intermediate_size", True, ">= 1"), ("gamma", 1.5, ">= 1"),
                                ("draft_vocab_size", -1, r">= 0 \(0: the target's vocabulary\)")):
        with pytest.raises(ValueError, match=rf"{key} must be an integer {allowed}, got {value}"):
            Eagle3Args.for_target(target, **{"gamma": 3, "target_layers": (0, 1, 2), key: value})
    head_args = Eagle3Args.for_target(target, gamma=3, target_layers=(0, 1, 2), intermediate_size=None)
    assert head_args.intermediate_size == 112  # the target's
