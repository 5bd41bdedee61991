"""The EAGLE-3 drafter (``name: eagle3``): an autoregressive one-layer head over the target's
fused hidden states. The network is in :mod:`dspark.drafters.eagle_model`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from dspark.cache import StaticKVCache
from dspark.drafters.base import Drafter, DrafterConfig, register_drafter
from dspark.drafters.calibrated import find_calibration
from dspark.drafters.checkpoint import check_size, checkpoint_args, drafter_network, load_weights, save_drafter
from dspark.drafters.eagle3_import import DEFAULT_GAMMA, import_eagle3, published_args, read_published_config
from dspark.drafters.eagle_model import Eagle3Args, Eagle3Head
from dspark.drafters.early_stop import check_min_survival, draft_while_likely, top_probability
from dspark.models.compiled import compile_forward
from dspark.models.graphs import GraphedFunction
from dspark.models.native import build_attention_mask
from dspark.records import DecodingState, DraftProposal, ModelOutput, VerificationResult
from dspark.samplers.penalties import DraftPenalty, after_draft, draft_penalty, penalize_draft

CHECKPOINT_KEY = "eagle3"  # config.json key of the architecture


@dataclass
class Eagle3Config(DrafterConfig):
    """Config of the ``eagle3`` drafter.

    Attributes:
        num_speculative_tokens: γ draft steps per round.
        path: checkpoint directory or embedded name (default: ``dspark-tiny-eagle3``, trained for the
            embedded target); ``null`` builds a randomly initialised head from the keys below. A
            published EAGLE-3 head (``LlamaForCausalLMEagle3``, as EAGLE and SpecForge train it and
            vLLM / SGLang serve it) is read too: :mod:`dspark.drafters.eagle3_import`.
        target_layers, intermediate_size, draft_vocab_size, qk_norm, norm_before_residual, seed:
            architecture of a random head (``path: null``; unset: a low, a middle and the last
            layer, the target's MLP width, the target's vocabulary, per-head q/k norms as the target
            has them, the raw feature as the residual stream). A checkpoint brings its own: set
            keys must agree with it, or the drafter is refused.
        min_survival: stop drafting a request once the survival its confidences predict,
            ``a_k = Π_{i≤k} c_i``, falls below this (``c_k``: the head's top probability at position
            k, before the sampler's processing); ``x_k`` is then not offered. ``0`` (default) drafts
            γ every round. ``c_k`` depends on the drafts before ``x_k``, never on ``x_k`` itself, so
            decoding stays lossless; it saves draft steps and verify width where drafts are doubtful.
            With a calibration the survival is the calibrated one.
        calibration: per-position maps of the confidences, ``σ(logit(c_k) / T_k + b_k)`` (fitted
            by ``dspark calibrate --config eagle3``; one for sampling, one for greedy decoding: see
            :mod:`dspark.drafters.calibrated`): ``auto`` reads ``calibration.json`` beside the
            checkpoint when there is one, a path reads that file (at least γ positions; the first γ
            are used), ``null`` keeps the raw top probabilities.
    """

    name: str = "eagle3"
    num_speculative_tokens: int = 7
    path: str | None = "dspark-tiny-eagle3"
    target_layers: list[int] = field(default_factory=list)
    intermediate_size: int | None = None
    draft_vocab_size: int | None = None
    qk_norm: bool | None = None
    norm_before_residual: bool | None = None
    seed: int = 0
    min_survival: float = 0.0
    calibration: str | None = "auto"


def default_eagle_layers(num_layers: int) -> tuple[int, int, int]:
    """Low, middle and high target layers (EAGLE-3 fuses three)."""
    return (min(1, num_layers - 1), num_layers // 2, num_layers - 1)


def save_eagle3(head: Eagle3Head, directory: str | Path, extra: dict | None = None) -> None:
    """Write ``config.json`` (architecture + the target it was built for) and ``model.safetensors``."""
    save_drafter(head, directory, CHECKPOINT_KEY, extra)


def load_eagle3(source, target, *, gamma: int | None = None) -> Eagle3Head:
    """A trained head from a directory or embedded name, checked against ``target`` (a checkpoint
    built for another target is refused, naming what differs; so is a bad ``d2t`` map).

    A published EAGLE-3 head (EAGLE / SpecForge format, as vLLM and SGLang serve it) is read too
    (:mod:`dspark.drafters.eagle3_import`); ``gamma`` is then the γ it is said to unroll (the
    format does not say; dspark checkpoints bring their own)."""
    from dspark.models.loading import resolve_checkpoint

    directory = resolve_checkpoint(source)
    published = read_published_config(directory)
    if published is not None:
        return import_eagle3(directory, published, target, gamma=gamma or DEFAULT_GAMMA)
    args = checkpoint_args(source, CHECKPOINT_KEY, Eagle3Args, target)
    head = load_weights(Eagle3Head(args), Path(directory))
    if args.draft_vocab_size:
        head.set_draft_vocabulary(head.d2t.clone())  # validates the stored map
    return head


def eagle3_args(source, target, *, gamma: int | None = None) -> Eagle3Args:
    """The architecture of the head checkpoint ``source`` (dspark's or a published one), checked
    against ``target`` from the configs alone (``target`` may be a meta-device skeleton); a
    published head's config says no more than that its LM head is its own."""
    from dspark.models.loading import resolve_checkpoint

    directory = resolve_checkpoint(source)
    published = read_published_config(directory)
    if published is not None:
        return published_args(published, target, gamma=gamma or DEFAULT_GAMMA,
                              where=f"EAGLE-3 checkpoint {str(directory)!r}")
    return checkpoint_args(source, CHECKPOINT_KEY, Eagle3Args, target)


@register_drafter("eagle3")
class Eagle3Drafter(Drafter):
    """Drafts γ tokens one at a time with a single decoder layer.

    The head keeps its own KV cache of *pairs* (target feature at position p, token p + 1): one
    per committed position but the anchor, so the last pair's output predicts the first draft.
    After each round it appends the pairs the target kept, from the verify forward's hidden
    states (no extra target pass); draft steps write past the committed length and are never
    committed. Proposals carry ``q`` when sampling and, as confidences, the head's top probability
    at each position (:func:`~dspark.drafters.early_stop.top_probability`, not the drafted token's
    probability: see there), mapped per position when a calibration is found (``dspark
    calibrate``). With ``min_survival`` a request stops drafting once the product of its
    confidences falls below it.
    """

    config_class = Eagle3Config
    provides_confidence = True
    calibration_method = "platt"  # top probabilities sit mostly below ½ where greedy drafts are accepted
    replaceable_drafts = True  # (commit appends the committed tokens with the target's hidden states)
    guidable = True
    #: with ``min_survival``, draft steps per compiled call between survival checks (a call costs
    #: 0.1–0.3 ms of overhead on this project's CPU; drafting past a request's stop costs a step)
    check_every = 2
    #: with ``engine.compile``, append a round's pairs in the next round's draft call (one compiled call)
    fuse_append = True

    def __init__(self, config: Eagle3Config, *, target, sampler, draft_model=None):
        super().__init__(config, target=target, sampler=sampler, draft_model=draft_model)
        self.min_survival = check_min_survival(config.min_survival)
        if config.intermediate_size is not None:
            check_size("drafter.intermediate_size", config.intermediate_size, why="null: the target's MLP width")

        def build() -> Eagle3Head:
            torch.manual_seed(config.seed)
            layers = tuple(config.target_layers) or default_eagle_layers(target.num_layers)
            return Eagle3Head(Eagle3Args.for_target(target, gamma=config.num_speculative_tokens, target_layers=layers,
                                                    intermediate_size=config.intermediate_size,
                                                    draft_vocab_size=config.draft_vocab_size or 0,
                                                    qk_norm=config.qk_norm,
                                                    norm_before_residual=bool(config.norm_before_residual)))

        requested = {"target_layers": config.target_layers or None, "intermediate_size": config.intermediate_size,
                     "draft_vocab_size": config.draft_vocab_size, "qk_norm": config.qk_norm,
                     "norm_before_residual": config.norm_before_residual}
        load = lambda source, target: load_eagle3(source, target, gamma=config.num_speculative_tokens)  # noqa: E731
        head = drafter_network("eagle3", Eagle3Head, load, build, target=target, draft_model=draft_model,
                               path=config.path, requested=requested)
        self.head = head.to(dtype=target.dtype, device=target.device).eval().requires_grad_(False)
        self.calibration = find_calibration(config.calibration, config.path if draft_model is None else draft_model,
                                            self.gamma, target.device, drafter=config.name)
        self.hidden_layers = tuple(head.args.target_layers)
        self.cache: StaticKVCache | None = None  # the rows the rounds run over (a view of whole_cache)
        self.whole_cache: StaticKVCache | None = None  # every slot's
        self.last_output: torch.Tensor | None = None  # [B, H] the last committed pair's output d
        self._append_round, self._draft_steps, self._static_kv = self.append_pairs, self.draft_steps, False
        self._append_and_draft = None  # compiled: a round's append runs in the next round's draft call
        self._deferred: tuple | None = None  # (following tokens, hidden states, num_new) not yet appended

    @classmethod
    def check_checkpoint(cls, config: Eagle3Config, target) -> None:
        if config.path is not None:
            eagle3_args(config.path, target, gamma=config.num_speculative_tokens)

    def compile(self) -> None:
        # static shapes: every draft step and every round's append reads the whole pair cache; the
        # drafting loop is one graph (unrolled), each round's append (fusing the target's features
        # included) another; the prompt's append (a new width per prompt length) stays eager
        self._append_round = compile_forward(self.append_pairs, self.target.device)
        self._draft_steps = compile_forward(self.draft_steps, self.target.device)
        self._append_and_draft = compile_forward(self.append_and_draft, self.target.device)
        self._static_kv = True

    def use_graphs(self, capture=None) -> None:
        # one graph per batch size and sampling settings for the drafting steps (the first round's)
        # and for a round's append fused with the next draft call (every round after): each step
        # reads the whole pair cache and appends are padded to γ + 1 pairs. The append advances the
        # pair cache's lengths: kept as they were across a capture. The prompt's append stays eager.
        self._draft_steps = GraphedFunction(self._draft_steps, capture=capture)
        self._append_and_draft = GraphedFunction(self._append_and_draft or self.append_and_draft, capture=capture,
                                                 preserve=lambda: [self.cache.lengths])
        self._static_kv = True

    def num_uniforms(self, params) -> int:
        return 0 if params.greedy else self.gamma

    def _pair_step(self, features: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor, kv_len: int,
                   only: torch.Tensor | None = None, cache=None):
        """The draft layer over pairs (``features`` ``[B, T, H]``, ``tokens`` ``[B, T]``) written at
        positions ``lengths[:, None] + arange(T)``, causal: the outputs ``d`` ``[B, T, H]``; with
        ``only`` ``[B]``, just the output of pair ``only[b]`` ``[B, 1, H]`` (every pair's keys/values
        are still written; attention and MLP run for that one query, which sees the pairs up to its own).
        ``cache``: the pair cache (default) or a view of some of its rows."""
        target, layer, num_tokens = self.target, self.head.layer, tokens.shape[1]
        positions = lengths.unsqueeze(1) + torch.arange(num_tokens, device=tokens.device)
        rope = target.rotary(positions, features.dtype)
        q, kv = layer.project_pair(target.embed_tokens(tokens), features, rope)
        keys, values = (cache or self.cache).write(0, kv, positions, kv_len)
        if only is None:
            return layer.attend(features, q, keys, values, build_attention_mask(lengths, num_tokens, kv_len))
        pick = lambda x: x.gather(1, only.view(-1, *[1] * (x.dim() - 1)).expand(-1, 1, *x.shape[2:]))  # noqa: E731
        return layer.attend(pick(features), pick(q), keys, values, build_attention_mask(lengths + only, 1, kv_len))

    def append_pairs(self, tokens: torch.Tensor, hidden_states: list[torch.Tensor], num_new: torch.Tensor,
                     kv_len: int, cache=None) -> torch.Tensor:
        """Commit ``num_new[b]`` pairs per request: the fused target features ``[B, T, ·]`` (per layer
        id) with ``tokens`` ``[B, T]``, the committed tokens that follow them; returns each request's
        last output ``[B, H]``, the next round's first feature (``cache``: the pair cache, or a view
        of some of its rows)."""
        cache = cache or self.cache
        # only each request's last kept pair's output is needed (the next round's first feature)
        last = (num_new - 1).clamp(min=0)  # [B]
        d = self._pair_step(self.head.fuse(hidden_states), tokens, cache.lengths, kv_len, only=last, cache=cache)
        cache.advance(num_new)
        return d.squeeze(1)

    def _following_tokens(self, state: DecodingState, num_tokens: int) -> torch.Tensor:
        """``[B, T]`` the committed tokens after each of the next ``T`` pair positions (the token
        buffer's width varies per call: read outside the compiled append)."""
        positions = self.cache.lengths.unsqueeze(1) + 1 + torch.arange(num_tokens, device=state.tokens.device)
        return state.tokens.gather(1, positions.clamp(max=state.tokens.shape[1] - 1))

    def start(self, state: DecodingState, target_output: ModelOutput, max_len: int) -> None:
        batch, a = state.batch_size, self.head.args
        cache = self.whole_cache
        if cache is None or cache.batch_size != batch or cache.max_len < max_len + self.gamma:
            for graphed in (self._draft_steps, self._append_and_draft):
                if isinstance(graphed, GraphedFunction):  # its graphs read the old cache
                    graphed.clear()
            cache = self.whole_cache = StaticKVCache(1, batch, a.num_kv_heads, max_len + self.gamma, a.head_dim,
                                                     dtype=self.target.dtype, device=self.target.device)
        self.cache = cache  # (every row until the engine says otherwise: use_rows)
        cache.reset()
        self._deferred = None
        prompt_width = target_output.hidden_states[0].shape[1]
        self.last_output = self.append_pairs(self._following_tokens(state, prompt_width), target_output.hidden_states,
                                             state.prompt_lengths, min(prompt_width, cache.max_len))
        self._last_outputs = self.last_output  # [slots, H] (rounds over fewer rows write their own: use_rows)

    def admit(self, rows: torch.Tensor, state: DecodingState, target_output: ModelOutput) -> None:
        """The new requests' prompt pairs into their rows of the pair cache, and their last outputs
        (as :meth:`start` does for a whole batch)."""
        self.flush()
        cache = self.whole_cache.rows(rows)
        prompt_lengths = state.prompt_lengths[rows]
        cache.set_lengths(torch.zeros_like(prompt_lengths))
        width = target_output.hidden_states[0].shape[1]
        positions = (1 + torch.arange(width, device=rows.device)).clamp(max=state.tokens.shape[1] - 1)
        following = state.tokens[rows][:, positions]  # [k, P]: the token after each prompt position
        d = self.append_pairs(following, target_output.hidden_states, prompt_lengths, width, cache)
        self._whole_last_output().index_copy_(0, rows, d)
        self.last_output = self._last_outputs[:self.cache.batch_size]

    def _whole_last_output(self) -> torch.Tensor:
        """Every slot's last output ``[slots, H]``, the rounds' rows' up to date (they are written as
        a new tensor each round)."""
        whole, rows = self._last_outputs, self.last_output.shape[0]
        if self.last_output.data_ptr() != whole.data_ptr():
            whole[:rows] = self.last_output
        return whole

    def use_rows(self, rows: int, state: DecodingState) -> None:
        """Rounds run over the first ``rows`` slots: the pair cache's first rows and last outputs
        serve them. The pairs a compiled round left to append are appended first, over its rows."""
        self.flush()
        self.last_output = self._whole_last_output()[:rows]
        self.cache = self.whole_cache.head(rows)

    def propose(self, state: DecodingState, uniforms: torch.Tensor) -> DraftProposal:
        cache, gamma = self.cache, self.gamma
        kv_len = cache.max_len if self._static_kv else min(state.max_cache_len + gamma, cache.max_len)
        if self.min_survival > 0:
            return self._propose_while_likely(state, uniforms, kv_len)
        tokens, q, p, *_ = self._first_steps(gamma, uniforms, state, kv_len)
        return DraftProposal(tokens=tokens, num_tokens=torch.where(state.done, 0, gamma), probs=q, confidence=p)

    def _first_steps(self, stop: int, uniforms: torch.Tensor, state: DecodingState, kv_len: int):
        """Draft ``x_1..x_stop`` from the last committed pair (appending last round's pairs first, in
        the same compiled call, when a compiled round left them): :meth:`draft_steps`'s outputs."""
        params, penalty = state.params, draft_penalty(state.penalties)
        if self.guide is not None:  # (a grammar's masks between the draft steps: one call per step)
            self.flush()
            return self._guided_steps(self.last_output, None, penalty, uniforms, params, kv_len, 0, stop)
        if self._deferred is not None:
            *drafts, self.last_output = self._append_and_draft(*self._deferred, penalty, uniforms, params, kv_len, stop)
            self._deferred = None
            return drafts
        return self._draft_steps(self.last_output, None, penalty, self.cache.lengths, uniforms, params, kv_len, 0, stop)

    def _propose_while_likely(self, state: DecodingState, uniforms: torch.Tensor, kv_len: int) -> DraftProposal:
        """Draft ``check_every`` steps per compiled call while some request's survival stays at or
        above ``min_survival`` (:func:`~dspark.drafters.early_stop.draft_while_likely`)."""
        params = state.params

        def first(stop):
            tokens, q, p, d, penalty = self._first_steps(stop, uniforms, state, kv_len)
            return tokens, q, p, (d, tokens[:, -1], penalty)

        def more(carry, start, stop):
            if self.guide is not None:
                tokens, q, p, d, penalty = self._guided_steps(*carry, uniforms, params, kv_len, start, stop)
            else:
                tokens, q, p, d, penalty = self._draft_steps(*carry, self.cache.lengths, uniforms, params, kv_len,
                                                             start, stop)
            return tokens, q, p, (d, tokens[:, -1], penalty)

        proposal, _ = draft_while_likely(first, more, gamma=self.gamma, check_every=self.check_every,
                                         min_survival=self.min_survival, done=state.done)
        return proposal

    def _guided_steps(self, d: torch.Tensor, previous: torch.Tensor | None, penalty: DraftPenalty,
                      uniforms: torch.Tensor, params, kv_len: int, start: int, stop: int):
        """:meth:`draft_steps` of ``x_{start+1}..x_stop`` one step (one compiled call) at a time, each
        under the round's grammar masks (:meth:`~dspark.structured.DraftGuide.steps`)."""
        def step(carry, k, allowed):
            d, previous, penalty = carry
            tokens, q, p, d, penalty = self._draft_steps(d, previous, penalty, self.cache.lengths, uniforms, params,
                                                         kv_len, k, k + 1, allowed)
            return tokens, q, p, (d, tokens[:, 0], penalty)

        tokens, q, p, (d, _, penalty) = self.guide.steps(step, (d, previous, penalty), start, stop)
        return tokens, q, p, d, penalty

    def draft_steps(self, d: torch.Tensor, previous: torch.Tensor | None, penalty: DraftPenalty, lengths: torch.Tensor,
                    uniforms: torch.Tensor, params, kv_len: int, start: int, stop: int,
                    allowed: torch.Tensor | None = None):
        """Draft ``x_{start+1}..x_stop`` left to right over a pair cache of ``lengths`` ``[B]``: from the
        last committed pair's output ``d`` ``[B, H]`` when ``start`` is 0, else from the output ``d``
        that drafted ``previous`` ``[B]`` (= ``x_start``); ``penalty``: the penalty at ``x_{start+1}``
        (:mod:`dspark.samplers.penalties`; ``None`` without). Returns tokens ``[B, n]``, ``q``
        ``[B, n, V]`` (``None`` when greedy), each position's confidence ``[B, n]`` (calibrated
        when a calibration was found), the output that drafted the last one ``[B, H]`` and the
        penalty after it. One function, so that ``engine.compile`` makes each range one graph (the
        loop unrolled). ``allowed`` ``[B, V]``: a grammar's masks for a single step (a guided round)."""
        drafted, probs, confidence = [], [], []
        for k in range(start, stop):
            if k:  # the pair (d, x_k): the head's own output is the next feature
                d = self._pair_step(d.unsqueeze(1), previous.unsqueeze(1), lengths + k - 1, kv_len).squeeze(1)
            logits = penalize_draft(self.head.logits(d, self.target), params, penalty)  # [B, V]
            previous, q, logits = self.draw(logits, params, None if params.greedy else uniforms[:, k], allowed)
            drafted.append(previous), probs.append(q), confidence.append(self.confidence_at(logits, previous))
            penalty = after_draft(penalty, previous)
        q, confidence = (None if params.greedy else torch.stack(probs, 1)), torch.stack(confidence, 1)
        if self.calibration is not None:  # σ(logit(c_k) / T_k + b_k)
            confidence = self.calibration.apply(confidence, start, stop, params)
        return torch.stack(drafted, 1), q, confidence, d, penalty

    def confidence_at(self, logits: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        """``c_k`` ``[B]`` from the head's logits at position k ``[B, V]``: its top probability.
        ``token`` ``[B]`` is the draft drawn from them; a confidence must not depend on it (a
        subclass may define its own ``c_k`` from the logits: schedulers and ``min_survival`` decide
        from it whether ``x_k`` is verified, and that choice may not read ``x_k``)."""
        return top_probability(logits)

    def append_and_draft(self, following: torch.Tensor, hidden_states: list[torch.Tensor], num_new: torch.Tensor,
                         penalty: DraftPenalty, uniforms: torch.Tensor, params, kv_len: int, stop: int):
        """:meth:`append_pairs` then :meth:`draft_steps` of ``x_1..x_stop`` from its output, as one
        function (one compiled call per round instead of two): :meth:`draft_steps`'s tokens, ``q``,
        confidences and last drafting output, then the appended last output ``[B, H]``."""
        d = self.append_pairs(following, hidden_states, num_new, kv_len)
        return (*self.draft_steps(d, None, penalty, self.cache.lengths, uniforms, params, kv_len, 0, stop), d)

    def flush(self) -> None:
        """Append the pairs a compiled round left for the next draft call (to inspect the pair cache
        between rounds; drafting does it by itself)."""
        if self._deferred is not None:
            self.last_output = self._append_round(*self._deferred, self.cache.max_len)
            self._deferred = None

    def commit(self, state: DecodingState, proposal: DraftProposal, result: VerificationResult,
               target_output: ModelOutput) -> None:
        # one pair per position the target kept: its cache holds every committed token but the anchor
        num_tokens = target_output.hidden_states[0].shape[1]
        hidden_states = target_output.hidden_states
        if self._static_kv and num_tokens < self.gamma + 1:
            # a narrower verify (a scheduler, or drafting stopped early): compiled appends see one
            # width per batch size; the padding pairs lie past the committed length, never attended
            pad = self.gamma + 1 - num_tokens
            hidden_states = [torch.nn.functional.pad(h, (0, 0, 0, pad)) for h in hidden_states]
            num_tokens = self.gamma + 1
        pairs = (self._following_tokens(state, num_tokens), hidden_states, (state.lengths - 1) - self.cache.lengths)
        if self._append_and_draft is not None and self.fuse_append:  # appended by the next propose
            self._deferred = pairs
            return
        kv_len = self.cache.max_len if self._static_kv else min(state.max_cache_len + num_tokens, self.cache.max_len)
        self.last_output = self._append_round(*pairs, kv_len)
