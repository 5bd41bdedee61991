"""Speculative decoding end to end, for every drafter: greedy equivalence with autoregressive
decoding, batch invariance, and the statistical check that sampling keeps the target's distribution."""

import itertools
import json
import math
import tempfile
from pathlib import Path

import pytest
import torch

import dspark
from dspark.drafters import register_drafter
from dspark.drafters.eagle3 import Eagle3Drafter
from dspark.scheduling import ThroughputProfile, register_scheduler
from dspark.verifiers import ChainVerifier, register_verifier
from dspark.records import VerificationResult

from helpers import chi_square_p_value, fake_clock_scheduler, ragged_prompts, tiny_hf_model

DRAFTERS = ["none", "ngram", "ngram_periodic", "draft_model", "draft_model_self", "draft_model_stop", "draft_model_calibrated", "early_exit", "dspark", "dspark_matvec", "dflash", "dspark_rnn", "dspark_deepspec", "dflash_deepspec", "dflash_zlab", "dflash_zlab", "eagle3", "eagle3_published_forms",
            "eagle3_draft_vocab", "eagle3_stop", "eagle3_scheduled", "eagle3_calibrated", "dspark_threshold",
            "dspark_scheduled", "dspark_idle", "dspark_measured", "dspark_async", "ngram_adaptive", "draft_model_adaptive"]
# the DSpark drafter with a confidence scheduler: verify a prefix chosen by a threshold, or by the
# hardware-aware scheduler over a fixed cost table (written once; a measured table would make the
# tests depend on machine speed)
PROFILE = Path(tempfile.mkdtemp()) / "sps.json"
ThroughputProfile([1, 8, 16, 64, 5000, 10000, 20000], [1.0, 0.95, 0.7, 0.2, 0.2, 0.15, 0.08]).save(PROFILE)
# SPS ∝ tokens^-0.99: a draft could pay only at confidence ≈ 1, so rounds draft (the load bound
# passes), verify nothing, and back off into plain decoding steps
IDLE_PROFILE = PROFILE.with_name("idle_sps.json")
IDLE_COUNTS = list(range(1, 65)) + [5000, 10000, 20000]
ThroughputProfile(IDLE_COUNTS, [t ** -0.99 for t in IDLE_COUNTS]).save(IDLE_PROFILE)
# the measured fallback on a fake clock (a drafted round costs 1.25 plain ones): deterministic switching
register_scheduler("dspark_fake_clock_test")(fake_clock_scheduler(1.25))




def calibration_file(vocab_size: int) -> Path:
    """An EAGLE-3 calibration with distinct greedy and sampling maps (Platt: temperatures and
    shifts), the shifts centred on log V so that a random head's near-uniform top probabilities
    (≈ 1/V) map to around one half whatever the vocabulary."""
    path, shift = PROFILE.with_name(f"calibration_{vocab_size}.json"), math.log(vocab_size) - 1
    path.write_text(json.dumps({
        "temperatures": [0.8, 1.3, 0.9, 1.0, 1.2, 0.9, 1.1], "biases": [shift + d for d in (-1, 0.5, -0.5, 0, -1.5, 0.5, 0)],
        "greedy": {"temperatures": [1.1, 0.9, 1.0, 1.05, 0.95, 1.0, 1.1],
                   "biases": [shift + d for d in (1.3, 0.3, 0.2, 1.2, 1.4, 1.0, 1.5)]}}))
    return path


# calibrated survival below which the eagle3_calibrated variant stops drafting (here: after 2 to 7 drafts in
# the greedy checks, after 0, 2 or 3 in the chi-square check)
CALIBRATED_MIN_SURVIVAL = 0.25
# wall-clock decisions (scheduler.measured_fallback=true) would make sampled outputs machine-dependent
SCHEDULED = {"dspark_threshold": ["scheduler.name=threshold", "scheduler.threshold=0.5"],
             "dspark_scheduled": ["scheduler.name=dspark", f"scheduler.profile={PROFILE}", "scheduler.measured_fallback=false"],
             "dspark_idle": ["scheduler.name=dspark", f"scheduler.profile={IDLE_PROFILE}", "scheduler.measured_fallback=false"],
             "dspark_measured": ["scheduler.name=dspark_fake_clock_test", f"scheduler.profile={PROFILE}"],
             "dspark_async": ["scheduler.name=dspark_async", f"scheduler.profile={PROFILE}",
                              "scheduler.measured_fallback=false"]}
# drafters without confidences under the adaptive scheduler (acceptance estimated from earlier rounds)
ADAPTIVE = ["scheduler.name=adaptive", f"scheduler.profile={PROFILE}", "scheduler.measured_fallback=false"]
BLOCK_HEADS = {"dspark": "markov", "dflash": "none", "dspark_rnn": "rnn"}
# block drafter variants: the scheduled ones, and the Markov head multiplying by W2 each step
# rather than reading its precomputed bias table (which the tiny vocabulary gets by default)
BLOCK_VARIANTS = {**SCHEDULED, "dspark_matvec": ["drafter.bias_table_mib=0"],
                  # the forms DeepSeek's released drafters take (context into the keys/values without the
                  # input norm, per-head q/k norms; a confidence head over h_k alone, or none and no W1)
                  "dspark_deepspec": ["drafter.context_input_norm=false", "drafter.confidence=hidden",
                                      "drafter.qk_norm=true"],
                  "dflash_deepspec": ["drafter.head=none", "drafter.rank=0", "drafter.confidence=none",
                                      "drafter.context_input_norm=false", "drafter.qk_norm=true"],
                  # z-lab's DFlash: the block is [anchor, mask × γ], each mask position drafts its own token
                  "dflash_zlab": ["drafter.head=none", "drafter.rank=0", "drafter.confidence=none",
                                  "drafter.context_input_norm=false", "drafter.qk_norm=true", "drafter.anchor_predicts=false"]}
# the EAGLE-3 head in the forms published heads take: five fused layers, q/k norms, the normalised
# feature as the residual stream
EAGLE_PUBLISHED_FORMS = ["drafter.qk_norm=true", "drafter.norm_before_residual=true", "drafter.target_layers=[0,1,1,0,1]"]


def spec_pipeline(target, drafter: str, gamma: int, *overrides, draft=None):
    if drafter == "none":
        section = {"name": "none"}
    elif drafter.endswith("_adaptive"):
        return spec_pipeline(target, drafter.removesuffix("_adaptive"), gamma, *ADAPTIVE, *overrides, draft=draft)
    elif drafter in ("ngram", "ngram_periodic"):
        section = {"name": "ngram", "num_speculative_tokens": gamma, "min_n": 1, "max_n": 3,
                   "periodic": drafter == "ngram_periodic"}
    elif drafter == "early_exit":  # the target's first layer (of 2 or 3) drafts
        section = {"name": "early_exit", "num_speculative_tokens": gamma, "exit_layer": 1}
    elif drafter in BLOCK_HEADS or drafter in BLOCK_VARIANTS:  # a randomly initialised block drafter
        section = {"name": "dspark", "num_speculative_tokens": gamma, "path": None,
                   "head": BLOCK_HEADS.get(drafter, "markov"), "rank": 16}
        overrides = (*BLOCK_VARIANTS.get(drafter, ()), *overrides)
    elif drafter.startswith("eagle3"):  # a randomly initialised EAGLE-3 head (optionally a half-size draft vocabulary)
        section = {"name": "eagle3", "num_speculative_tokens": gamma, "path": None,
                   "draft_vocab_size": target.config.vocab_size // 2 if drafter.endswith("draft_vocab") else 0}
        if drafter == "eagle3_stop":  # drafting stops per request where the head's survival falls below
            section["min_survival"] = (2 / target.config.vocab_size) ** 2  # (2/V)²: here after 0 to 7 drafts
        if drafter == "eagle3_scheduled":  # the hardware-aware scheduler over the head's confidences
            overrides = (*SCHEDULED["dspark_scheduled"], *overrides)
        if drafter == "eagle3_published_forms":
            overrides = (*EAGLE_PUBLISHED_FORMS, *overrides)
        if drafter == "eagle3_calibrated":  # calibrated confidences: stopping early on them, then the scheduler
            section.update(calibration=str(calibration_file(target.config.vocab_size)),
                           min_survival=CALIBRATED_MIN_SURVIVAL)
            overrides = (*SCHEDULED["dspark_scheduled"], *overrides)
    else:
        section = {"name": "draft_model", "num_speculative_tokens": gamma}
        if drafter == "draft_model_stop":  # as eagle3_stop, over the draft model's top probabilities
            section["min_survival"] = (2 / target.config.vocab_size) ** 2
        if drafter == "draft_model_calibrated":  # as eagle3_calibrated
            section.update(calibration=str(calibration_file(target.config.vocab_size)),
                           min_survival=CALIBRATED_MIN_SURVIVAL)
            overrides = (*SCHEDULED["dspark_scheduled"], *overrides)
        if draft is None:
            draft = target if drafter == "draft_model_self" else tiny_hf_model(
                target.config.model_type, seed=7, scale=3.0, num_hidden_layers=1)
    uses_draft = section["name"] == "draft_model"
    return dspark.build_pipeline({"target": {"device": "cpu"}, "drafter": section}, target_model=target,
                                 draft_model=draft if uses_draft else None, overrides=list(overrides))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("gamma", [1, 3, 7])
@pytest.mark.parametrize("drafter", DRAFTERS[1:])
def test_greedy_speculative_equals_autoregressive(family, gamma, drafter):
    target = tiny_hf_model(family, scale=3.0)
    prompts = ragged_prompts(target.config.vocab_size, lengths=(5, 1, 9, 3, 14))
    expected = spec_pipeline(target, "none", 0).generate(prompts, max_new_tokens=24, ignore_eos=True).token_ids
    result = spec_pipeline(target, drafter, gamma).generate(prompts, max_new_tokens=24, ignore_eos=True)
    assert result.token_ids == expected
    if drafter == "draft_model_self":  # the target drafting for itself: everything is accepted
        assert result.stats.acceptance_by_position[0] == 1.0
        assert result.stats.mean_accepted_length > min(gamma, 3)


@pytest.mark.parametrize("drafter", [d for d in DRAFTERS if d not in (  # load-aware, or learning from the batch
    "dspark_scheduled", "dspark_idle", "dspark_measured", "dspark_async", "ngram_adaptive",
    "draft_model_adaptive", "eagle3_scheduled", "eagle3_calibrated", "draft_model_calibrated")])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_batch_invariance_float64(drafter, temperature):
    target = tiny_hf_model("qwen3", scale=2.0)
    pipe = spec_pipeline(target, drafter, 3, "target.dtype=float64")
    prompts = ragged_prompts(101, lengths=(4, 9, 2, 6))
    seeds = [21, 22, 23, 24]
    batched = pipe.generate(prompts, max_new_tokens=14, temperature=temperature, seed=seeds, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        alone = pipe.generate([prompt], max_new_tokens=14, temperature=temperature, seed=[seeds[i]], ignore_eos=True)
        assert alone.token_ids[0] == batched.token_ids[i]


@pytest.mark.parametrize("drafter", ["none", "ngram", "draft_model", "draft_model_stop", "dspark", "dflash", "eagle3",
                                     "eagle3_stop"])
def test_batch_invariance_with_penalties(drafter):
    """A request's penalties read its own history only: batched = alone, sampled, float64."""
    target = tiny_hf_model("qwen3", scale=2.0)
    pipe = spec_pipeline(target, drafter, 3, "target.dtype=float64")
    prompts = ragged_prompts(101, lengths=(4, 9, 2, 6))
    settings = dict(max_new_tokens=14, temperature=1.0, ignore_eos=True, repetition_penalty=1.8,
                    presence_penalty=0.5, frequency_penalty=0.7)
    batched = pipe.generate(prompts, seed=[21, 22, 23, 24], **settings)
    for i, prompt in enumerate(prompts):
        assert pipe.generate([prompt], seed=[21 + i], **settings).token_ids[0] == batched.token_ids[i]


# four requests, four settings: top-k sampling, greedy with a repetition penalty, nucleus with min-p
# and bigram bans, hot with presence / frequency penalties, a logit bias and trigram bans
PER_REQUEST = [dict(temperature=1.0, top_k=5), dict(repetition_penalty=1.5),
               dict(temperature=0.7, top_p=0.8, min_p=0.05, no_repeat_ngram_size=2),
               dict(temperature=1.3, presence_penalty=0.5, frequency_penalty=0.3, logit_bias={3: 2.0, 5: -1.0},
                    no_repeat_ngram_size=3)]


def settings_per_request(requests: list[dict]) -> dict:
    """``generate``'s keyword arguments giving request i the settings ``requests[i]`` (a list per
    setting; the others at ``generate``'s defaults)."""
    defaults = dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0,
                    frequency_penalty=0.0, no_repeat_ngram_size=0, logit_bias=None)
    return {name: [request.get(name, default) for request in requests] for name, default in defaults.items()}


@pytest.mark.parametrize("drafter", ["none", "ngram", "draft_model", "draft_model_stop", "dspark", "dflash", "dspark_rnn",
                                     "eagle3", "eagle3_stop", "eagle3_draft_vocab", "dspark_threshold"])
def test_settings_per_request_decode_each_request_as_alone(drafter):
    """Requests asking for different settings (a greedy one among sampled ones) share a batch, each
    decoded exactly as alone with its own settings: float64, token for token."""
    target = tiny_hf_model("qwen3", scale=2.0)
    pipe = spec_pipeline(target, drafter, 3, "target.dtype=float64")
    prompts = ragged_prompts(101, lengths=(4, 9, 2, 6))
    batched = pipe.generate(prompts, max_new_tokens=14, seed=[21, 22, 23, 24], ignore_eos=True,
                            **settings_per_request(PER_REQUEST))
    for i, prompt in enumerate(prompts):
        alone = pipe.generate([prompt], max_new_tokens=14, seed=[21 + i], ignore_eos=True, **PER_REQUEST[i])
        assert alone.token_ids[0] == batched.token_ids[i]
    greedy = spec_pipeline(target, "none", 0, "target.dtype=float64").generate(
        prompts[1:2], max_new_tokens=14, ignore_eos=True, **PER_REQUEST[1])
    assert batched.token_ids[1] == greedy.token_ids[0]  # the greedy request: plain greedy decoding's tokens


@pytest.mark.parametrize("drafter", ["none", "ngram", "draft_model", "draft_model_stop", "dspark", "eagle3",
                                     "eagle3_stop", "dspark_threshold"])  # (batch-invariant ones: not load-aware)
def test_a_budget_per_request(drafter):
    """``max_new_tokens=[...]``: each request stops at its own budget, inside a round's accepted
    drafts too, and decodes as it does alone (float64, sampled; greedy: a prefix of a longer run)."""
    target = tiny_hf_model("qwen3", scale=2.0)
    pipe = spec_pipeline(target, drafter, 3, "target.dtype=float64")
    prompts, budgets = ragged_prompts(101, lengths=(4, 9, 2, 6)), [3, 11, 1, 7]
    sampled = pipe.generate(prompts, max_new_tokens=budgets, temperature=1.0, seed=[5, 6, 7, 8], ignore_eos=True)
    assert [len(ids) for ids in sampled.token_ids] == budgets
    for i, prompt in enumerate(prompts):
        alone = pipe.generate([prompt], max_new_tokens=budgets[i], temperature=1.0, seed=[5 + i], ignore_eos=True)
        assert alone.token_ids[0] == sampled.token_ids[i]
    longest = pipe.generate(prompts, max_new_tokens=11, ignore_eos=True).token_ids
    greedy = pipe.generate(prompts, max_new_tokens=budgets, ignore_eos=True).token_ids
    assert greedy == [ids[:budget] for ids, budget in zip(longest, budgets)]


@pytest.mark.parametrize("drafter", ["none", "ngram", "draft_model", "dspark", "eagle3", "eagle3_stop"])
def test_stop_settings_per_request_decode_each_request_as_alone(drafter):
    """Stop tokens, ``min_new_tokens`` and ``ignore_eos`` per request (EOS set to a token that
    occurs): batched = alone, sampled, float64; and the stops matter."""
    target = tiny_hf_model("qwen3", scale=2.0)
    pipe = spec_pipeline(target, drafter, 3, "target.dtype=float64")
    prompts, seeds = ragged_prompts(101, lengths=(4, 9, 2, 6)), [21, 22, 23, 24]
    free = pipe.generate(prompts, max_new_tokens=14, temperature=1.0, seed=seeds, ignore_eos=True).token_ids
    pipe.engine.eos_token_ids = (free[3][3],)
    requests = [dict(stop_token_ids=[free[0][5]], min_new_tokens=7, ignore_eos=False),
                dict(stop_token_ids=None, min_new_tokens=0, ignore_eos=True),
                dict(stop_token_ids=[free[2][4], free[2][1]], min_new_tokens=0, ignore_eos=False),
                dict(stop_token_ids=None, min_new_tokens=2, ignore_eos=False)]
    batched = pipe.generate(prompts, max_new_tokens=14, temperature=1.0, seed=seeds,
                            **{name: [r[name] for r in requests] for name in requests[0]}).token_ids
    for i, prompt in enumerate(prompts):
        alone = pipe.generate([prompt], max_new_tokens=14, temperature=1.0, seed=[seeds[i]], **requests[i])
        assert alone.token_ids[0] == batched[i]
    assert batched[1] == free[1] and len(batched[2]) <= 5 and len(batched[3]) <= 4


def test_eos_inside_accepted_drafts_stops_there():
    target = tiny_hf_model("llama", scale=3.0)
    prompts = ragged_prompts(101, lengths=(4, 6))
    free = spec_pipeline(target, "none", 0).generate(prompts, max_new_tokens=20, ignore_eos=True).token_ids
    eos = free[0][5]
    pipe = spec_pipeline(target, "draft_model_self", 7)  # accepts everything: EOS lands mid-round
    pipe.engine.eos_token_ids = (eos,)
    got = pipe.generate(prompts, max_new_tokens=20).token_ids
    for full, ids in zip(free, got):
        assert ids == full[: full.index(eos) + 1] if eos in full else ids == full


@pytest.mark.parametrize("drafter", ["draft_model", "ngram", "dspark", "eagle3"])
def test_triton_kernels_decode_the_twins_tokens(drafter):
    """The verification and commit kernels (Triton, interpreted here) and their torch twins give the
    same tokens for the same seeds — greedy equal to autoregressive, and sampled token for token —
    so every statistical check of the twins covers the kernels as well."""
    from dspark.kernels import use_backend

    target = tiny_hf_model("qwen3", scale=3.0)
    prompts = ragged_prompts(101, lengths=(5, 1, 9, 3))
    pipe = spec_pipeline(target, drafter, 3)
    expected = spec_pipeline(target, "none", 0).generate(prompts, max_new_tokens=10, ignore_eos=True).token_ids
    sampled = dict(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=list(range(16)), ignore_eos=True)
    with use_backend("torch"):
        twin = pipe.generate(prompts * 4, **sampled).token_ids
    with use_backend("triton"):
        assert pipe.generate(prompts, max_new_tokens=10, ignore_eos=True).token_ids == expected
        assert pipe.generate(prompts * 4, **sampled).token_ids == twin


# ---------------------------------------------------------------- statistical losslessness

VOCAB = 12
PROMPT = [3, 7, 1]


def tiny_pair():
    target = tiny_hf_model("llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=2,
                           num_key_value_heads=1, head_dim=16, scale=12.0, eos_token_id=None)
    draft = tiny_hf_model("llama", seed=3, vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_hidden_layers=1, scale=12.0,
                          eos_token_id=None)
    return target, draft


def penalised(logits: torch.Tensor, seqs: torch.Tensor, params) -> torch.Tensor:
    """The penalties written out token by token: ``logits[n, t]`` (after ``seqs[n, :t+1]``) with the
    logit bias added, then the repetition penalty on tokens of the prompt or the output so far, the frequency and presence
    penalties on the output's counts (vLLM's definitions), and −∞ for a token that would repeat an
    n-gram of the sequence (transformers' ``no_repeat_ngram_size``)."""
    out, size, bias = logits.clone(), params.no_repeat_ngram_size, dict(params.logit_bias)
    for n, seq in enumerate(seqs.tolist()):
        for t in range(len(PROMPT) - 1, len(seq)):
            history, output = seq[: t + 1], seq[len(PROMPT): t + 1]
            tail = history[len(history) - size + 1:] if size > 1 else []
            banned = {history[i + size - 1] for i in range(len(history) - size + 1)
                      if history[i: i + size - 1] == tail} if size else set()
            for v in range(logits.shape[-1]):
                x = float(out[n, t, v]) + bias.get(v, 0.0)
                if v in PROMPT or v in output:
                    x = x / params.repetition_penalty if x > 0 else x * params.repetition_penalty
                x = x - params.frequency_penalty * output.count(v) - params.presence_penalty * (v in output)
                out[n, t, v] = -float("inf") if v in banned else x
    return out


def exact_joint(target, params, held_back: tuple[int, int] | None = None) -> torch.Tensor:
    """P(y1, y2, y3 | PROMPT) of the target with the sampler's processing (and the penalties of
    ``params``, from each sequence's history), enumerated: ``[V, V, V]``.
    ``held_back=(token, n)``: that token has probability 0 among the first n (``min_new_tokens``)."""
    from dspark.models import load_model
    from dspark.samplers import DefaultSampler

    model, sampler = load_model(target, dtype="float64"), DefaultSampler()
    seqs = torch.tensor([PROMPT + [a, b] for a, b in itertools.product(range(VOCAB), repeat=2)])
    with torch.inference_mode():
        logits = model(seqs, model.new_cache(len(seqs), 8)).logits.clone()  # [V*V, 5, V]
        if params.penalized:
            logits = penalised(logits, seqs, params)
        if held_back is not None:
            token, count = held_back
            logits[:, len(PROMPT) - 1: len(PROMPT) - 1 + count, token] = -float("inf")
    p = sampler.probs(logits, params)
    p1 = p[0, 2]  # after the prompt
    p2 = p[:, 3].view(VOCAB, VOCAB, VOCAB)[:, 0]  # rows a*V+b, any b: after (prompt, a)
    p3 = p[:, 4].view(VOCAB, VOCAB, VOCAB)  # after (prompt, a, b)
    return p1[:, None, None] * p2[:, :, None] * p3


def empirical_joint(pipe, params, samples=20000, **options) -> torch.Tensor:
    counts = torch.zeros(VOCAB, VOCAB, VOCAB, dtype=torch.long)
    batch = 5000
    for start in range(0, samples, batch):
        result = pipe.generate([PROMPT] * batch, max_new_tokens=3, temperature=params.temperature, top_k=params.top_k,
                               top_p=params.top_p, repetition_penalty=params.repetition_penalty,
                               presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
                               no_repeat_ngram_size=params.no_repeat_ngram_size, logit_bias=dict(params.logit_bias),
                               seed=1000 + start, ignore_eos=True, **options)
        ids = torch.tensor(result.token_ids)
        counts += torch.bincount(ids[:, 0] * VOCAB * VOCAB + ids[:, 1] * VOCAB + ids[:, 2],
                                 minlength=VOCAB ** 3).view(VOCAB, VOCAB, VOCAB)
    return counts


SETTINGS = {"temperature_1": dspark.SamplingParams(1.0), "top_k_4": dspark.SamplingParams(1.0, top_k=4),
            "top_p_0.8": dspark.SamplingParams(0.9, top_p=0.8)}


@pytest.mark.slow
@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("drafter", ["draft_model", "draft_model_stop", "draft_model_calibrated", "early_exit", "ngram", "ngram_periodic",
                                     "dspark", "dspark_matvec", "dflash", "dspark_rnn", "dspark_deepspec", "dflash_deepspec", "dflash_zlab",
                                     "eagle3", "eagle3_published_forms", "eagle3_draft_vocab", "eagle3_stop",
                                     "eagle3_scheduled", "eagle3_calibrated", "dspark_threshold", "dspark_scheduled",
                                     "dspark_idle", "dspark_measured", "dspark_async", "ngram_adaptive",
                                     "draft_model_adaptive"])
def test_chi_square_joint_of_first_three_tokens(setting, drafter):
    """20,000 batched samples; chi-square at significance 0.001, fixed seeds."""
    params = SETTINGS[setting]
    target, draft = tiny_pair()
    pipe = spec_pipeline(target, drafter, 3, "engine.max_batch_size=5000", draft=draft)
    counts = empirical_joint(pipe, params)
    assert chi_square_p_value(counts, exact_joint(target, params)) > 1e-3


# strong enough to move most of the mass: the prompt's tokens, and those drawn before, fall back
PENALTIES = dspark.SamplingParams(1.0, repetition_penalty=2.5, presence_penalty=0.8, frequency_penalty=0.6,
                                  logit_bias=((2, 1.5), (5, -2.0), (7, 0.7)))
# no bigram twice: PROMPT = [3, 7, 1], so e.g. 7 may not follow a drawn 3, nor 1 a drawn 7
NGRAM_BANS = dspark.SamplingParams(1.0, no_repeat_ngram_size=2, top_k=6)


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["penalties", "ngram_bans"])
@pytest.mark.parametrize("drafter", ["none", "ngram", "draft_model", "draft_model_self", "early_exit", "dspark",
                                     "dflash", "dspark_rnn", "eagle3", "eagle3_draft_vocab", "dspark_scheduled",
                                     "draft_model_stop", "ngram_adaptive"])
def test_chi_square_with_penalties(drafter, setting):
    """With penalties or n-gram bans, the target's distribution at each verify position depends on
    the drafts before it; speculative sampling must still give the penalised target's joint
    (enumerated with the penalties written out). 20,000 samples, significance 0.001, fixed seeds."""
    params = PENALTIES if setting == "penalties" else NGRAM_BANS
    target, draft = tiny_pair()
    exact = exact_joint(target, params)
    unpenalised = exact_joint(target, dspark.SamplingParams(1.0, top_k=params.top_k))
    assert (exact - unpenalised).abs().sum() > (0.5 if setting == "penalties" else 0.05)  # they matter
    pipe = spec_pipeline(target, drafter, 3, "engine.max_batch_size=5000", draft=draft)
    assert chi_square_p_value(empirical_joint(pipe, params), exact) > 1e-3


def test_chi_square_detects_penalties_without_the_drafts():
    """The check has power: penalising every verify position with the committed history alone
    (forgetting the drafts before it) is caught."""
    from dspark.samplers.penalties import PenaltyHistory

    target, draft = tiny_pair()
    pipe = spec_pipeline(target, "draft_model_self", 3, "engine.max_batch_size=5000", draft=draft)
    real = PenaltyHistory.penalize_verify
    PenaltyHistory.penalize_verify = lambda self, logits, drafts, num, params: real(self, logits, drafts,
                                                                                    torch.zeros_like(num), params)
    try:
        counts = empirical_joint(pipe, PENALTIES)
    finally:
        PenaltyHistory.penalize_verify = real
    assert chi_square_p_value(counts, exact_joint(target, PENALTIES)) < 1e-3


# the settings requests share a batch with in the chi-square check: each group's joint is checked
GROUPS = [PENALTIES, NGRAM_BANS, dspark.SamplingParams(0.9, top_p=0.8, min_p=0.05),
          dspark.SamplingParams(0.0, repetition_penalty=1.5)]


def empirical_joints(pipe, groups: list, samples: int) -> list[torch.Tensor]:
    """The first three tokens' counts ``[V, V, V]`` per group of ``groups``, request i of each
    5,000-request batch decoded with ``groups[i % len(groups)]``."""
    counts = [torch.zeros(VOCAB, VOCAB, VOCAB, dtype=torch.long) for _ in groups]
    batch = 5000
    requests = [dict(temperature=g.temperature, top_k=g.top_k, top_p=g.top_p, min_p=g.min_p,
                     repetition_penalty=g.repetition_penalty, presence_penalty=g.presence_penalty,
                     frequency_penalty=g.frequency_penalty, no_repeat_ngram_size=g.no_repeat_ngram_size,
                     logit_bias=dict(g.logit_bias)) for g in groups]
    settings = settings_per_request([requests[i % len(groups)] for i in range(batch)])
    for start in range(0, samples, batch):
        ids = torch.tensor(pipe.generate([PROMPT] * batch, max_new_tokens=3, seed=1000 + start, ignore_eos=True,
                                         **settings).token_ids)
        cells = ids[:, 0] * VOCAB * VOCAB + ids[:, 1] * VOCAB + ids[:, 2]
        for g, count in enumerate(counts):
            count += torch.bincount(cells[g::len(groups)], minlength=VOCAB ** 3).view(VOCAB, VOCAB, VOCAB)
    return counts


@pytest.mark.slow
@pytest.mark.parametrize("drafter", ["none", "draft_model", "dspark", "eagle3", "eagle3_calibrated", "dspark_scheduled"])
def test_chi_square_with_settings_per_request(drafter):
    """Requests of one batch asking for different settings (penalties with a bias, n-gram bans with
    top-k, nucleus with min-p, greedy with a penalty): each group's joint of the first three tokens
    is its own target's (10,000 samples per group, significance 0.001, fixed seeds); every greedy
    request decodes the greedy sequence."""
    target, draft = tiny_pair()
    pipe = spec_pipeline(target, drafter, 3, "engine.max_batch_size=5000", draft=draft)
    counts = empirical_joints(pipe, GROUPS, samples=40000)
    for group, count in zip(GROUPS, counts):
        exact = exact_joint(target, group)
        if group.greedy:
            assert count[exact == 1].sum() == count.sum() == 10000
        else:
            assert chi_square_p_value(count, exact) > 1e-3


@pytest.mark.parametrize("setting", ["penalties", "ngram_bans"])
@pytest.mark.parametrize("drafter", DRAFTERS[1:])
def test_greedy_with_penalties_equals_autoregressive(drafter, setting):
    target = tiny_hf_model("qwen3", scale=3.0)
    prompts = ragged_prompts(target.config.vocab_size, lengths=(5, 1, 9, 3, 14))
    penalties = (dict(repetition_penalty=1.6, presence_penalty=0.5, frequency_penalty=0.4, logit_bias={3: 2.0, 9: -4.0})
                 if setting == "penalties" else dict(no_repeat_ngram_size=2))
    plain = spec_pipeline(target, "none", 0)
    expected = plain.generate(prompts, max_new_tokens=24, ignore_eos=True, **penalties).token_ids
    assert expected != plain.generate(prompts, max_new_tokens=24, ignore_eos=True).token_ids
    result = spec_pipeline(target, drafter, 3).generate(prompts, max_new_tokens=24, ignore_eos=True, **penalties)
    assert result.token_ids == expected
    if drafter == "draft_model_self" and setting == "penalties":  # the target drafting for itself, penalised as
        assert result.stats.acceptance_by_position == [1.0] * 3           # it is verified: all accepted


@pytest.mark.slow
@pytest.mark.parametrize("drafter", ["none", "ngram", "draft_model", "dspark", "eagle3"])
def test_chi_square_with_a_stop_token_held_back(drafter):
    """``min_new_tokens=2`` with a stop token: the first two tokens come from the target's
    distribution without it, the third from the full one (it may end the request there). The
    stop token is the target's likeliest first token, so holding it back moves a lot of mass."""
    params = SETTINGS["temperature_1"]
    target, draft = tiny_pair()
    stop = int(exact_joint(target, params).sum((1, 2)).argmax())
    pipe = spec_pipeline(target, drafter, 3, "engine.max_batch_size=5000", draft=draft)
    counts = empirical_joint(pipe, params, stop_token_ids=[stop], min_new_tokens=2)
    assert counts[stop].sum() == 0 and counts[:, stop].sum() == 0 and counts[:, :, stop].sum() > 0
    assert chi_square_p_value(counts, exact_joint(target, params, held_back=(stop, 2))) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("drafter", ["none", "draft_model", "dspark", "eagle3"])
def test_chi_square_with_stop_tokens_per_request(drafter):
    """Three groups of one batch: the target's likeliest first token held back from the first two
    tokens, its second likeliest held back, no stop token — each group's joint is its own
    (10,000 samples per group, significance 0.001, fixed seeds)."""
    params = SETTINGS["temperature_1"]
    target, draft = tiny_pair()
    first, second = exact_joint(target, params).sum((1, 2)).topk(2).indices.tolist()
    pipe = spec_pipeline(target, drafter, 3, "engine.max_batch_size=5000", draft=draft)
    groups = [([first], 2), ([second], 2), (None, 0)]
    batch = 5000
    rows = [groups[i % 3] for i in range(batch)]
    counts = [torch.zeros(VOCAB ** 3, dtype=torch.long) for _ in groups]
    for start in range(0, 30000, batch):
        ids = torch.tensor(pipe.generate([PROMPT] * batch, max_new_tokens=3, temperature=1.0, seed=1000 + start,
                                         stop_token_ids=[stop for stop, _ in rows],
                                         min_new_tokens=[hold for _, hold in rows]).token_ids)
        cells = ids[:, 0] * VOCAB * VOCAB + ids[:, 1] * VOCAB + ids[:, 2]
        for g, count in enumerate(counts):
            count += torch.bincount(cells[g::3], minlength=VOCAB ** 3)
    for (stop, hold), count in zip(groups, counts):
        count = count.view(VOCAB, VOCAB, VOCAB)
        exact = exact_joint(target, params, held_back=None if stop is None else (stop[0], hold))
        if stop is not None:
            assert count[stop[0]].sum() == 0 and count[:, stop[0]].sum() == 0
        assert chi_square_p_value(count, exact) > 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("drafter", ["draft_model", "dspark"])
def test_chi_square_with_the_kernels_on_gpu(drafter):
    """On CUDA the rounds run the Triton verification and commit kernels; same check, same significance."""
    from dspark.kernels import backend_for

    params = SETTINGS["top_k_4"]
    target, draft = tiny_pair()
    pipe = spec_pipeline(target, drafter, 3, "engine.max_batch_size=5000", "target.device=cuda", draft=draft)
    assert backend_for(pipe.engine.device) == "triton"
    counts = empirical_joint(pipe, params)
    assert chi_square_p_value(counts, exact_joint(target, params)) > 1e-3


@register_verifier("accept_always_test")
class AcceptAlways(ChainVerifier):
    """Deliberately broken: accepts every draft, then samples the bonus from p."""

    def verify(self, target_logits, proposal, *, sampler, params, uniforms):
        result = super().verify(target_logits, proposal, sampler=sampler, params=params, uniforms=uniforms)
        tokens = torch.cat([proposal.tokens, result.tokens[:, -1:]], 1)
        bonus = sampler.sample(sampler.probs(target_logits.gather(
            1, proposal.num_tokens.view(-1, 1, 1).expand(-1, 1, target_logits.shape[-1])).squeeze(1), params),
            uniforms[:, -1])
        tokens.scatter_(1, proposal.num_tokens.unsqueeze(1), bonus.unsqueeze(1))
        return VerificationResult(num_accepted=proposal.num_tokens.clone(), tokens=tokens)


@register_drafter("eagle3_peeking_test")
class PeekingEagle3(Eagle3Drafter):
    """Deliberately broken: its confidence is the drafted token's own probability, so whether
    ``x_k`` is offered (``min_survival``) depends on ``x_k`` — offered drafts are no longer ``q``'s samples."""

    def confidence_at(self, logits, token):
        return torch.softmax(logits.float(), -1).gather(1, token.unsqueeze(1)).squeeze(1)


@pytest.mark.slow
def test_chi_square_detects_a_stop_that_reads_the_draft():
    params = SETTINGS["temperature_1"]
    target, _ = tiny_pair()
    pipe = dspark.build_pipeline({"target": {"device": "cpu"}, "drafter": {
        "name": "eagle3_peeking_test", "num_speculative_tokens": 3, "path": None,
        "min_survival": (2 / VOCAB) ** 2}}, target_model=target, overrides=["engine.max_batch_size=5000"])
    counts = empirical_joint(pipe, params)
    assert chi_square_p_value(counts, exact_joint(target, params)) < 1e-3


@pytest.mark.slow
def test_chi_square_detects_a_broken_verifier():
    params = SETTINGS["temperature_1"]
    target, draft = tiny_pair()
    pipe = spec_pipeline(target, "draft_model", 3, "engine.max_batch_size=5000", "verifier.name=accept_always_test",
                         draft=draft)
    counts = empirical_joint(pipe, params)
    assert chi_square_p_value(counts, exact_joint(target, params)) < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("drafter", ["draft_model", "draft_model_stop", "draft_model_calibrated",
                                     pytest.param("dspark", marks=pytest.mark.inductor_defaults), "eagle3",
                                     "eagle3_stop", "eagle3_calibrated", "dspark_async", "draft_model_adaptive"])
def test_compiled_rounds_match_eager(drafter):
    """engine.compile: the compiled target, drafter and scheduler give the greedy tokens of plain
    decoding, and the sampled tokens of the eager pipeline with the same seeds (both pipelines
    decode the same calls in turn: the adaptive scheduler learns from one call to the next).
    Once a batch size and the sampling settings have been seen, other prompt lengths (within one
    cache bucket), other values of the settings and requests admitted into the running batch reuse
    the graphs: nothing a compiled function takes may have a prompt-dependent shape (dynamo would
    recompile per length, then fall back to eager), and a new temperature is a new tensor value,
    not a new graph. DSpark's case compiles with inductor's own (vectorised) kernels, the others
    with scalar ones (tests/conftest.py)."""
    from torch._dynamo.utils import counters

    # (drafters that stop early or are scheduled may meet a verify width not seen before)
    verifies_gamma = drafter in ("draft_model", "dspark", "eagle3")

    def same_graphs_and_tokens(prompts, **options) -> None:
        graphs = counters["stats"]["unique_graphs"]
        assert compiled.generate(prompts, **options).token_ids == eager.generate(prompts, **options).token_ids
        assert counters["stats"]["unique_graphs"] == graphs or not verifies_gamma

    target = tiny_hf_model("qwen3", scale=3.0)
    prompts = ragged_prompts(101, lengths=(5, 1, 9))
    expected = spec_pipeline(target, "none", 0).generate(prompts, max_new_tokens=12, ignore_eos=True).token_ids
    # (rounds over all slots: each row count would compile once more — test_round_rows compiles trimmed rounds)
    full = "engine.trim_idle_slots=false"
    compiled, eager = spec_pipeline(target, drafter, 3, "engine.compile=true", full), spec_pipeline(target, drafter, 3, full)
    for pipe in (compiled, eager):
        assert pipe.generate(prompts, max_new_tokens=12, ignore_eos=True).token_ids == expected
    assert compiled.engine.cache_class is not None and compiled.engine._cache.max_len % 256 == 0
    for seed, lengths in enumerate([(3, 11, 8), (7, 2, 4)]):
        same_graphs_and_tokens(ragged_prompts(101, lengths=lengths, seed=seed + 1), max_new_tokens=12, ignore_eos=True)
    sampled = dict(max_new_tokens=12, temperature=1.0, seed=[1, 2, 3], ignore_eos=True)
    assert compiled.generate(prompts, **sampled).token_ids == eager.generate(prompts, **sampled).token_ids
    if drafter not in ("draft_model_stop", "dspark", "eagle3", "eagle3_stop"):  # (compiling takes time)
        return
    # penalties: the drafters' compiled steps carry their running counts (across chunks, when stopping early)
    penalised = dict(repetition_penalty=1.5, presence_penalty=0.3, frequency_penalty=0.2)
    expected = spec_pipeline(target, "none", 0).generate(prompts, max_new_tokens=12, ignore_eos=True,
                                                         **penalised).token_ids
    for pipe in (compiled, eager):
        assert pipe.generate(prompts, max_new_tokens=12, ignore_eos=True, **penalised).token_ids == expected
    assert (compiled.generate(prompts, **sampled, **penalised).token_ids
            == eager.generate(prompts, **sampled, **penalised).token_ids)
    # settings per request (a greedy request among sampled ones): the settings that differ are tensors
    mixed = dict(max_new_tokens=12, seed=[1, 2, 3], ignore_eos=True, **settings_per_request(PER_REQUEST[:3]))
    assert compiled.generate(prompts, **mixed).token_ids == eager.generate(prompts, **mixed).token_ids
    other_values = [dict(temperature=1.3, top_k=6), dict(repetition_penalty=1.2),
                    dict(temperature=0.9, top_p=0.7, min_p=0.1, no_repeat_ngram_size=2)]
    same_graphs_and_tokens(ragged_prompts(101, lengths=(8, 2, 6), seed=4), max_new_tokens=12, seed=[4, 5, 6],
                           ignore_eos=True, **settings_per_request(other_values))
    # continuous batching: six requests through the three slots, admitted into the compiled batch
    more = ragged_prompts(101, lengths=(5, 1, 9, 4, 7, 2), seed=5)
    refilled = dict(max_new_tokens=[12, 3, 5, 9, 4, 6], temperature=1.0, seed=list(range(6)), ignore_eos=True)
    for pipe in (compiled, eager):
        pipe.engine.config.max_batch_size = 3
    assert compiled.generate(more, **refilled).token_ids == eager.generate(more, **refilled).token_ids
    # prefix caching: the refilled slots held prompts that share the new ones' first nine tokens
    shared = [more[2] + prompt for prompt in more]
    same_graphs_and_tokens(shared, **refilled)
    assert compiled.engine._live.prefixes.hits >= 3 * 8


@pytest.mark.slow
def test_compiled_rounds_do_not_recompile_for_new_prompt_lengths():
    """engine.compile, plain decoding: once a batch size and the sampling settings have been seen,
    other prompt lengths (within one cache bucket) reuse the compiled graphs — nothing a compiled
    function takes may have a prompt-dependent shape (dynamo would recompile per length, then fall
    back to eager) — and so do other values of the settings (a new temperature is a new tensor
    value, not a new graph). The drafters are checked alike in test_compiled_rounds_match_eager."""
    from torch._dynamo.utils import counters

    target = tiny_hf_model("qwen3", scale=3.0)
    compiled = spec_pipeline(target, "none", 0, "engine.compile=true", "engine.trim_idle_slots=false")
    compiled.generate(ragged_prompts(101, lengths=(6,)), max_new_tokens=10, ignore_eos=True)
    before = counters["stats"]["unique_graphs"]
    for length in (3, 11, 8):
        compiled.generate(ragged_prompts(101, lengths=(length,), seed=length), max_new_tokens=10, ignore_eos=True)
    assert counters["stats"]["unique_graphs"] == before
    # new values of the settings that are on (held in tensors) reuse the graphs too
    sampled = dict(max_new_tokens=10, ignore_eos=True, seed=0)
    compiled.generate(ragged_prompts(101, lengths=(6,)), temperature=0.7, top_p=0.9, repetition_penalty=1.2, **sampled)
    before = counters["stats"]["unique_graphs"]
    for temperature, top_p, penalty in ((0.9, 0.8, 1.4), (1.3, 0.95, 1.1)):
        compiled.generate(ragged_prompts(101, lengths=(6,)), temperature=temperature, top_p=top_p,
                          repetition_penalty=penalty, **sampled)
    assert counters["stats"]["unique_graphs"] == before
    # requests admitted into a running batch (continuous batching, one slot) reuse them as well
    compiled.engine.config.max_batch_size = 1
    compiled.generate(ragged_prompts(101, lengths=(6, 3, 9)), max_new_tokens=[4, 6, 2], temperature=0.9, top_p=0.8,
                      repetition_penalty=1.3, ignore_eos=True, seed=0)
    assert counters["stats"]["unique_graphs"] == before
