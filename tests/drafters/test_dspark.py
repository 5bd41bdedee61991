"""The DSpark block drafter: its context cache, its proposals, its losses, its checkpoints."""

import math

import pytest
import torch

import dspark
from dspark.drafters.block_model import BlockDrafter, BlockDrafterArgs
from dspark.drafters.dspark import load_block_drafter, save_block_drafter
from dspark.models import load_model
from dspark.training import load_train_config
from dspark.training.block_drafter import block_losses, check_loss_weights, position_weights

from helpers import ragged_prompts, tiny_hf_model


def block_pipeline(target_hf, head="markov", gamma=3, *overrides):
    return dspark.build_pipeline({"target": {"device": "cpu", "dtype": "float64"},
                                  "drafter": {"name": "dspark", "num_speculative_tokens": gamma, "path": None,
                                              "head": head, "rank": 16, "num_layers": 2}},
                                 target_model=target_hf, overrides=list(overrides))


@pytest.mark.parametrize("head, schedule, compiled, refilled", [
    ("none", "fixed", False, False), ("markov", "fixed", False, False), ("gated_markov", "fixed", False, False),
    ("rnn", "fixed", False, False), ("markov", "threshold", False, False), ("markov", "idle", False, False),
    ("markov", "fixed", False, True), ("markov", "idle", False, True),
    pytest.param("markov", "fixed", True, False, marks=pytest.mark.slow),
    pytest.param("rnn", "idle", True, True, marks=pytest.mark.slow)])
def test_context_cache_equals_recomputation_over_the_accepted_prefix(head, schedule, compiled, refilled, tmp_path):
    """After rounds with rejections, the drafter's context keys/values equal a from-scratch
    computation from the target's hidden states over the committed tokens (all but the anchor) —
    also when rounds verify nothing (``threshold``) or skip drafting (``idle``) and append their
    context lazily, when compiled rounds append it in the next round's draft call (flushed here),
    and when requests took the slots of finished ones (``refilled``: continuous batching, two slots)."""
    from dspark.scheduling import ThroughputProfile

    target_hf = tiny_hf_model("qwen3", scale=2.0)
    overrides = {"fixed": [], "threshold": ["scheduler.name=threshold", "scheduler.threshold=0.45"]}.get(schedule)
    if schedule == "idle":  # drafts pay only at confidence ≈ 1: rounds draft, verify nothing, back off
        counts = list(range(1, 33))
        ThroughputProfile(counts, [t ** -0.99 for t in counts]).save(tmp_path / "sps.json")
        overrides = ["scheduler.name=dspark", f"scheduler.profile={tmp_path / 'sps.json'}"]
    pipe = block_pipeline(target_hf, head, 3, *overrides, *(["engine.compile=true", "engine.trim_idle_slots=false"] if compiled else []),
                          *(["engine.max_batch_size=2"] if refilled else []))
    drafter = pipe.drafter
    prompts = ragged_prompts(101, lengths=(5, 9, 2, 7, 4) if refilled else (5, 9, 2))
    budgets = [6, 17, 9, 14, 11] if refilled else 17
    result = pipe.generate(prompts, max_new_tokens=budgets, temperature=1.0, seed=3, ignore_eos=True)
    assert result.stats.rounds >= 4
    state = pipe.engine._live.state  # each slot's last request: prompt and generated tokens
    if compiled:
        assert drafter._deferred is not None or drafter._pending  # the last round's context waits
        with torch.inference_mode():
            drafter.flush()
    # compiled kernels evaluate the float32 rotary angles' cos/sin themselves: float32-ulp differences
    atol = 1e-6 if compiled else 1e-9
    if schedule == "fixed":
        assert result.stats.accepted_tokens < result.stats.verified_tokens  # rejections
    else:  # rounds that verified nothing appended their context late (or not yet)
        assert result.stats.verified_tokens < result.stats.drafted_tokens
        assert schedule != "idle" or drafter._pending
    with torch.inference_mode():  # every row's context (rounds may have run over the first slots alone),
        drafter.use_rows(state.batch_size, state)  # the pending context appended first, as drafting would
    assert not drafter._pending
    target = pipe.target
    for b in range(state.batch_size):
        committed = state.tokens[b, :state.lengths[b] - 1].unsqueeze(0)  # the last token is the anchor
        length = committed.shape[1]
        assert drafter.cache.lengths[b].item() == length
        out = target(committed, target.new_cache(1, length), hidden_layers=drafter.hidden_layers, kv_len=length)
        positions = torch.arange(length).unsqueeze(0)
        features = drafter.net.context_features(out.hidden_states)
        expected = drafter.net.context_kv(features, target.rotary(positions, features.dtype))
        for layer, kv in enumerate(expected):
            assert torch.allclose(drafter.cache.keys[layer, b, :, :length], kv[0, :, 0].transpose(0, 1), atol=atol)
            assert torch.allclose(drafter.cache.values[layer, b, :, :length], kv[0, :, 1].transpose(0, 1), atol=atol)


def test_proposal_carries_processed_q_and_confidences():
    target_hf = tiny_hf_model("llama", scale=2.0)
    pipe = block_pipeline(target_hf, "rnn", 4)
    seen = []
    original = pipe.drafter.propose
    pipe.drafter.propose = lambda state, u: seen.append(original(state, u)) or seen[-1]
    pipe.generate([[5, 6, 7]], max_new_tokens=6, temperature=0.8, top_k=10, seed=1, ignore_eos=True)
    proposal = seen[0]
    assert proposal.probs.shape == (1, 4, 101) and torch.allclose(proposal.probs.sum(-1), torch.ones(1, 4, dtype=torch.float64))
    assert ((proposal.probs > 0).sum(-1) <= 10).all()  # the sampler's top-k applied to q
    picked = proposal.probs.gather(-1, proposal.tokens.unsqueeze(-1))
    assert (picked > 0).all()
    assert ((proposal.confidence > 0) & (proposal.confidence < 1)).all()


@pytest.mark.parametrize("head, table_mib", [("none", 128), ("markov", 128), ("markov", 0), ("gated_markov", 128),
                                             ("gated_markov", 0), ("rnn", 128)])
def test_drafting_equals_the_training_forward_on_its_own_drafts(head, table_mib):
    """Inference drafting (one block forward, then the head left to right on its own samples, with
    the Markov bias read from its precomputed table or ``W2ᵀ`` laid out for the matvecs) gives the
    distributions the training forward gives when teacher-forced with those same drafts: the head
    trained is the head that drafts."""
    from dspark.training.block_drafter import BlockDrafterModule
    from dspark.training.modules import OptimConfig

    target_hf = tiny_hf_model("qwen3", scale=2.0)
    target = load_model(target_hf, dtype="float32")
    torch.manual_seed(0)
    net = BlockDrafter(BlockDrafterArgs.for_target(target, gamma=4, num_layers=2, target_layers=(0, 1), head=head,
                                                   rank=16))
    with torch.no_grad():  # a trained-looking head: the sequential bias starts at zero otherwise
        for parameter in net.parameters():
            parameter.normal_(std=0.3)
    pipe = dspark.build_pipeline({"target": {"device": "cpu", "dtype": "float32"},
                                  "drafter": {"name": "dspark", "num_speculative_tokens": 4, "path": None,
                                              "bias_table_mib": table_mib}},
                                 target_model=target_hf, draft_model=net)
    uses_table = head in ("markov", "gated_markov") and table_mib > 0
    assert (pipe.drafter.bias_table is not None) == uses_table
    assert (pipe.drafter.projection_t is not None) == (head in ("markov", "gated_markov", "rnn") and not uses_table)
    seen = []
    original = pipe.drafter.propose
    pipe.drafter.propose = lambda state, u: seen.append((state.tokens[0, :state.lengths[0]].clone(),
                                                         original(state, u))) or seen[-1][1]
    pipe.generate([[5, 6, 7, 8, 9]], max_new_tokens=3, temperature=1.0, seed=2, ignore_eos=True)
    committed, proposal = seen[0]  # prompt + anchor, then γ drafts
    tokens = torch.cat([committed, proposal.tokens[0, :-1]]).unsqueeze(0)
    module = BlockDrafterModule(pipe.drafter.net, pipe.target, OptimConfig(), max_steps=1)
    with torch.no_grad():
        hidden, _ = module.target_pass(tokens)
        logits, confidence = module.draft_blocks(tokens, hidden, torch.tensor([[len(committed) - 1]]))
    assert torch.allclose(proposal.probs[0], logits[0, 0].softmax(-1), atol=1e-5)
    assert torch.allclose(proposal.confidence[0], confidence[0, 0], atol=1e-5)


@pytest.mark.parametrize("head", ["markov", "gated_markov"])
def test_bias_table_rows_are_the_per_step_markov_bias(head):
    """Row ``x`` of the precomputed table is ``W2·W1[x]``: the head's bias from it equals the one
    multiplied out each step (float64, every previous token), also through the gate."""
    target = load_model(tiny_hf_model("qwen3"), dtype="float64")
    torch.manual_seed(0)
    net = BlockDrafter(BlockDrafterArgs.for_target(target, gamma=3, num_layers=1, target_layers=(1,), head=head,
                                                   rank=8)).double()
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.normal_(std=0.3)
    table = net.bias_table()
    previous = torch.arange(net.args.vocab_size)
    hidden = torch.randn(len(previous), net.args.hidden_size, dtype=torch.float64)
    embedding = net.token_embedding(previous)
    expected, _ = net.head_bias(embedding, hidden, None)
    via_table, _ = net.head_bias(embedding, hidden, None, table_row=table[previous])
    assert table.shape == (net.args.vocab_size, net.args.vocab_size)
    assert torch.allclose(via_table, expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="only the markov and gated_markov heads have a bias table, not 'rnn'"):
        BlockDrafter(BlockDrafterArgs.for_target(target, gamma=3, num_layers=1, target_layers=(1,), head="rnn",
                                                 rank=8)).bias_table()


def test_bias_table_only_within_its_memory_budget():
    """The table is kept when V² entries fit ``bias_table_mib`` (101² float64 = 0.078 MiB here)."""
    target_hf = tiny_hf_model("qwen3")
    small = block_pipeline(target_hf, "markov", 3, "drafter.bias_table_mib=0.07").drafter
    assert small.bias_table is None and small.projection_t.shape == (16, 101)
    roomy = block_pipeline(target_hf, "markov", 3, "drafter.bias_table_mib=0.08").drafter
    assert roomy.bias_table.shape == (101, 101) and roomy.projection_t is None
    assert block_pipeline(target_hf, "rnn", 3).drafter.bias_table is None  # no table for the RNN head


def test_loss_terms_on_hand_made_distributions():
    p_target = torch.tensor([[0.5, 0.5, 0.0]])
    p_draft = torch.tensor([[0.25, 0.25, 0.5]])
    terms = block_losses(p_draft.log(), p_target.clamp_min(1e-30).log(), torch.tensor([0]), torch.tensor([0.5]))
    assert torch.allclose(terms["tv"], torch.tensor([1.0]), atol=1e-6)  # ‖p_d − p_t‖₁ = .25 + .25 + .5
    assert torch.allclose(terms["accept"], torch.tensor([0.5]), atol=1e-6)  # Σ min(p_d, p_t)
    assert torch.allclose(terms["ce"], torch.tensor([math.log(4)]), atol=1e-6)
    assert torch.allclose(terms["bce"], torch.tensor([math.log(2)]), atol=1e-6)  # c = 0.5 against label 0.5
    assert torch.allclose(terms["kl"], torch.tensor([math.log(2)]), atol=1e-6)  # Σ p_t log(p_t / p_d) = 2 · ½ log 2
    same = block_losses(p_target.clamp_min(1e-30).log(), p_target.clamp_min(1e-30).log(), torch.tensor([1]),
                        torch.tensor([0.9]))
    assert same["tv"].item() < 1e-6 and same["accept"].item() == pytest.approx(1.0)
    assert abs(same["kl"].item()) < 1e-6
    assert torch.allclose(position_weights(4), torch.exp(-torch.arange(4) / 4))


def test_loss_weights_are_checked_before_training():
    assert check_loss_weights(None) == {"ce": 0.1, "tv": 0.9, "conf": 1.0, "kl": 0.0}  # the paper's, KL off
    assert check_loss_weights({"kl": 1})["kl"] == 1.0
    with pytest.raises(ValueError, match=r"unknown loss_weights \['tvd'\]: the block drafter's terms are"):
        check_loss_weights({"tvd": 1.0})
    with pytest.raises(ValueError, match=r"loss_weights.ce must be a finite number >= 0, got -0.1"):
        check_loss_weights({"ce": -0.1})
    with pytest.raises(ValueError, match=r"loss_weights are all 0 .* nothing would train"):
        check_loss_weights({"ce": 0, "tv": 0, "conf": 0})
    with pytest.raises(ValueError, match=r"seq_len 4096 is longer than the teacher's max_position_embeddings \(2048\)"):
        load_train_config(None, ["kind=drafter", "teacher=dspark-tiny", "seq_len=4096"])
    with pytest.raises(ValueError, match=r"unknown loss_weights \['tvd'\]"):
        load_train_config(None, ["kind=drafter", "teacher=dspark-tiny", "loss_weights.tvd=1.0"])
    with pytest.raises(ValueError, match="the EAGLE-3 head trains on the soft cross-entropy to the target alone"):
        load_train_config(None, ["kind=drafter", "teacher=dspark-tiny", "model={architecture: eagle3}",
                                 "loss_weights.kl=1.0"])
    assert load_train_config(None, ["kind=drafter", "teacher=dspark-tiny", "model={architecture: eagle3}"])


def test_checkpoint_round_trip_and_refusal_for_another_target(tmp_path):
    target = load_model(tiny_hf_model("qwen3"))
    net = BlockDrafter(BlockDrafterArgs.for_target(target, gamma=3, num_layers=1, target_layers=(0, 2), head="markov", rank=8))
    save_block_drafter(net, tmp_path / "ok")
    loaded = load_block_drafter(tmp_path / "ok", target)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), loaded.state_dict().values()))

    wider = load_model(tiny_hf_model("qwen3", hidden_size=96))
    with pytest.raises(ValueError, match=r"trained for another target: hidden_size 64 \(target: 96\)"):
        load_block_drafter(tmp_path / "ok", wider)
    other_vocab = load_model(tiny_hf_model("qwen3", vocab_size=64))
    with pytest.raises(ValueError, match=r"vocab_size 101 \(target: 64\)"):
        load_block_drafter(tmp_path / "ok", other_vocab)
    shallow = load_model(tiny_hf_model("qwen3", num_hidden_layers=2))
    with pytest.raises(ValueError, match=r"target_num_layers 3 \(target: 2\)"):
        load_block_drafter(tmp_path / "ok", shallow)


def test_a_checkpoint_for_another_target_of_the_same_shape_is_loaded_with_a_warning(tmp_path, caplog):
    """The recorded target identity (what the training recipe writes) tells another model of the
    same shape apart — not the same model in another dtype."""
    from dspark.drafters.checkpoint import target_identity

    target = load_model(tiny_hf_model("qwen3"))
    net = BlockDrafter(BlockDrafterArgs.for_target(target, gamma=3, num_layers=1, target_layers=(0, 2), head="markov", rank=8))
    save_block_drafter(net, tmp_path / "ok", {"target_identity": target_identity(target)})
    load_block_drafter(tmp_path / "ok", target)
    load_block_drafter(tmp_path / "ok", load_model(tiny_hf_model("qwen3"), dtype=torch.bfloat16))
    assert "another target" not in caplog.text
    load_block_drafter(tmp_path / "ok", load_model(tiny_hf_model("qwen3", seed=1)))
    assert "was trained for another target of the same shape" in caplog.text


@pytest.mark.parametrize("key, value, stored", [("head", "rnn", "'markov'"), ("rank", 16, "8"),
                                                ("num_layers", 2, "1"), ("target_layers", [1, 2], r"\[0, 2\]")])
def test_config_keys_that_contradict_the_checkpoint_are_refused(tmp_path, key, value, stored):
    """Architecture keys shape a random drafter; with a checkpoint they must agree with it (a key
    silently overridden by the checkpoint would run another drafter than the config says)."""
    target_hf = tiny_hf_model("qwen3")
    target = load_model(target_hf)
    save_block_drafter(BlockDrafter(BlockDrafterArgs.for_target(target, gamma=3, num_layers=1, target_layers=(0, 2),
                                                                head="markov", rank=8)), tmp_path)
    config = {"name": "dspark", "num_speculative_tokens": 3, "path": str(tmp_path)}
    with pytest.raises(ValueError, match=rf"drafter.{key}=.* contradicts the checkpoint .* which has {key}={stored}: "
                                         r"architecture keys build a randomly initialised dspark drafter"):
        dspark.build_pipeline({"target": {"device": "cpu"}, "drafter": {**config, key: value}}, target_model=target_hf)
    agreeing = {"head": "markov", "rank": 8, "num_layers": 1, "target_layers": [0, 2]}[key]
    pipe = dspark.build_pipeline({"target": {"device": "cpu"}, "drafter": {**config, key: agreeing}}, target_model=target_hf)
    assert pipe.drafter.net.args.head == "markov"


def test_bad_drafter_settings():
    target_hf = tiny_hf_model("qwen3")
    with pytest.raises(ValueError, match=r"target_layers \[7\] are outside the target's layers 0..2"):
        dspark.build_pipeline({"target": {"device": "cpu"}, "drafter": {"name": "dspark", "path": None,
                               "target_layers": [0, 7]}}, target_model=target_hf)
    with pytest.raises(ValueError, match=r"drafter.bias_table_mib must be >= 0 \(0: never keep a bias table\), got -1"):
        dspark.build_pipeline({"target": {"device": "cpu"}, "drafter": {"name": "dspark", "path": None,
                               "bias_table_mib": -1}}, target_model=target_hf)
    with pytest.raises(ValueError, match="drafter.head must be one of none, markov, gated_markov, rnn"):
        dspark.build_pipeline({"target": {"device": "cpu"}, "drafter": {"name": "dspark", "path": None, "head": "lstm"}},
                              target_model=target_hf)
    target = load_model(target_hf)
    net = BlockDrafter(BlockDrafterArgs.for_target(target, gamma=3, num_layers=1, target_layers=(1,), head="none", rank=8))
    with pytest.raises(ValueError, match=r"num_speculative_tokens=5 exceeds the block size this drafter was built for \(3\)"):
        dspark.build_pipeline({"target": {"device": "cpu"}, "drafter": {"name": "dspark", "num_speculative_tokens": 5}},
                              target_model=target_hf, draft_model=net)


@pytest.mark.parametrize("key, value", [("num_layers", 0), ("num_layers", -1), ("intermediate_size", 0),
                                        ("intermediate_size", -2)])
def test_sizes_of_a_random_drafter_must_be_positive(key, value):
    """0 was silently taken for the default (a falsy ``or``), a negative size failed inside torch."""
    with pytest.raises(ValueError, match=rf"drafter.{key} must be an integer >= 1 \(null: the default\), got {value}"):
        dspark.build_pipeline({"target": {"device": "cpu"}, "drafter": {"name": "dspark", "path": None, key: value}},
                              target_model=tiny_hf_model("qwen3"))


def test_block_drafter_sizes_are_integers_and_none_is_the_default():
    target = load_model(tiny_hf_model("qwen3"))
    sizes = dict(gamma=3, num_layers=1, target_layers=(0,), head="markov", rank=8)
    for key, value in (("num_layers", True), ("intermediate_size", 2.5), ("intermediate_size", 0), ("gamma", 0)):
        with pytest.raises(ValueError, match=rf"{key} must be an integer >= 1, got {value}"):
            BlockDrafterArgs.for_target(target, **{**sizes, key: value})
    with pytest.raises(ValueError, match=r"rank must be an integer >= 1 \(W1 is used\), got -1"):
        BlockDrafterArgs.for_target(target, **{**sizes, "rank": -1})
    assert BlockDrafterArgs.for_target(target, **sizes, intermediate_size=None).intermediate_size == 112
