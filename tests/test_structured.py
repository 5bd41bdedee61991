"""Structured outputs: a grammar's mask at each verify position follows the committed tokens and
the drafts before it, and speculative decoding under a grammar gives exactly constrained
decoding's outputs — greedy token for token, sampled by a chi-square test against the
constrained target's joint, enumerated in float64 with the masks worked out by hand."""

import itertools
import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import dspark
from dspark.records import DecodingState, SamplingParams
from dspark.structured import Grammar, GrammarCompiler, GrammarRows, RoundMasks, _unpack_with_torch, unpack_bitmask

from helpers import chi_square_p_value, tiny_hf_model
from test_speculative import spec_pipeline

VOCAB = 12
EOS = 11
# each token's text; the choices need two tokens at least, so EOS comes third at the earliest
TEXT = ["a", "b", "c", "ab", "ba", "ca", "bc", "aa", "cc", "x", "bb", "</s>"]
CHOICES = ["abca", "baab", "ccab", "aabc", "bcbcbc", "abab", "cabb"]
PROMPT = [3, 7, 1]


def tiny_pair():
    shape = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=1,
                 head_dim=16, scale=12.0, eos_token_id=EOS)
    return tiny_hf_model("llama", **shape), tiny_hf_model("llama", seed=3, num_hidden_layers=1, **shape)


def compiler() -> GrammarCompiler:
    return GrammarCompiler(vocabulary=TEXT, vocab_size=VOCAB, stop_token_ids=[EOS])


def pipeline(drafter: str, *overrides):
    target, draft = tiny_pair()
    pipe = spec_pipeline(target, drafter, 3, *overrides, draft=draft)
    pipe.grammar_compiler = compiler()
    return pipe


def allowed_by_hand(tokens: list[int]) -> set[int]:
    """The tokens that may follow ``tokens`` under ``Grammar.choice(CHOICES)``: those that keep the
    text a prefix of a choice, and EOS where it is one."""
    text = "".join(TEXT[t] for t in tokens)
    allowed = {t for t in range(VOCAB) if t != EOS and any(c.startswith(text + TEXT[t]) for c in CHOICES)}
    return allowed | ({EOS} if text in CHOICES else set())


@given(st.lists(st.lists(st.integers(-2 ** 31, 2 ** 31 - 1), min_size=2, max_size=2), min_size=1, max_size=3),
       st.integers(33, 64))
def test_unpack_bitmask_reads_bit_v_mod_32_of_word_v_div_32(rows, vocab):
    """The host's NumPy unpacking and the tensor ops that other devices use, against the bits by hand."""
    bitmask = torch.tensor(rows, dtype=torch.int32)
    expected = [[bool((words[v // 32] >> (v % 32)) & 1) for v in range(vocab)] for words in rows]
    assert unpack_bitmask(bitmask, vocab).tolist() == expected
    assert _unpack_with_torch(bitmask, vocab).tolist() == expected
    assert unpack_bitmask(bitmask[0], vocab).tolist() == expected[0]



@given(st.lists(st.lists(st.integers(0, 63), max_size=3), min_size=1, max_size=4), st.integers(40, 64))
def test_only_tokens_finds_the_one_token_a_mask_allows(allowed_sets, vocab):
    """Rows allowing one token give it (bit 31 of a word too); rows allowing none or several give None."""
    rows = GrammarRows(slots=1, vocab_size=vocab, lookahead=1)
    words = torch.zeros(len(allowed_sets), 2, dtype=torch.int64)
    for r, allowed in enumerate(allowed_sets):
        for t in allowed:
            words[r, t // 32] |= 1 << (t % 32)
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)  # (as int32 words hold them)
    expected = [next(iter({t for t in a if t < vocab})) if len({t for t in a if t < vocab}) == 1 and
                len(set(a)) == 1 else None for a in allowed_sets]
    assert rows._only_tokens(words) == expected

def test_round_masks_follow_the_committed_tokens_and_the_drafts():
    """Rows of a round: their masks at position j are the grammar's after the committed output
    and drafts 1..j, as worked out by hand, up to the first draft the grammar forbids (the rest
    allow everything: never read); the matchers take the committed tokens once and roll the
    drafts back."""
    compiled = compiler().compile(Grammar.choice(CHOICES))
    rows = GrammarRows(slots=3, vocab_size=VOCAB, lookahead=4)
    rows.admit(0, compiled, prompt_length=3)
    rows.admit(2, compiled, prompt_length=2)
    assert rows.constrained([0, 1, 2]) == [0, 2]
    first = rows.first_masks([0, 2])
    assert set(first[0].nonzero().flatten().tolist()) == allowed_by_hand([])
    tokens = torch.zeros(3, 16, dtype=torch.long)
    tokens[0, :4] = torch.tensor(PROMPT + [3])  # committed: "ab"
    tokens[2, :3] = torch.tensor([5, 5, 4])  # committed: "ba"
    state = DecodingState(tokens=tokens, prompt_lengths=torch.tensor([3, 0, 2]), lengths=torch.tensor([4, 0, 3]),
                          done=torch.tensor([False, True, False]), max_new_tokens=8, params=SamplingParams())
    drafts = torch.tensor([[5, EOS, 0], [0, 0, 0], [7, 9, 1]])  # "ca", EOS, "a"; —; "aa" (forbidden), "x", "b"
    result = rows.round_masks(state, drafts, torch.tensor([3, 0, 3]), [0, 2])
    masks = result.allowed
    assert masks.shape == (2, 4, VOCAB) and result.forced is None and result.verify is None
    assert result.dictated.tolist() == [1, 3]  # (after "abca" EOS alone; "ba" never meets one alone)
    allowed = [set(m.nonzero().flatten().tolist()) for row in masks for m in row]
    everything = set(range(VOCAB))
    assert allowed[:4] == [allowed_by_hand([3]), allowed_by_hand([3, 5]), everything, everything] == [
        {0, 2, 3, 5}, {EOS}, everything, everything]  # ("ab" → a, ab, c, ca; "abca" → EOS alone; past EOS: never read)
    assert allowed[4:] == [allowed_by_hand([4]), everything, everything, everything] == [
        {0, 3}, everything, everything, everything]  # ("ba" → "a", "ab"; "aa" is forbidden: the rest never read)
    assert rows.taken == [1, 0, 1]  # the committed tokens taken once; the drafts rolled back
    tokens[0, 4], state.lengths[0] = 5, 5  # the round kept "ca": "abca" — EOS alone may follow
    masks = rows.round_masks(state, drafts[:, :0], torch.tensor([0, 0, 0]), [0]).allowed
    assert masks[0, 0].nonzero().flatten().tolist() == [EOS]


def test_cut_verifies_each_row_up_to_the_first_draft_its_grammar_forbids():
    """With ``cut`` (deterministic drafts): the row whose first draft ("aa" after "ba") the grammar
    forbids verifies none; the row whose drafts reach the end of its output keeps all three; the
    masks are the same as without."""
    compiled = compiler().compile(Grammar.choice(CHOICES))
    masks = {}
    for cut in (False, True):
        rows = GrammarRows(slots=2, vocab_size=VOCAB, lookahead=4)
        rows.admit(0, compiled, prompt_length=3)
        rows.admit(1, compiled, prompt_length=2)
        tokens = torch.zeros(2, 16, dtype=torch.long)
        tokens[0, :4] = torch.tensor(PROMPT + [3])  # committed: "ab"
        tokens[1, :3] = torch.tensor([5, 5, 4])  # committed: "ba"
        state = DecodingState(tokens=tokens, prompt_lengths=torch.tensor([3, 2]), lengths=torch.tensor([4, 3]),
                              done=torch.tensor([False, False]), max_new_tokens=8, params=SamplingParams())
        drafts = torch.tensor([[5, EOS, 0], [0, 7, 1], [7, 9, 1]])[[0, 2]]  # "ca", EOS, …; "aa" (forbidden), …
        result = rows.round_masks(state, drafts, torch.tensor([3, 2]), [0, 1], cut=cut)
        masks[cut] = result.allowed
        if cut:
            assert result.verify.tolist() == [3, 0] and result.widest == 3 and result.forced is None
        else:
            assert result.verify is None and result.widest is None
        assert rows.taken == [1, 1]  # (the drafts rolled back either way)
    assert torch.equal(masks[False], masks[True])
    # a forbidden draft after an allowed one: "ab" + "a" ("abab" is a choice) + "x" (no choice goes on so)
    rows = GrammarRows(slots=1, vocab_size=VOCAB, lookahead=4)
    rows.admit(0, compiled, prompt_length=3)
    state = DecodingState(tokens=torch.tensor([PROMPT + [3] + [0] * 4]), prompt_lengths=torch.tensor([3]),
                          lengths=torch.tensor([4]), done=torch.tensor([False]), max_new_tokens=8, params=SamplingParams())
    result = rows.round_masks(state, torch.tensor([[0, 9, 1]]), torch.tensor([3]), [0], cut=True)  # "a", "x", "b"
    assert result.verify.tolist() == [1] and result.widest == 1


def test_a_token_the_grammar_allows_alone_is_drafted_there():
    """With ``force``: after "abc" the grammar allows "a" alone, then EOS alone — those are drafted
    in place of the drafter's, and the masks follow them; a draft the grammar allows stays."""
    compiled = compiler().compile(Grammar.choice(CHOICES))
    rows = GrammarRows(slots=2, vocab_size=VOCAB, lookahead=4)
    rows.admit(0, compiled, prompt_length=1)
    rows.admit(1, compiled, prompt_length=1)
    tokens = torch.tensor([[6, 3, 2] + [0] * 9, [6, 4, 0] + [0] * 9])  # committed: "abc"; "baa"
    state = DecodingState(tokens=tokens, prompt_lengths=torch.tensor([1, 1]), lengths=torch.tensor([3, 3]),
                          done=torch.tensor([False, False]), max_new_tokens=8, params=SamplingParams())
    drafts = torch.tensor([[7, 9, 1], [1, 0, 0]])  # "aa", "x", "b"; "b" (allowed alone anyway), then padding
    result = rows.round_masks(state, drafts, torch.tensor([3, 1]), [0, 1], force=True)
    # "abc" → a; "abca" → EOS; past EOS: nothing. "baa" → b (the drafter's); past its one draft, "baab" → EOS
    assert result.forced.tolist() == [[0, EOS, -1], [-1, EOS, -1]] and result.verify.tolist() == [3, 2]
    assert result.dictated.tolist() == [0, 0]  # (the drafter's "b" was the one token allowed too)
    allowed = [[set(m.nonzero().flatten().tolist()) for m in row] for row in result.allowed]
    assert allowed[0][:2] == [{0}, {EOS}] and allowed[1][:2] == [{1}, {EOS}]
    assert rows.taken == [2, 2]


@pytest.mark.parametrize("drafter", ["ngram", "draft_model", "dspark", "eagle3"])
def test_greedy_constrained_speculative_equals_constrained_autoregressive(drafter):
    """Greedy, several prompts in a batch, each with its own grammar (choices, a regex, none):
    token for token as the ``none`` pipeline decodes them; each output is a string of its grammar
    followed by EOS, or cut by max_new_tokens; the unconstrained request decodes as without
    grammars."""
    grammars = [Grammar.choice(CHOICES), Grammar.regex("(ab|c)+x"), None, Grammar.regex("(ba|a)+b?")]
    prompts = [PROMPT, [2, 2, 9], [1, 4], [6]]
    plain, fast = pipeline("none", "engine.max_batch_size=4"), pipeline(drafter, "engine.max_batch_size=4")
    expected = plain.generate(prompts, max_new_tokens=10, grammar=grammars).token_ids
    assert fast.generate(prompts, max_new_tokens=10, grammar=grammars).token_ids == expected
    assert expected[2] == plain.generate([prompts[2]], max_new_tokens=10).token_ids[0]
    assert "".join(TEXT[t] for t in expected[0][:-1]) in CHOICES and expected[0][-1] == EOS


def constrained_joint(target, params, prompt=PROMPT) -> torch.Tensor:
    """P(y1, y2, y3 | prompt) of the target constrained by ``Grammar.choice(CHOICES)`` with the
    sampler's processing, enumerated in float64 ``[V, V, V]`` (masks from :func:`allowed_by_hand`)."""
    from dspark.models import load_model
    from dspark.samplers import DefaultSampler

    model, sampler = load_model(target, dtype="float64"), DefaultSampler()
    seqs = torch.tensor([prompt + [a, b] for a, b in itertools.product(range(VOCAB), repeat=2)])
    with torch.inference_mode():
        logits = model(seqs, model.new_cache(len(seqs), 8)).logits.clone()  # [V*V, P+2, V]
        for n, seq in enumerate(seqs.tolist()):
            for t in range(len(prompt) - 1, len(seq)):
                allowed = allowed_by_hand(seq[len(prompt): t + 1])
                if allowed:  # (an impossible prefix has probability 0: its row is never read)
                    logits[n, t, [v for v in range(VOCAB) if v not in allowed]] = -float("inf")
        p = sampler.probs(logits, params)
    last = len(prompt) - 1
    p1, p2 = p[0, last], p[:, last + 1].view(VOCAB, VOCAB, VOCAB)[:, 0]
    p3 = p[:, last + 2].view(VOCAB, VOCAB, VOCAB)
    return p1[:, None, None] * p2[:, :, None] * p3


def sampled_joint(pipe, params, samples: int = 20000, prompt=PROMPT) -> torch.Tensor:
    counts, batch = torch.zeros(VOCAB ** 3, dtype=torch.long), 5000
    for start in range(0, samples, batch):
        ids = torch.tensor(pipe.generate([prompt] * batch, max_new_tokens=3, temperature=params.temperature,
                                         top_k=params.top_k, seed=1000 + start, grammar=Grammar.choice(CHOICES)).token_ids)
        counts += torch.bincount(ids[:, 0] * VOCAB * VOCAB + ids[:, 1] * VOCAB + ids[:, 2], minlength=VOCAB ** 3)
    return counts.view(VOCAB, VOCAB, VOCAB)


@pytest.mark.slow
@pytest.mark.parametrize("drafter", ["none", "ngram", "draft_model", "dspark", "eagle3"])
@pytest.mark.parametrize("params", [SamplingParams(1.0), SamplingParams(0.8, top_k=3)], ids=["t1", "top_k_3"])
def test_chi_square_constrained_joint_of_first_three_tokens(drafter, params):
    """Sampling under a grammar gives the constrained target's joint of the first three tokens
    (they reach EOS at the earliest): 20,000 samples, chi-square at significance 0.001, fixed seeds."""
    target, _ = tiny_pair()
    exact = constrained_joint(target, params)
    assert chi_square_p_value(sampled_joint(pipeline(drafter, "engine.max_batch_size=5000"), params), exact) > 1e-3


@pytest.mark.slow
def test_chi_square_constrained_joint_with_stray_n_gram_drafts_cut():
    """After the prompt "c x c" prompt lookup copies "x" (what followed "c") and the like, which
    the choices forbid: every request of a round is constrained, so rounds whose cut drafts leave
    fewer than γ narrow the verify forward (checked: the path under test); the joint of the first
    three tokens (temperature 1) is the constrained target's (20,000 samples, chi-square at
    significance 0.001, fixed seeds)."""
    import dspark.engine.core as core

    prompt, widths, real = [2, 9, 2], [], core._narrow

    def counted(proposal, uniforms, width):
        widths.append(width)
        return real(proposal, uniforms, width)

    core._narrow = counted
    try:
        counts = sampled_joint(pipeline("ngram", "engine.max_batch_size=5000"), SamplingParams(1.0), prompt=prompt)
    finally:
        core._narrow = real
    assert widths and max(widths) < 3  # (γ = 3)
    target, _ = tiny_pair()
    assert chi_square_p_value(counts, constrained_joint(target, SamplingParams(1.0), prompt)) > 1e-3


def test_chi_square_detects_masks_that_ignore_the_drafts():
    """The check has power: masking every verify position with the grammar's state after the
    committed tokens alone (forgetting the drafts before it) is caught."""
    pipe = pipeline("draft_model", "engine.max_batch_size=5000")
    real = GrammarRows.round_masks

    def committed_only(self, state, drafts, num_verify, slots, force=False, guide=None, cut=False):
        masks = real(self, state, drafts, torch.zeros_like(num_verify), slots).allowed
        return RoundMasks(masks[:, :1].expand(-1, drafts.shape[1] + 1, -1), None, None, None)

    GrammarRows.round_masks = committed_only
    try:
        counts = sampled_joint(pipe, SamplingParams(1.0))
    finally:
        GrammarRows.round_masks = real
    target, _ = tiny_pair()
    assert chi_square_p_value(counts, constrained_joint(target, SamplingParams(1.0))) < 1e-3


@pytest.mark.parametrize("drafter", ["ngram", "eagle3"])
def test_forced_drafts_raise_acceptance_and_change_no_token(drafter, monkeypatch):
    """Where the grammar allows one token alone, drafting it (instead of the drafter's draft)
    is accepted every time: more tokens per target forward, the same greedy tokens (the drafter
    unguided: a guided one drafts those tokens itself)."""
    pipe = pipeline(drafter, "engine.max_batch_size=8", "engine.guide_drafts=false")
    prompts = [PROMPT, [2, 2, 9], [1, 4], [6], [5, 5], [8]]
    forced = pipe.generate(prompts, max_new_tokens=10, grammar=Grammar.choice(CHOICES))
    monkeypatch.setattr(type(pipe.drafter), "replaceable_drafts", False)
    unforced = pipe.generate(prompts, max_new_tokens=10, grammar=Grammar.choice(CHOICES))
    assert forced.token_ids == unforced.token_ids
    # (outputs of 3-4 tokens: 13 target forwards instead of 15 here; τ counts the tokens kept, not
    # drafts accepted past the EOS that ends an output)
    assert forced.stats.target_forwards < unforced.stats.target_forwards
    assert forced.stats.mean_accepted_length > unforced.stats.mean_accepted_length + 0.1



GUIDED = ["draft_model", "early_exit", "dspark", "dflash", "dspark_rnn", "dspark_scheduled", "eagle3", "eagle3_stop", "eagle3_draft_vocab"]


def verified_drafts_follow_the_masks(pipe, monkeypatch, **kwargs) -> int:
    """Generate under ``Grammar.choice(CHOICES)`` and count the verified drafts (of constrained
    rows, before their output's end) that the verifier's masks forbid, or whose ``q`` puts mass on
    a forbidden token."""
    verifier, strays = pipe.engine.verifier, [0]
    real = type(verifier).verify

    def checked(self, logits, proposal, **kw):
        forbidden = logits.isinf()[:, :-1]  # [B, γ, V] (rows and positions without a mask: none)
        verified = torch.arange(proposal.tokens.shape[1]) < proposal.num_tokens.unsqueeze(1)  # [B, γ]
        stray = forbidden.gather(2, proposal.tokens.unsqueeze(2)).squeeze(2)
        if proposal.probs is not None:
            stray |= (proposal.probs * forbidden).sum(-1) > 0
        strays[0] += int((stray & verified).cumsum(1).clamp(max=1).sum())  # (rejected there: the rest unread)
        return real(self, logits, proposal, **kw)

    monkeypatch.setattr(type(verifier), "verify", checked)
    prompts = [PROMPT, [2, 2, 9], [1, 4], [6], [5, 5], [8]]
    pipe.generate(prompts, max_new_tokens=10, grammar=Grammar.choice(CHOICES), **kwargs)
    monkeypatch.setattr(type(verifier), "verify", real)
    return strays[0]


@pytest.mark.parametrize("drafter", GUIDED)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_guided_drafts_are_ones_the_grammar_allows_drawn_from_the_masked_q(drafter, temperature, monkeypatch):
    """Under ``engine.guide_drafts`` every verified draft of a constrained request is one its
    grammar allows after the drafts before it, and ``q`` (sampled) is zero on every token the
    grammar forbids — the distribution the draft was drawn from, masked as the target's is; the
    unguided drafters (the check's power) stray. EAGLE-3 with a draft vocabulary of half the
    target's may hold none of the allowed tokens: that row keeps its own distribution, and its
    draft is rejected."""
    guided = verified_drafts_follow_the_masks(pipeline(drafter, "engine.max_batch_size=8"), monkeypatch,
                                              temperature=temperature, seed=5)
    unguided = verified_drafts_follow_the_masks(pipeline(drafter, "engine.max_batch_size=8", "engine.guide_drafts=false",
                                                         "engine.cut_stray_drafts=false"),
                                                monkeypatch, temperature=temperature, seed=5)
    if drafter == "eagle3_draft_vocab":
        assert guided < unguided
    else:
        assert guided == 0 < unguided


@pytest.mark.parametrize("drafter, temperature", [("ngram", 0.0), ("ngram", 1.0), ("draft_model", 0.0),
                                                  ("eagle3", 0.0), ("draft_model", 1.0)])
def test_deterministic_drafts_are_verified_up_to_the_first_the_grammar_forbids(drafter, temperature, monkeypatch):
    """``engine.cut_stray_drafts``: no verified deterministic draft (n-gram; any drafter's, greedy)
    is one the grammar forbids — cut off, they stray (the check's power) — and greedy tokens are
    the same either way, with fewer drafts verified. Sampled drafts (the unguided draft model at
    T = 1) are never cut: they stray either way."""
    cut, kept = (pipeline(drafter, "engine.max_batch_size=8", "engine.guide_drafts=false",
                          f"engine.cut_stray_drafts={on}") for on in ("true", "false"))
    strays = [verified_drafts_follow_the_masks(pipe, monkeypatch, temperature=temperature, seed=5) for pipe in (cut, kept)]
    if temperature > 0 and drafter != "ngram":
        assert strays[0] > 0 and strays[1] > 0
        return
    assert strays[0] == 0 < strays[1]
    if temperature == 0:
        prompts = [PROMPT, [2, 2, 9], [1, 4], [6], [5, 5], [8]]
        runs = [pipe.generate(prompts, max_new_tokens=10, grammar=Grammar.choice(CHOICES)) for pipe in (cut, kept)]
        assert runs[0].token_ids == runs[1].token_ids
        assert runs[0].stats.verified_tokens < runs[1].stats.verified_tokens


def test_rounds_whose_requests_are_all_constrained_verify_the_kept_drafts_alone(monkeypatch):
    """One request at a time (every request of a round constrained): the verify forward narrows to
    the drafts kept, and greedy tokens are plain decoding's under the grammar."""
    import dspark.engine.core as core

    widths, real = [], core._narrow

    def counted(proposal, uniforms, width):
        widths.append((proposal.tokens.shape[1], width))
        return real(proposal, uniforms, width)

    monkeypatch.setattr(core, "_narrow", counted)
    plain, fast = pipeline("none"), pipeline("ngram", "engine.max_batch_size=1")
    for prompt in [PROMPT, [2, 2, 9], [1, 4], [6], [5, 5], [8]]:
        expected = plain.generate([prompt], max_new_tokens=10, grammar=Grammar.choice(CHOICES)).token_ids
        assert fast.generate([prompt], max_new_tokens=10, grammar=Grammar.choice(CHOICES)).token_ids == expected
    assert any(narrower < wide for wide, narrower in widths)


@pytest.mark.parametrize("drafter", ["draft_model", "dspark", "eagle3"])
def test_guided_drafting_raises_acceptance_and_changes_no_token(drafter):
    """Greedy: guided drafts are accepted more often (more tokens per target forward) than the
    same drafter's unguided ones (with forced drafts where the drafter takes them), token for
    token the same output."""
    prompts = [PROMPT, [2, 2, 9], [1, 4], [6], [5, 5], [8]]
    results = [pipeline(drafter, "engine.max_batch_size=8", f"engine.guide_drafts={on}").generate(
        prompts, max_new_tokens=10, grammar=[Grammar.choice(CHOICES), Grammar.regex("(ab|c)+x")] * 3)
        for on in ("true", "false")]
    assert results[0].token_ids == results[1].token_ids
    # (outputs of 3-6 tokens: the gain is a forward or more in 19, the draft model's the least)
    assert results[0].stats.target_forwards < results[1].stats.target_forwards
    assert results[0].stats.mean_accepted_length > results[1].stats.mean_accepted_length



@pytest.mark.slow
@pytest.mark.parametrize("drafter", ["draft_model", "dspark", "eagle3"])
def test_compiled_drafters_under_grammars(drafter):
    """engine.compile: rounds with constrained requests draft one compiled step at a time, the
    grammar's masks an input of each (DSpark: its backbone compiled, its head's steps eager); the
    other rounds as without grammars — a batch whose constrained requests end first switches from
    one to the other, and a compiled round's deferred append is made before a guided one. Greedy,
    token for token as constrained plain decoding; new prompts and grammars reuse the graphs."""
    from torch._dynamo.utils import counters

    prompts = [[5, 1, 2], [7, 7, 3], [0, 4], [10]]
    grammars = [Grammar.regex("(ba|a)+b?"), Grammar.choice(CHOICES), None, Grammar.choice(CHOICES)]
    plain = pipeline("none", "engine.max_batch_size=4")
    compiled = pipeline(drafter, "engine.max_batch_size=4", "engine.compile=true", "engine.trim_idle_slots=false")
    for budget, grammar in ((6, grammars), (12, None), (12, grammars)):
        expected = plain.generate(prompts, max_new_tokens=budget, grammar=grammar).token_ids
        assert compiled.generate(prompts, max_new_tokens=budget, grammar=grammar).token_ids == expected
    assert max(len(expected[b]) for b in (0, 1, 3)) < len(expected[2])  # (unguided rounds after guided ones)
    before = counters["stats"]["unique_graphs"]
    prompts, grammars = [PROMPT, [2, 2, 9], [1, 4], [6]], [Grammar.choice(CHOICES), None, Grammar.regex("(ab|c)+x"), None]
    for grammar in (grammars, None):
        expected = plain.generate(prompts, max_new_tokens=12, grammar=grammar).token_ids
        assert compiled.generate(prompts, max_new_tokens=12, grammar=grammar).token_ids == expected
    assert counters["stats"]["unique_graphs"] == before



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("drafter", ["draft_model", "dspark", "eagle3"])
def test_guided_drafting_on_gpu_with_cuda_graphs(drafter):
    """On CUDA, compiled and replayed from CUDA graphs (a graph per guided draft step, the masks
    copied into its input): greedy under grammars as constrained plain decoding, and the sampled
    joint of the first three tokens as the constrained target's (chi-square, significance 0.001)."""
    on_cuda = ("target.device=cuda", "engine.compile=true", "engine.cuda_graphs=true")
    prompts = [[5, 1, 2], [7, 7, 3], [0, 4], [10]]
    grammars = [Grammar.regex("(ba|a)+b?"), Grammar.choice(CHOICES), None, Grammar.choice(CHOICES)]
    expected = pipeline("none", "engine.max_batch_size=4").generate(prompts, max_new_tokens=12, grammar=grammars)
    graphed = pipeline(drafter, "engine.max_batch_size=4", *on_cuda)
    assert graphed.generate(prompts, max_new_tokens=12, grammar=grammars).token_ids == expected.token_ids
    target, _ = tiny_pair()
    counts = sampled_joint(pipeline(drafter, "engine.max_batch_size=5000", *on_cuda), SamplingParams(1.0))
    assert chi_square_p_value(counts, constrained_joint(target, SamplingParams(1.0))) > 1e-3

def test_round_masks_reuse_the_guide_s_masks_along_its_drafts():
    """The masks a guide filled while drafting are the verify positions' masks: ``round_masks``
    takes them (fewer fills) and returns what it fills without a guide — also where a forced token
    leaves the guide's drafts, and for a row whose logits hold no allowed token (not masked:
    its drafter's distribution stays)."""
    compiled = compiler().compile(Grammar.choice(CHOICES))
    tokens = torch.tensor([[6, 3] + [0] * 10, [6, 4] + [0] * 10, [6, 2] + [0] * 10])  # "ab"; "ba"; "c"
    state = DecodingState(tokens=tokens, prompt_lengths=torch.tensor([1, 1, 1]), lengths=torch.tensor([2, 2, 2]),
                          done=torch.tensor([False] * 3), max_new_tokens=8, params=SamplingParams())
    # the drafter's logits at each step: prefers "c", then "a" (row 2's rule out every token its
    # grammar allows after "c": "a", "c", "ab", "ca")
    logits = torch.full((3, VOCAB), -3.0)
    logits[:, 2], logits[:, 0] = 2.0, 1.0
    logits[2, [0, 2, 3, 5]] = float("-inf")
    def grammar_rows():
        rows = GrammarRows(slots=3, vocab_size=VOCAB, lookahead=4)
        for b in range(3):
            rows.admit(b, compiled, prompt_length=1)
        real_fill = rows._fill
        rows._fill = lambda matchers, *a: fills.append(len(matchers)) or real_fill(matchers, *a)
        return rows

    fills = []
    rows = grammar_rows()
    guide, drafts = rows.guide(state, [0, 1, 2]), []
    for _ in range(3):
        drafts.append(guide.mask(logits).argmax(-1))
        guide.take(drafts[-1])
    guide.rollback()
    drafts = torch.stack(drafts, 1)
    assert drafts[:2].tolist() == [[2, 0, EOS], [0, 1, EOS]]  # "ab"+"c"+"a" EOS; "ba"+"a"+"b" EOS
    assert drafts[2, 0] == 1 and guide.filled == [3, 3, 1] and guide.taken[2] == [] and sum(fills) == 7
    drafts[1, 1] = 9  # (a draft the guide did not take: the masks after it are filled afresh)
    results = []
    for rows, with_guide in ((rows, guide), (grammar_rows(), None)):
        fills.clear()
        results.append((rows.round_masks(state, drafts, torch.tensor([3, 3, 3]), [0, 1, 2], force=True,
                                         guide=with_guide), sum(fills), rows.taken))
    (guided, fills_with, taken_with), (plain, fills_without, taken_without) = results
    assert torch.equal(guided.allowed, plain.allowed) and torch.equal(guided.forced, plain.forced)
    assert torch.equal(guided.verify, plain.verify) and torch.equal(guided.dictated, plain.dictated)
    assert taken_with == taken_without == [1, 1, 1]
    assert fills_with < fills_without

def test_schedulers_learn_from_the_drafter_s_own_drafts_alone(monkeypatch):
    """A scheduler's ``record`` sees each row's drafts up to the first one the grammar dictated
    (and the accepted ones among them), never the forced ones: their acceptance says nothing of
    the drafter. The statistics count every verified draft."""
    pipe = pipeline("eagle3", "engine.max_batch_size=8")
    seen = []
    real = type(pipe.engine.scheduler).record
    monkeypatch.setattr(type(pipe.engine.scheduler), "record",
                        lambda self, verified, accepted: seen.append((verified.clone(), accepted.clone()))
                        or real(self, verified, accepted))
    prompts = [PROMPT, [2, 2, 9], [1, 4], [6], [5, 5], [8]]
    result = pipe.generate(prompts, max_new_tokens=10, grammar=Grammar.choice(CHOICES))
    recorded = sum(int(v.sum()) for v, _ in seen)
    assert all(bool((a <= v).all()) for v, a in seen)
    assert recorded < result.stats.verified_tokens  # (the forced drafts are verified, not recorded)

def test_a_session_admits_constrained_requests_into_freed_slots():
    """Continuous batching: constrained and unconstrained requests through two slots, each taking
    a slot another one freed; each decodes as alone (sampled, its own seed)."""
    pipe = pipeline("eagle3", "engine.max_batch_size=2")
    session = pipe.session(max_len=32)
    requests = [dict(prompt=PROMPT, grammar=Grammar.choice(CHOICES)), dict(prompt=[2, 9], max_new_tokens=3),
                dict(prompt=[4, 4], grammar=Grammar.regex("(ab|c)+x")), dict(prompt=[1], grammar=Grammar.choice(CHOICES))]
    requests = [dict(dict(max_new_tokens=8, temperature=1.0, seed=i), **r) for i, r in enumerate(requests)]
    ids = [session.submit(**r) for r in requests]
    while session.unfinished:
        session.step()
    for i, request in zip(ids, requests):
        alone = pipe.generate([request["prompt"]], **{k: v for k, v in request.items() if k != "prompt"})
        assert session.result(i).token_ids == alone.token_ids[0]


@pytest.mark.parametrize("drafter", ["none", "ngram"])
def test_a_grammar_s_dead_end_ends_that_request_alone(drafter, caplog):
    """``a[^\\s\\S]`` compiles but allows nothing after ``a``: the request ends there with finish
    reason ``"error"`` (its logged reason names the grammar) and keeps ``a``; the request beside
    it decodes as alone, and the session goes on to the next one."""
    pipe = pipeline(drafter, "engine.max_batch_size=2")
    good, dead = dict(prompt=PROMPT, grammar=Grammar.choice(CHOICES)), dict(prompt=[2, 9], grammar=Grammar.regex("a[^\\s\\S]"))
    session = pipe.session(max_len=32)
    ids = [session.submit(**request, max_new_tokens=8) for request in (good, dead, good)]
    while session.unfinished:
        session.step()
    outputs = [session.result(i) for i in ids]
    assert [o.finish_reason for o in outputs] == ["stop", "error", "stop"]
    assert outputs[1].token_ids == [TEXT.index("a")]
    alone = pipe.generate([PROMPT], max_new_tokens=8, grammar=Grammar.choice(CHOICES)).token_ids[0]
    assert outputs[0].token_ids == outputs[2].token_ids == alone
    assert "request 1: the target's distribution had no probability mass" in caplog.text and "grammar" in caplog.text


def test_a_json_schema_keeps_its_property_order():
    """Properties come in the schema's order, as xgrammar, vLLM and OpenAI give them ("reasoning"
    before "answer" is a reason to write a schema so)."""
    import string

    import xgrammar as xgr

    vocabulary = [*string.printable, "</s>"]
    eos = len(vocabulary) - 1
    schema = {"type": "object", "properties": {"reasoning": {"type": "string"}, "answer": {"type": "integer"}},
              "required": ["reasoning", "answer"], "additionalProperties": False}
    compiled = GrammarCompiler(vocabulary=vocabulary, vocab_size=len(vocabulary), stop_token_ids=[eos]).compile(
        Grammar.json_schema(schema, any_whitespace=False))

    def accepts(text: str) -> bool:
        matcher = xgr.GrammarMatcher(compiled)
        return all(matcher.accept_token(vocabulary.index(c)) for c in text) and matcher.accept_token(eos)

    assert accepts('{"reasoning": "x", "answer": 1}') and not accepts('{"answer": 1, "reasoning": "x"}')


def test_json_schema_with_the_embedded_tokenizer():
    """The Hugging Face path: the embedded target and its tokenizer, greedy EAGLE-3 under a JSON
    schema — the output parses and follows the schema, and equals plain constrained decoding's."""
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "size": {"type": "integer"}}, "required": ["name", "size"]}
    outputs = []
    for config in ("ar", "eagle3"):
        pipe = dspark.build_pipeline(config, overrides=["target.device=cpu"])
        result = pipe.generate(["def parse(config):\n    return "], max_new_tokens=48,
                               grammar=dspark.Grammar.json_schema(schema, any_whitespace=False))
        outputs.append(result.token_ids[0])
        value = json.loads(result.texts[0])
        assert set(value) == {"name", "size"} and isinstance(value["size"], int) and result.finish_reasons == ["stop"]
    assert outputs[0] == outputs[1]


def test_bad_grammar_requests_are_refused_before_any_work():
    pipe = pipeline("none")
    with pytest.raises(ValueError, match="ignore_eos"):
        pipe.generate([PROMPT], max_new_tokens=4, grammar=Grammar.choice(CHOICES), ignore_eos=True)
    with pytest.raises(ValueError, match="min_new_tokens"):
        pipe.generate([PROMPT], max_new_tokens=4, grammar=Grammar.choice(CHOICES), min_new_tokens=2)
    with pytest.raises(ValueError, match="regex grammar does not compile"):
        pipe.generate([PROMPT], max_new_tokens=4, grammar=Grammar.regex("(ab"))
    with pytest.raises(ValueError, match="2 entries for 1 prompts"):
        pipe.generate([PROMPT], max_new_tokens=4, grammar=[None, None])
    with pytest.raises(TypeError, match="dspark.structured.Grammar"):
        pipe.generate([PROMPT], max_new_tokens=4, grammar="abca")
    with pytest.raises(ValueError, match="non-empty list"):
        Grammar.choice([])
    with pytest.raises(ValueError, match="not valid JSON"):
        Grammar.json_schema("{")
    with pytest.raises(ValueError, match="unknown grammar kind"):
        Grammar("yaml")
    with pytest.raises(ValueError, match="need an EOS token"):
        GrammarCompiler(vocabulary=TEXT, vocab_size=VOCAB, stop_token_ids=[])
    with pytest.raises(ValueError, match="a vocabulary of 9 tokens; this pipeline's target has 12 logits"):
        pipe.grammar_compiler = GrammarCompiler(vocabulary=TEXT[:9], vocab_size=9, stop_token_ids=[EOS - 3])
    bare = spec_pipeline(tiny_pair()[0], "none", 3)
    with pytest.raises(ValueError, match="no tokenizer"):
        bare.generate([PROMPT], max_new_tokens=4, grammar=Grammar.json())


def test_the_compiler_keeps_the_last_grammars_used(monkeypatch):
    """A bounded cache: a server with a schema per request does not grow without bound; a grammar
    used again is compiled once while it stays among the last used."""
    import dspark.structured as structured

    monkeypatch.setattr(structured, "GRAMMAR_CACHE_SIZE", 3)
    grammars = [Grammar.regex(f"a{{{n}}}") for n in range(1, 6)]
    c = compiler()
    first = c.compile(grammars[0])
    for g in grammars[1:3]:
        c.compile(g)
    assert c.compile(grammars[0]) is first  # used again: the most recent now
    for g in grammars[3:]:
        c.compile(g)
    assert list(c._compiled) == [grammars[0], grammars[3], grammars[4]]


def test_choices_with_punctuation_quotes_and_newlines_compile_quietly_to_exactly_themselves(capfd):
    """Choices are EBNF string literals escaping only what the syntax needs (``\\``, ``"``, control
    characters): every ASCII punctuation mark escaped made xgrammar warn "Escape sequence ... not
    recognized". Walking every token sequence the grammar allows (one character a token) finds
    exactly the choices."""
    import xgrammar as xgr

    choices = ['a,b!', 'x-y?', '(1+2)*[3]', 'say "hi"', 'C:\\dir\\', 'two\nlines\tand\r', '\\u0041\\x41', '日本✓',
               '#{|}~$^.', "it's"]
    vocabulary = sorted({c for choice in choices for c in choice}) + ["</s>"]
    eos = len(vocabulary) - 1
    compiled = GrammarCompiler(vocabulary=vocabulary, vocab_size=len(vocabulary), stop_token_ids=[eos]).compile(
        Grammar.choice(choices))
    assert "Escape sequence" not in capfd.readouterr().err
    matcher, found = xgr.GrammarMatcher(compiled), []
    bitmask = xgr.allocate_token_bitmask(1, len(vocabulary))

    def walk(text: str) -> None:
        matcher.fill_next_token_bitmask(bitmask)
        for token in unpack_bitmask(bitmask, len(vocabulary))[0].nonzero().flatten().tolist():
            if token == eos:
                found.append(text)
                continue
            assert matcher.accept_token(token)
            walk(text + vocabulary[token])
            matcher.rollback(1)

    walk("")
    assert sorted(found) == sorted(choices)
    with pytest.raises(ValueError, match="NUL"):
        Grammar.choice(["a\0b"])
