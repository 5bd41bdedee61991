"""The EAGLE-3 drafter (``name: eagle3``): an autoregressive one-layer head over the target's
fused hidden states. The network is in :mod:`dspark.drafters.eagle_model`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from dspark.cache import StaticKVCache
from dspark.drafters.base import Drafter, DrafterConfig, register_drafter
from dspark.drafters.checkpoint import (check_fits_target, drafter_network, load_weights, read_drafter_spec,
                                       save_drafter)
from dspark.drafters.eagle_model import Eagle3Args, Eagle3Head
from dspark.models.compiled import compile_forward
from dspark.models.native import build_attention_mask
from dspark.records import DecodingState, DraftProposal, ModelOutput, VerificationResult

CHECKPOINT_KEY = "eagle3"  # config.json key of the architecture


@dataclass
class Eagle3Config(DrafterConfig):
    """Config of the ``eagle3`` drafter.

    Attributes:
        num_speculative_tokens: γ draft steps per round.
        path: checkpoint directory or embedded name (default: ``dspark-tiny-eagle3``, trained for the
            embedded target); ``null`` builds a randomly initialised head from the keys below.
        target_layers, intermediate_size, draft_vocab_size, seed: architecture of a random head
            (``path: null``; unset: a low, a middle and the last layer, the target's MLP width, the
            target's vocabulary). A checkpoint brings its own: set keys must agree with it, or the
            drafter is refused.
    """

    name: str = "eagle3"
    num_speculative_tokens: int = 7
    path: str | None = "dspark-tiny-eagle3"
    target_layers: list[int] = field(default_factory=list)
    intermediate_size: int | None = None
    draft_vocab_size: int | None = None
    seed: int = 0


def default_eagle_layers(num_layers: int) -> tuple[int, int, int]:
    """Low, middle and high target layers (EAGLE-3 fuses three)."""
    return (min(1, num_layers - 1), num_layers // 2, num_layers - 1)


def save_eagle3(head: Eagle3Head, directory: str | Path, extra: dict | None = None) -> None:
    """Write ``config.json`` (architecture + the target it was built for) and ``model.safetensors``."""
    save_drafter(head, directory, CHECKPOINT_KEY, extra)


def load_eagle3(source, target) -> Eagle3Head:
    """A trained head from a directory or embedded name, checked against ``target`` (a checkpoint
    built for another target is refused, naming what differs; so is a bad ``d2t`` map)."""
    directory, spec = read_drafter_spec(source, CHECKPOINT_KEY)
    spec["target_layers"] = tuple(spec["target_layers"])
    args = Eagle3Args(**spec)
    check_fits_target(args, target, directory)
    head = load_weights(Eagle3Head(args.validate()), directory)
    if args.draft_vocab_size:
        head.set_draft_vocabulary(head.d2t.clone())  # validates the stored map
    return head


@register_drafter("eagle3")
class Eagle3Drafter(Drafter):
    """Drafts γ tokens one at a time with a single decoder layer.

    The head keeps its own KV cache of *pairs* (target feature at position p, token p + 1): one
    per committed position but the anchor, so the last pair's output predicts the first draft.
    After each round it appends the pairs the target kept, from the verify forward's hidden
    states (no extra target pass); draft steps write past the committed length and are never
    committed. Proposals carry ``q`` when sampling.
    """

    config_class = Eagle3Config
    #: with ``engine.compile``, append a round's pairs in the next round's draft call (one compiled call)
    fuse_append = True

    def __init__(self, config: Eagle3Config, *, target, sampler, draft_model=None):
        super().__init__(config, target=target, sampler=sampler, draft_model=draft_model)

        def build() -> Eagle3Head:
            torch.manual_seed(config.seed)
            layers = tuple(config.target_layers) or default_eagle_layers(target.num_layers)
            return Eagle3Head(Eagle3Args.for_target(target, gamma=config.num_speculative_tokens, target_layers=layers,
                                                    intermediate_size=config.intermediate_size,
                                                    draft_vocab_size=config.draft_vocab_size or 0))

        requested = {"target_layers": config.target_layers or None, "intermediate_size": config.intermediate_size,
                     "draft_vocab_size": config.draft_vocab_size}
        head = drafter_network("eagle3", Eagle3Head, load_eagle3, build, target=target, draft_model=draft_model,
                               path=config.path, requested=requested)
        self.head = head.to(dtype=target.dtype, device=target.device).eval().requires_grad_(False)
        self.hidden_layers = tuple(head.args.target_layers)
        self.cache: StaticKVCache | None = None
        self.last_output: torch.Tensor | None = None  # [B, H] the last committed pair's output d
        self._append_round, self._draft_steps, self._static_kv = self.append_pairs, self.draft_steps, False
        self._append_and_draft = None  # compiled: a round's append runs in the next round's draft call
        self._deferred: tuple | None = None  # (following tokens, hidden states, num_new) not yet appended

    def compile(self) -> None:
        # static shapes: every draft step and every round's append reads the whole pair cache; the
        # drafting loop is one graph (unrolled), each round's append (fusing the target's features
        # included) another; the prompt's append (a new width per prompt length) stays eager
        self._append_round = compile_forward(self.append_pairs, self.target.device)
        self._draft_steps = compile_forward(self.draft_steps, self.target.device)
        self._append_and_draft = compile_forward(self.append_and_draft, self.target.device)
        self._static_kv = True

    def num_uniforms(self, params) -> int:
        return 0 if params.greedy else self.gamma

    def _pair_step(self, features: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor, kv_len: int,
                   only: torch.Tensor | None = None):
        """The draft layer over pairs (``features`` ``[B, T, H]``, ``tokens`` ``[B, T]``) written at
        positions ``lengths[:, None] + arange(T)``, causal: the outputs ``d`` ``[B, T, H]``; with
        ``only`` ``[B]``, just the output of pair ``only[b]`` ``[B, 1, H]`` (every pair's keys/values
        are still written; attention and MLP run for that one query, which sees the pairs up to its own)."""
        target, layer, num_tokens = self.target, self.head.layer, tokens.shape[1]
        positions = lengths.unsqueeze(1) + torch.arange(num_tokens, device=tokens.device)
        rope = target.rotary(positions, features.dtype)
        q, kv = layer.project_pair(target.embed_tokens(tokens), features, rope)
        keys, values = self.cache.write(0, kv, positions, kv_len)
        if only is None:
            return layer.attend(features, q, keys, values, build_attention_mask(lengths, num_tokens, kv_len))
        pick = lambda x: x.gather(1, only.view(-1, *[1] * (x.dim() - 1)).expand(-1, 1, *x.shape[2:]))  # noqa: E731
        return layer.attend(pick(features), pick(q), keys, values, build_attention_mask(lengths + only, 1, kv_len))

    def append_pairs(self, tokens: torch.Tensor, hidden_states: list[torch.Tensor], num_new: torch.Tensor,
                     kv_len: int) -> torch.Tensor:
        """Commit ``num_new[b]`` pairs per request: the fused target features ``[B, T, ·]`` (per layer
        id) with ``tokens`` ``[B, T]``, the committed tokens that follow them; returns each request's
        last output ``[B, H]``, the next round's first feature."""
        cache = self.cache
        # only each request's last kept pair's output is needed (the next round's first feature)
        last = (num_new - 1).clamp(min=0)  # [B]
        d = self._pair_step(self.head.fuse(hidden_states), tokens, cache.lengths, kv_len, only=last)  # [B, 1, H]
        cache.advance(num_new)
        return d.squeeze(1)

    def _following_tokens(self, state: DecodingState, num_tokens: int) -> torch.Tensor:
        """``[B, T]`` the committed tokens after each of the next ``T`` pair positions (the token
        buffer's width varies per call: read outside the compiled append)."""
        positions = self.cache.lengths.unsqueeze(1) + 1 + torch.arange(num_tokens, device=state.tokens.device)
        return state.tokens.gather(1, positions.clamp(max=state.tokens.shape[1] - 1))

    def start(self, state: DecodingState, target_output: ModelOutput, max_len: int) -> None:
        batch, a = state.batch_size, self.head.args
        cache = self.cache
        if cache is None or cache.batch_size != batch or cache.max_len < max_len + self.gamma:
            cache = self.cache = StaticKVCache(1, batch, a.num_kv_heads, max_len + self.gamma, a.head_dim,
                                               dtype=self.target.dtype, device=self.target.device)
        cache.reset()
        self._deferred = None
        prompt_width = target_output.hidden_states[0].shape[1]
        self.last_output = self.append_pairs(self._following_tokens(state, prompt_width), target_output.hidden_states,
                                             state.prompt_lengths, min(prompt_width, cache.max_len))

    def propose(self, state: DecodingState, uniforms: torch.Tensor) -> DraftProposal:
        cache, gamma = self.cache, self.gamma
        kv_len = cache.max_len if self._static_kv else min(state.max_cache_len + gamma, cache.max_len)
        if self._deferred is not None:  # last round's pairs, appended in the same compiled call
            tokens, q, self.last_output = self._append_and_draft(*self._deferred, uniforms, state.params, kv_len)
            self._deferred = None
        else:
            tokens, q = self._draft_steps(self.last_output, cache.lengths, uniforms, state.params, kv_len)
        return DraftProposal(tokens=tokens, num_tokens=torch.where(state.done, 0, gamma), probs=q)

    def append_and_draft(self, following: torch.Tensor, hidden_states: list[torch.Tensor], num_new: torch.Tensor,
                         uniforms: torch.Tensor, params, kv_len: int):
        """:meth:`append_pairs` then :meth:`draft_steps` from its output, as one function (one compiled
        call per round instead of two): tokens ``[B, γ]``, ``q`` (or ``None``) and the appended last output ``[B, H]``."""
        d = self.append_pairs(following, hidden_states, num_new, kv_len)
        tokens, q = self.draft_steps(d, self.cache.lengths, uniforms, params, kv_len)
        return tokens, q, d

    def flush(self) -> None:
        """Append the pairs a compiled round left for the next draft call (to inspect the pair cache
        between rounds; drafting does it by itself)."""
        if self._deferred is not None:
            self.last_output = self._append_round(*self._deferred, self.cache.max_len)
            self._deferred = None

    def draft_steps(self, d: torch.Tensor, lengths: torch.Tensor, uniforms: torch.Tensor, params,
                    kv_len: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Draft left to right from the last committed pair's output ``d`` ``[B, H]`` over a pair cache
        of ``lengths`` ``[B]``: tokens ``[B, γ]`` and ``q`` ``[B, γ, V]`` (``None`` when greedy). One
        function, so that ``engine.compile`` makes the whole loop one graph."""
        drafted, probs = [], []
        for k in range(self.gamma):
            logits = self.head.logits(d, self.target)  # [B, V]
            if params.greedy:
                token = self.sampler.greedy(logits)
            else:
                probs.append(self.sampler.probs(logits, params))
                token = self.sampler.sample(probs[-1], uniforms[:, k])
            drafted.append(token)
            if k < self.gamma - 1:  # the pair (d, x_k): the head's own output is the next feature
                d = self._pair_step(d.unsqueeze(1), token.unsqueeze(1), lengths + k, kv_len).squeeze(1)
        return torch.stack(drafted, 1), (torch.stack(probs, 1) if probs else None)

    def commit(self, state: DecodingState, proposal: DraftProposal, result: VerificationResult,
               target_output: ModelOutput) -> None:
        # one pair per position the target kept: its cache holds every committed token but the anchor
        num_tokens = target_output.hidden_states[0].shape[1]
        pairs = (self._following_tokens(state, num_tokens), target_output.hidden_states,
                 (state.lengths - 1) - self.cache.lengths)
        if self._append_and_draft is not None and self.fuse_append:  # appended by the next propose
            self._deferred = pairs
            return
        kv_len = self.cache.max_len if self._static_kv else min(state.max_cache_len + num_tokens, self.cache.max_len)
        self.last_output = self._append_round(*pairs, kv_len)
