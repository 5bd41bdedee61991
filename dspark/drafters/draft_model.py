"""An independent small causal LM as the drafter (classic speculative decoding)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dspark.drafters.base import Drafter, DrafterConfig, register_drafter
from dspark.records import DecodingState, DraftProposal, ModelOutput, VerificationResult


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
    """

    name: str = "draft_model"
    num_speculative_tokens: int = 4
    path: str | None = "dspark-tiny-draft"
    random: dict[str, Any] | None = None
    dtype: str | None = None
    backend: str = "auto"


@register_drafter("draft_model")
class DraftModelDrafter(Drafter):
    """Drafts γ tokens with its own model and KV cache, sampling each from ``q_k`` (the draft
    model's distribution after the shared sampler's processing).

    The draft cache follows the target's invariant — every committed token but the anchor — and
    is rolled back with it. When a round accepts all γ drafts, the last draft ``x_γ`` was never fed
    to the draft model; the next round feeds it together with the new anchor (a two-token step
    for those requests, one token for the others, in one ragged forward).
    """

    config_class = DraftModelConfig

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
        self.model = load_model(source, dtype=config.dtype or target.dtype, device=target.device, backend=config.backend)
        if self.model.vocab_size != target.vocab_size:
            raise ValueError(f"draft model vocabulary ({self.model.vocab_size} tokens) differs from the target's "
                             f"({target.vocab_size} tokens); a draft model must share the target's tokenizer")
        self.cache = None
        self._forward, self._static_kv = self.model, False

    def compile(self) -> None:
        # static shapes: every step reads the whole draft cache (one graph per batch size and step width)
        self._forward, self._static_kv = torch.compile(self.model, dynamic=False), True

    def num_uniforms(self, params) -> int:
        return 0 if params.greedy else self.gamma

    def start(self, state: DecodingState, target_output: ModelOutput, max_len: int) -> None:
        batch, max_prompt = state.batch_size, int(state.max_cache_len)
        cache = self.cache
        if cache is None or cache.batch_size != batch or cache.max_len < max_len:
            cache = self.cache = self.model.new_cache(batch, max_len)
        cache.reset()
        self.model(state.tokens[:, :max_prompt], cache, state.prompt_lengths, kv_len=max_prompt,
                   logits_positions=torch.zeros(batch, 1, dtype=torch.long, device=state.tokens.device))
        self.pending = torch.zeros(batch, dtype=torch.bool, device=state.tokens.device)  # x_γ not yet fed
        self.last_draft = torch.zeros(batch, dtype=torch.long, device=state.tokens.device)

    def propose(self, state: DecodingState, uniforms: torch.Tensor) -> DraftProposal:
        params, gamma, batch = state.params, self.gamma, state.batch_size
        active = ~state.done
        # step 0 feeds [x_γ of the last round, anchor] where a catch-up is pending, else [anchor, pad]
        anchor = state.anchor
        first = torch.stack([torch.where(self.pending, self.last_draft, anchor), anchor], 1)  # [B, 2]
        num_new = torch.where(active, 1 + self.pending.long(), 0)
        kv_len = self.cache.max_len if self._static_kv else min(state.max_cache_len + gamma + 2, self.cache.max_len)
        out = self._forward(first, self.cache, num_new, logits_positions=(num_new - 1).clamp(min=0).unsqueeze(1),
                         kv_len=kv_len)
        drafts, probs = [], []
        for k in range(gamma):
            logits = out.logits[:, -1]  # [B, V]
            if params.greedy:
                token = self.sampler.greedy(logits)
            else:
                q = self.sampler.probs(logits, params)
                token = self.sampler.sample(q, uniforms[:, k])
                probs.append(q)
            drafts.append(token)
            if k < gamma - 1:
                out = self._forward(token.unsqueeze(1), self.cache, active.long(), kv_len=kv_len)
        tokens = torch.stack(drafts, 1)  # [B, γ]
        self.fed = torch.where(active, gamma - 1, 0)  # drafts fed to the cache this round
        return DraftProposal(tokens=tokens, num_tokens=torch.where(active, gamma, 0),
                             probs=torch.stack(probs, 1) if probs else None)

    def commit(self, state: DecodingState, proposal: DraftProposal, result: VerificationResult,
               target_output: ModelOutput) -> None:
        # the cache holds anchor, x_1..x_{γ-1} of each request that drafted; keep anchor + x_1..x_n
        # (n accepted) → drop γ-1-n, or, with all γ accepted, keep everything and feed x_γ next round.
        # A scheduler may have verified fewer than γ (ℓ < γ, the proposal narrowed): the cache does
        # not care, it holds what propose fed.
        accepted = result.num_accepted
        self.cache.rollback(self.fed - torch.minimum(accepted, self.fed))
        self.pending = accepted == self.gamma
        width = proposal.tokens.shape[1]
        if width:
            self.last_draft = proposal.tokens.gather(1, (accepted - 1).clamp(0, width - 1).unsqueeze(1)).squeeze(1)
