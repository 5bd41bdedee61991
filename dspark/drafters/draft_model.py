"""An independent small causal LM as the drafter (classic speculative decoding)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dspark.drafters.base import Drafter, DrafterConfig, register_drafter
from dspark.drafters.calibrated import find_calibration
from dspark.drafters.early_stop import check_min_survival, draft_while_likely, top_probability
from dspark.models.compiled import compile_forward
from dspark.models.graphs import GraphedFunction
from dspark.records import DecodingState, DraftProposal, ModelOutput, VerificationResult
from dspark.samplers.penalties import DraftPenalty, after_draft, draft_penalty, penalize_draft


#: skipped rounds after which the draft model is fed the tokens it lacks without drafting
MAX_LAG = 31


@dataclass
class DraftModelConfig(DrafterConfig):
    """Config of the ``draft_model`` drafter.

    Attributes:
        num_speculative_tokens: γ, tokens drafted autoregressively per round.
        path: checkpoint directory or embedded model name of the draft model (default: the embedded
            ``dspark-tiny-draft``, distilled from ``dspark-tiny``); ``build_pipeline(draft_model=...)``
            replaces it.
        random: instead of ``path``, an architecture spec for a random draft model (tests).
        dtype: the draft model's dtype (``null`` = the target's).
        backend: ``auto``, ``native`` or ``hf`` (as for the target).
        trust_remote_code: let ``transformers`` run model code shipped with the draft model's
            checkpoint (off unless asked; the target's flag does not cover the draft model).
        min_survival: stop drafting a request once its survival ``a_k = Π_{i≤k} c_i`` falls below
            this (``c_k``: the draft model's top probability at step k, calibrated when a
            calibration is found); ``x_k`` is then not offered. ``0`` (default) drafts γ every
            round. ``c_k`` never depends on ``x_k`` itself, so decoding stays lossless.
        calibration: per-position maps of the confidences, ``σ(logit(c_k) / T_k + b_k)`` (fitted
            by ``dspark calibrate --config draft_model``; one for sampling, one for greedy decoding:
            see :mod:`dspark.drafters.calibrated`): ``auto`` reads ``calibration.json`` beside the
            draft model's checkpoint when there is one, a path reads that file, ``null`` keeps the
            raw top probabilities.
    """

    name: str = "draft_model"
    num_speculative_tokens: int = 4
    path: str | None = "dspark-tiny-draft"
    random: dict[str, Any] | None = None
    dtype: str | None = None
    backend: str = "auto"
    trust_remote_code: bool = False
    min_survival: float = 0.0
    calibration: str | None = "auto"


@register_drafter("draft_model")
class DraftModelDrafter(Drafter):
    """Drafts γ tokens with its own model and KV cache, sampling each from ``q_k`` (the draft
    model's distribution after the shared sampler's processing). Proposals carry, as confidences,
    the draft model's top probability at each step (before the sampler's processing; mapped per
    position when a calibration is found), so confidence schedulers and ``min_survival`` apply.

    The draft cache holds a prefix of the committed tokens and is rolled back with the target's.
    Each round's first step feeds what it lacks, up to and including the anchor, in one ragged
    forward: usually just the anchor; also ``x_γ`` after a round that accepted all γ drafts (the
    last draft is never fed while drafting); and the tokens of rounds a scheduler skipped
    (``skippable``: a skipped round leaves the cache as it was, one token behind per round).
    """

    config_class = DraftModelConfig
    skippable = True
    provides_confidence = True
    guidable = True
    calibration_method = "platt"  # a top probability, like EAGLE-3's
    #: with ``min_survival``, draft steps per compiled call between survival checks
    check_every = 2

    def __init__(self, config: DraftModelConfig, *, target, sampler, draft_model=None):
        super().__init__(config, target=target, sampler=sampler, draft_model=draft_model)
        from dspark.models import load_model, random_hf_model

        source = draft_model
        if source is None and config.random is not None:
            spec = dict(config.random)
            seed = int(spec.pop("seed", 0))
            source = random_hf_model(spec, seed=seed)
        if source is None and config.path is not None:
            source = config.path
        if source is None:
            raise ValueError("drafter 'draft_model' needs a draft model: set drafter.path (a checkpoint directory) "
                             "or pass build_pipeline(draft_model=...)")
        if config.backend not in ("auto", "native", "hf"):
            raise ValueError(f"drafter.backend must be one of auto, native, hf; got {config.backend!r}")
        self.model = load_model(source, dtype=config.dtype or target.dtype, device=target.device, backend=config.backend,
                                trust_remote_code=config.trust_remote_code)
        if self.model.vocab_size != target.vocab_size:
            raise ValueError(f"draft model vocabulary ({self.model.vocab_size} tokens) differs from the target's "
                             f"({target.vocab_size} tokens); a draft model must share the target's tokenizer")
        self._set_up(source if isinstance(source, (str, Path)) else None)  # (a model object has no directory)

    def _set_up(self, checkpoint: str | Path | None) -> None:
        """What drafting needs besides :attr:`model`: the early stop, the calibration (found beside
        ``checkpoint``, when there is one), the caches (made by :meth:`start`) and the forwards."""
        self.min_survival = check_min_survival(self.config.min_survival)
        self.calibration = find_calibration(self.config.calibration, checkpoint, self.gamma, self.target.device,
                                            drafter=self.config.name)
        self.cache = self.whole_cache = None  # the rows the rounds run over (a view of whole_cache); every slot's
        self._forward, self._draft_steps, self._static_kv = self.model, self.draft_steps, False
        self._catch_up = self.catch_up

    def compile(self) -> None:
        # static shapes: every step reads the whole draft cache. The catch-up step is one graph per
        # batch size and width (1, 2 or MAX_LAG + 1: see _feed); the drafting steps are one graph
        # per batch size and sampling settings (the loop unrolled), so a round pays the per-call
        # overhead twice, not γ times
        self._forward = compile_forward(self.model, self.target.device)
        self._draft_steps = compile_forward(self.draft_steps, self.target.device)
        self._static_kv = True

    def use_graphs(self, capture=None) -> None:
        # the catch-up step (one graph per batch size and width: 1, 2 or MAX_LAG + 1) and the
        # drafting steps (one per batch size and sampling settings) read the whole draft cache and
        # advance its lengths: kept as they were across a capture. The prompt's forward stays eager.
        self._catch_up = GraphedFunction(self.catch_up, capture=capture, preserve=lambda: [self.cache.lengths])
        self._draft_steps = GraphedFunction(self._draft_steps, capture=capture, preserve=lambda: [self.cache.lengths])
        self._static_kv = True

    def num_uniforms(self, params) -> int:
        return 0 if params.greedy else self.gamma

    def catch_up(self, tokens: torch.Tensor, num_new: torch.Tensor, last: torch.Tensor, kv_len: int) -> torch.Tensor:
        """Feed ``tokens`` ``[B, W]`` (the first ``num_new[b]`` real) to the draft cache: the logits
        after token ``last[b]`` of each row ``[B, 1, V]``."""
        return self._forward(tokens, self.cache, num_new, kv_len=kv_len, logits_positions=last.unsqueeze(1)).logits

    def start(self, state: DecodingState, target_output: ModelOutput, max_len: int) -> None:
        batch, max_prompt = state.batch_size, int(state.max_cache_len)
        max_len += MAX_LAG + 1  # room for the padding of a catch-up step
        cache = self.whole_cache
        if cache is None or cache.batch_size != batch or cache.max_len < max_len:
            for graphed in (self._catch_up, self._draft_steps):
                if isinstance(graphed, GraphedFunction):  # its graphs read the old cache
                    graphed.clear()
            cache = self.whole_cache = self.model.new_cache(batch, max_len)
        self.cache = cache  # (every row until the engine says otherwise: use_rows)
        cache.reset()
        self.model(state.tokens[:, :max_prompt], cache, state.prompt_lengths, kv_len=max_prompt,
                   logits_positions=torch.zeros(batch, 1, dtype=torch.long, device=state.tokens.device))
        self.max_lag = 0  # most committed tokens before the anchor that any request's cache lacks (host int)
        self.fed: torch.Tensor | None = None
        self.fed_steps = 0  # drafts fed to the cache by the last propose (host int)

    @property
    def can_admit(self) -> bool:
        return hasattr(self.model, "cache_shape")  # a native draft model: its static cache has row views

    def admit(self, rows: torch.Tensor, state: DecodingState, target_output: ModelOutput) -> None:
        """Prefill the new requests' prompts into their rows of the draft cache (as :meth:`start`;
        their anchors are fed by the next :meth:`propose`, like every request's)."""
        prompt_lengths = state.prompt_lengths[rows]
        longest = int(prompt_lengths.max())
        cache = self.whole_cache.rows(rows)
        cache.set_lengths(torch.zeros_like(prompt_lengths))
        self.model(state.tokens[rows, :longest], cache, prompt_lengths, kv_len=longest,
                   logits_positions=torch.zeros(rows.shape[0], 1, dtype=torch.long, device=rows.device))

    @property
    def can_use_rows(self) -> bool:
        return self.can_admit

    def use_rows(self, rows: int, state: DecodingState) -> None:
        """Rounds run over the first ``rows`` slots: the draft cache's first rows serve them. (Rows
        join or leave between rounds as empty slots or new requests: nothing of theirs to feed.)"""
        self.cache = self.whole_cache.head(rows)

    def _feed(self, state: DecodingState, with_anchor: bool):
        """Feed each unfinished request's committed tokens the cache lacks (and its anchor): one ragged step."""
        width = self.max_lag + int(with_anchor)
        if self._static_kv and width > 2:  # compiled steps: three widths (1, 2, MAX_LAG + 1), so the
            width = MAX_LAG + 1            # rare catch-ups after skipped rounds compile one graph, not five
        start = self.cache.lengths
        positions = (start.unsqueeze(1) + torch.arange(width, device=start.device)).clamp(max=state.tokens.shape[1] - 1)
        num_new = torch.where(state.done, 0, state.lengths - int(not with_anchor) - start)
        kv_len = self.cache.max_len if self._static_kv else min(state.max_cache_len + width + self.gamma,
                                                                 self.cache.max_len)
        logits = self._catch_up(state.tokens.gather(1, positions), num_new, (num_new - 1).clamp(min=0), kv_len)
        self.max_lag = 0
        return logits, kv_len

    def propose(self, state: DecodingState, uniforms: torch.Tensor) -> DraftProposal:
        params, gamma = state.params, self.gamma
        active = ~state.done
        logits, kv_len = self._feed(state, with_anchor=True)  # step 0: [missing tokens…, anchor]
        num_new, first_logits = active.long(), logits[:, -1]

        def steps_from(carry, start, stop):  # x_{start+1}..x_stop from the logits of step start + 1 (and its penalty)
            if self.guide is None:
                return self._draft_steps(*carry, num_new, uniforms, params, kv_len, start, stop)
            # a grammar's masks between the steps: one step (one compiled call) at a time
            return self.guide.steps(lambda carry, k, allowed: self._draft_steps(
                *carry, num_new, uniforms, params, kv_len, k, k + 1, allowed), carry, start, stop)

        first = (first_logits, draft_penalty(state.penalties))
        if self.min_survival > 0:
            proposal, steps = draft_while_likely(lambda stop: steps_from(first, 0, stop), steps_from,
                                                 gamma=gamma, check_every=self.check_every,
                                                 min_survival=self.min_survival, done=state.done)
        else:
            tokens, q, confidence, _ = steps_from(first, 0, gamma)
            proposal, steps = DraftProposal(tokens=tokens, num_tokens=torch.where(active, gamma, 0), probs=q,
                                            confidence=confidence), gamma
        # drafts fed to the cache this round: each drafted step's but x_γ's (commit rolls back the
        # rejected ones; a round that skips propose leaves self.fed None)
        self.fed_steps = min(steps, gamma - 1)
        self.fed = torch.where(active, self.fed_steps, 0)
        return proposal

    def draft_steps(self, logits: torch.Tensor, penalty: DraftPenalty, num_new: torch.Tensor, uniforms: torch.Tensor,
                    params, kv_len: int, start: int, stop: int, allowed: torch.Tensor | None = None):
        """Draft ``x_{start+1}..x_stop`` left to right from ``logits`` ``[B, V]`` (those of step
        ``start + 1``) and the penalty there (:mod:`dspark.samplers.penalties`; ``None`` without),
        feeding each draft but ``x_γ`` (``num_new`` ``[B]``: 1, or 0 for finished requests): tokens
        ``[B, n]``, ``q`` ``[B, n, V]`` (``None`` when greedy), confidences ``[B, n]`` and the
        logits and penalty of step ``stop + 1`` (logits ``None`` after step γ). One function, so
        that ``engine.compile`` makes each range one graph (the loop unrolled). ``allowed``
        ``[B, V]``: a grammar's masks for a single step (a guided round)."""
        drafts, probs, confidence = [], [], []
        for k in range(start, stop):
            logits = penalize_draft(logits, params, penalty)
            token, q, logits = self.draw(logits, params, None if params.greedy else uniforms[:, k], allowed)
            drafts.append(token), probs.append(q), confidence.append(top_probability(logits))
            logits, penalty = None, after_draft(penalty, token)
            if k < self.gamma - 1:
                logits = self.model(token.unsqueeze(1), self.cache, num_new, kv_len=kv_len).logits[:, -1]
        confidence = torch.stack(confidence, 1)
        if self.calibration is not None:  # σ(logit(c_k) / T_k + b_k)
            confidence = self.calibration.apply(confidence, start, stop, params)
        return torch.stack(drafts, 1), (None if params.greedy else torch.stack(probs, 1)), confidence, (logits, penalty)

    def commit(self, state: DecodingState, proposal: DraftProposal, result: VerificationResult,
               target_output: ModelOutput) -> None:
        # the cache holds ..., anchor, x_1..x_{γ-1} of each request that drafted; keep anchor + x_1..x_n
        # (n accepted): drop γ-1-n, or, with all γ accepted, keep everything (x_γ is fed next round).
        # A scheduler may have verified fewer than γ (ℓ < γ, the proposal narrowed): the cache does
        # not care, it holds what propose fed (all of it rolled back when nothing was verified). A
        # skipped round (propose not called) fed nothing: the old anchor is one more token it lacks.
        if self.fed is None:  # propose was not called this round
            self.max_lag += 1
            if self.max_lag >= MAX_LAG:  # bound the catch-up: feed the skipped rounds now
                self._feed(state, with_anchor=False)
            return
        self.cache.rollback(self.fed - torch.minimum(result.num_accepted, self.fed))
        self.fed = None
        # a verified draft the cache was not fed (x_γ) may have been accepted: it may lag
        self.max_lag = 1 if self.fed_steps < proposal.tokens.shape[1] else 0
