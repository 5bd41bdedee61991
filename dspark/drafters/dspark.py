"""The DSpark drafter (``name: dspark``): a semi-autoregressive block drafter reading the target's
hidden states; with ``head: none`` it is DFlash. The network is in :mod:`dspark.drafters.block_model`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from dspark.cache import StaticKVCache
from dspark.drafters.base import Drafter, DrafterConfig, register_drafter
from dspark.drafters.block_model import BlockDrafter, BlockDrafterArgs
from dspark.drafters.calibrated import find_calibration
from dspark.drafters.checkpoint import check_size, checkpoint_args, drafter_network, load_weights, save_drafter
from dspark.drafters.deepspec_import import import_deepspec, read_deepspec_config
from dspark.models.compiled import compile_forward
from dspark.models.graphs import GraphedFunction
from dspark.models.native import build_attention_mask
from dspark.records import DecodingState, DraftProposal, ModelOutput, VerificationResult
from dspark.samplers.penalties import DraftPenalty, after_draft, draft_penalty, penalize_draft

CHECKPOINT_KEY = "block_drafter"  # config.json key of the architecture


@dataclass
class DSparkConfig(DrafterConfig):
    """Config of the ``dspark`` drafter.

    Attributes:
        num_speculative_tokens: γ drafts per round (at most the checkpoint's block size).
        path: checkpoint directory or embedded name (default: ``dspark-tiny-dspark``, trained for the
            embedded target); ``null`` builds a randomly initialised drafter from the keys below. A
            DSpark or DFlash drafter released with DeepSpec (``Qwen3DSparkModel``) is read too:
            :mod:`dspark.drafters.deepspec_import`.
        head, num_layers, target_layers, rank, intermediate_size, context_input_norm, confidence, qk_norm, anchor_predicts, seed:
            architecture of a random drafter (``path: null``; unset: ``markov``, 1 layer, a low, a
            middle and the last target layer, rank 128, the target's MLP width, context through
            each layer's input norm, a confidence head over ``[h_k; W1[x_{k-1}]]``
            (``hidden``: ``h_k`` alone; ``none``), q/k norms as the target has them, the anchor's
            position drafting ``x_1`` (``false``: z-lab's DFlash layout, mask positions draft
            themselves; read and run, not trained); see
            :class:`~dspark.drafters.block_model.BlockDrafterArgs`). A checkpoint brings its own:
            set keys must agree with it, or the drafter is refused.
        calibration: per-position maps of the confidences, ``σ(logit(c_k) / T_k + b_k)`` (fitted
            by ``dspark calibrate``; one for sampling, optionally one for greedy decoding: see
            :mod:`dspark.drafters.calibrated`): ``auto`` reads ``calibration.json`` beside the
            checkpoint when there is one, a path reads that file, ``null`` keeps the raw confidences.
        bias_table_mib: with a ``markov`` or ``gated_markov`` head, precompute the bias of every
            previous token (``W2·W1[x]`` for all ``x``: ``V × V`` entries) when it takes at most this
            many MiB, so that each left-to-right step reads one row instead of a ``[r] × [r, V]``
            product (the embedded drafter's 4096² float32 table is 64 MiB); ``0`` never. Same
            bias up to rounding; drafts stay exact samples of the ``q`` they report.
    """

    name: str = "dspark"
    num_speculative_tokens: int = 7
    path: str | None = "dspark-tiny-dspark"
    head: str | None = None
    num_layers: int | None = None
    target_layers: list[int] = field(default_factory=list)
    rank: int | None = None
    intermediate_size: int | None = None
    context_input_norm: bool | None = None
    confidence: str | None = None
    qk_norm: bool | None = None
    anchor_predicts: bool | None = None
    seed: int = 0
    calibration: str | None = "auto"
    bias_table_mib: float = 128.0


def default_target_layers(num_layers: int) -> tuple[int, ...]:
    """A low, a middle and a high layer (fewer for shallow targets)."""
    return tuple(sorted({min(1, num_layers - 1), num_layers // 2, num_layers - 1}))


def save_block_drafter(net: BlockDrafter, directory: str | Path, extra: dict | None = None) -> None:
    """Write ``config.json`` (architecture + the target it was built for) and ``model.safetensors``."""
    save_drafter(net, directory, CHECKPOINT_KEY, extra)


def load_block_drafter(source, target) -> BlockDrafter:
    """A trained drafter from a directory or embedded name, checked against ``target``.

    A DSpark or DFlash drafter released with DeepSeek's DeepSpec (``Qwen3DSparkModel``) is read
    too (:mod:`dspark.drafters.deepspec_import`).

    Raises ``ValueError`` naming what differs when the checkpoint was built for another target
    (hidden size, vocabulary, head layout, number of layers), and
    :class:`~dspark.models.CheckpointError` for missing or mis-shaped tensors.
    """
    from dspark.models.loading import resolve_checkpoint

    directory = resolve_checkpoint(source)
    released = read_deepspec_config(directory)
    if released is not None:
        return import_deepspec(directory, released, target)
    return load_weights(BlockDrafter(checkpoint_args(source, CHECKPOINT_KEY, BlockDrafterArgs, target)), Path(directory))


def block_drafter_args(source, target) -> BlockDrafterArgs:
    """The architecture of the drafter checkpoint ``source`` (dspark's or DeepSpec's), checked
    against ``target`` from the configs alone (``target`` may be a meta-device skeleton)."""
    from dspark.drafters.deepspec_import import deepspec_args
    from dspark.models.loading import resolve_checkpoint

    directory = resolve_checkpoint(source)
    released = read_deepspec_config(directory)
    if released is not None:
        return deepspec_args(released, target, f"DeepSpec checkpoint {str(directory)!r}")
    return checkpoint_args(source, CHECKPOINT_KEY, BlockDrafterArgs, target)


def check_block_size(config: DSparkConfig, args: BlockDrafterArgs) -> None:
    """γ may not exceed the block size the drafter was built for."""
    if config.num_speculative_tokens > args.gamma:
        raise ValueError(f"drafter.num_speculative_tokens={config.num_speculative_tokens} exceeds the block size "
                         f"this drafter was built for ({args.gamma})")


#: context of at most this many rounds without drafts waits for drafting to resume
MAX_PENDING_ROUNDS = 64


@register_drafter("dspark")
class DSparkDrafter(Drafter):
    """Drafts γ tokens per round with one backbone forward plus a light left-to-right head.

    The drafter keeps a context cache (per backbone layer, the injected keys/values of every
    committed position but the anchor) that mirrors the target's cache: after each round it adds
    the verified positions the target kept, read from the verify forward's hidden states — no
    extra target pass. Proposals carry ``q`` (the processed ``softmax(U_k + B_k)``) when sampling
    and the confidences ``c_k`` always.
    """

    config_class = DSparkConfig
    provides_confidence = True
    skippable = True  # the block's keys/values land past the context; commit reads the target's hidden states
    replaceable_drafts = True  # (the block is drafted afresh each round)
    guidable = True
    #: with ``engine.compile``, append a round's context in the next round's draft call (one compiled call)
    fuse_append = True

    def __init__(self, config: DSparkConfig, *, target, sampler, draft_model=None):
        super().__init__(config, target=target, sampler=sampler, draft_model=draft_model)
        if config.bias_table_mib < 0:
            raise ValueError(f"drafter.bias_table_mib must be >= 0 (0: never keep a bias table), got {config.bias_table_mib}")
        for key in ("num_layers", "intermediate_size"):
            if getattr(config, key) is not None:
                check_size(f"drafter.{key}", getattr(config, key), why="null: the default")

        def build() -> BlockDrafter:
            torch.manual_seed(config.seed)
            layers = tuple(config.target_layers) or default_target_layers(target.num_layers)
            return BlockDrafter(BlockDrafterArgs.for_target(
                target, gamma=config.num_speculative_tokens, target_layers=layers,
                num_layers=1 if config.num_layers is None else config.num_layers,
                head=config.head or "markov", rank=128 if config.rank is None else config.rank,
                intermediate_size=config.intermediate_size,
                context_input_norm=True if config.context_input_norm is None else config.context_input_norm,
                confidence=config.confidence or "token", qk_norm=config.qk_norm,
                anchor_predicts=True if config.anchor_predicts is None else config.anchor_predicts))

        requested = {"head": config.head, "num_layers": config.num_layers, "rank": config.rank,
                     "target_layers": config.target_layers or None, "intermediate_size": config.intermediate_size,
                     "context_input_norm": config.context_input_norm, "confidence": config.confidence,
                     "qk_norm": config.qk_norm, "anchor_predicts": config.anchor_predicts}
        net = drafter_network("dspark", BlockDrafter, load_block_drafter, build, target=target,
                              draft_model=draft_model, path=config.path, requested=requested)
        check_block_size(config, net.args)
        self.net = net.to(dtype=target.dtype, device=target.device).eval().requires_grad_(False)
        self.hidden_layers = tuple(net.args.target_layers)
        self.provides_confidence = net.args.confidence != "none"  # a checkpoint may have no confidence head
        # the left-to-right head's product with W2, precomputed (the network is frozen from here on):
        # the whole bias table when it is small enough, else W2ᵀ laid out for the matvecs
        self.bias_table = self.projection_t = None
        table_mib = net.args.vocab_size ** 2 * self.net.norm.element_size() / 2 ** 20
        if net.args.head in ("markov", "gated_markov") and table_mib <= config.bias_table_mib:
            self.bias_table = self.net.bias_table().contiguous()  # [V, V]
        elif hasattr(self.net, "bias_projection"):
            self.projection_t = self.net.bias_projection.weight.t().contiguous()  # [r, V]
        self.cache: StaticKVCache | None = None  # the rows the rounds run over (a view of whole_cache)
        self.whole_cache: StaticKVCache | None = None  # every slot's
        self.calibration = find_calibration(config.calibration, config.path if draft_model is None else draft_model,
                                            self.gamma, target.device, drafter=config.name)
        self._draft_block, self._append_round, self._static_kv = self.draft_block, self._append_context, False
        self._block_logits = self.block_logits  # (the backbone alone: rounds with a grammar's masks)
        self._append_and_draft = None  # compiled: a round's append runs in the next round's draft call
        self._deferred: tuple | None = None  # (hidden states, num_new) of the last drafted round, not yet appended
        self._copy_hidden = False

    @classmethod
    def check_checkpoint(cls, config: DSparkConfig, target) -> None:
        if config.path is not None:
            check_block_size(config, block_drafter_args(config.path, target))

    def compile(self) -> None:
        # static shapes: the block reads the whole context cache and every round appends γ + 1
        # positions (one graph per batch size and sampling settings); the prompt's append stays eager
        self._draft_block = compile_forward(self.draft_block, self.target.device)
        self._block_logits = compile_forward(self.block_logits, self.target.device)
        self._append_round = compile_forward(self._append_context, self.target.device)
        self._append_and_draft = compile_forward(self.append_and_draft, self.target.device)
        self._static_kv = True

    def use_graphs(self, capture=None) -> None:
        # the block forward is one graph per batch size and sampling settings (it reads the whole
        # context cache); a round's context append fused with the next block forward one more per
        # verify width (it advances the context cache's lengths: kept as they were across a capture)
        self._draft_block = GraphedFunction(self._draft_block, capture=capture)
        self._append_and_draft = GraphedFunction(self._append_and_draft or self.append_and_draft, capture=capture,
                                                 preserve=lambda: [self.cache.lengths])
        self._static_kv = True
        self._copy_hidden = True  # the graphed target forward overwrites its hidden states next round

    def num_uniforms(self, params) -> int:
        return 0 if params.greedy else self.gamma

    def _append_context(self, hidden_states: list[torch.Tensor], num_new: torch.Tensor, cache=None) -> None:
        """Project target hidden states ``[B, T, H]`` (per layer id) into every layer's context
        keys/values at each request's next positions; commit the first ``num_new[b]`` of them
        (``cache``: the context cache, or a view of some of its rows)."""
        cache, num_tokens = cache or self.cache, hidden_states[0].shape[1]
        positions = cache.lengths.unsqueeze(1) + torch.arange(num_tokens, device=num_new.device)
        features = self.net.context_features(hidden_states)
        rope = self.target.rotary(positions, features.dtype)
        kv_len = cache.max_len if cache is self.cache else num_tokens  # a view's write gathers its rows up to kv_len
        for layer, kv in enumerate(self.net.context_kv(features, rope)):
            cache.write(layer, kv, positions, kv_len)
        cache.advance(num_new)

    def start(self, state: DecodingState, target_output: ModelOutput, max_len: int) -> None:
        batch, block = state.batch_size, self.net.args.block_width
        cache = self.whole_cache
        if cache is None or cache.batch_size != batch or cache.max_len < max_len + block:
            for graphed in (self._draft_block, self._append_and_draft):
                if isinstance(graphed, GraphedFunction):  # its graphs read the old cache
                    graphed.clear()
            a = self.net.args
            cache = self.whole_cache = StaticKVCache(a.num_layers, batch, a.num_kv_heads, max_len + block, a.head_dim,
                                                     dtype=self.target.dtype, device=self.target.device)
        self.cache = cache  # (every row until the engine says otherwise: use_rows)
        cache.reset()
        self._append_context(target_output.hidden_states, state.prompt_lengths)
        # rounds without drafts append their context lazily, when drafting resumes (see commit)
        self._pending: list[list[torch.Tensor]] = []
        self._deferred = None

    def admit(self, rows: torch.Tensor, state: DecodingState, target_output: ModelOutput) -> None:
        """The new requests' context from the target's prefill, into their rows of the context cache.
        The context of rounds that skipped drafting is appended first, for the other rows (it
        follows their committed tokens column by column; in the new rows its columns belong to
        the requests that held them before)."""
        self.flush()
        if self._pending:
            lengths = state.lengths.clone()
            lengths[rows] = self.whole_cache.lengths[rows] + 1  # nothing of it is committed in the new rows
            self._flush_pending(lengths[:self.cache.batch_size])
        cache = self.whole_cache.rows(rows)
        prompt_lengths = state.prompt_lengths[rows]
        cache.set_lengths(torch.zeros_like(prompt_lengths))
        self._append_context(target_output.hidden_states, prompt_lengths, cache)

    def use_rows(self, rows: int, state: DecodingState) -> None:
        """Rounds run over the first ``rows`` slots: the context cache's first rows serve them (a
        view). What the rounds so far left to append (a compiled round's, skipped rounds') is
        appended first, over the rows they ran on."""
        self.flush()
        if self._pending:
            self._flush_pending(state.lengths[:self.cache.batch_size])
        self.cache = self.whole_cache.head(rows)

    def _flush_pending(self, lengths: torch.Tensor) -> None:
        """Append the context of the rounds that did not draft, in one forward. Each such round
        verified one position per request (its anchor) and kept it if the request was unfinished;
        a request stays finished once it is, so its kept positions are the first columns, as many
        as the committed tokens the context lacks: ``lengths`` ``[B]`` (tokens so far) − 1 for the anchor."""
        if self._pending:
            num_new = (lengths - 1) - self.cache.lengths
            self._append_context([torch.cat(layer, 1) for layer in zip(*self._pending)], num_new)
            self._pending = []

    def flush(self) -> None:
        """Append the context a compiled round left for the next draft call (to inspect the cache
        between rounds; drafting does it by itself). Rounds that skipped drafting still wait for
        drafting to resume."""
        if self._deferred is not None:
            self._append_round(*self._deferred)
            self._deferred = None

    def propose(self, state: DecodingState, uniforms: torch.Tensor) -> DraftProposal:
        cache = self.cache
        kv_len = cache.max_len if self._static_kv else min(state.max_cache_len + self.net.args.block_width,
                                                            cache.max_len)
        penalty = draft_penalty(state.penalties)
        if self.guide is not None:  # the backbone (compiled), then the head's steps eagerly with a grammar's masks
            self.flush()
            self._flush_pending(state.lengths)
            hidden, base_logits = self._block_logits(state.anchor, cache.lengths, kv_len)
            tokens, q, confidence = self.draft_from(state.anchor, hidden, base_logits, penalty, uniforms, state.params)
        elif self._deferred is not None:  # the last round's context, appended in the same compiled call
            hidden, num_new = self._deferred
            self._deferred = None
            tokens, q, confidence = self._append_and_draft(hidden, num_new, state.anchor, penalty, uniforms,
                                                           state.params, kv_len)
        else:
            self._flush_pending(state.lengths)
            tokens, q, confidence = self._draft_block(state.anchor, cache.lengths, penalty, uniforms, state.params,
                                                      kv_len)
        return DraftProposal(tokens=tokens, num_tokens=torch.where(state.done, 0, self.gamma), probs=q,
                             confidence=confidence)

    def append_and_draft(self, hidden_states: list[torch.Tensor], num_new: torch.Tensor, anchor: torch.Tensor,
                         penalty: DraftPenalty, uniforms: torch.Tensor, params, kv_len: int):
        """Append a round's context, then :meth:`draft_block` after it, as one function (one compiled
        call per round instead of two)."""
        self._append_context(hidden_states, num_new)
        return self.draft_block(anchor, self.cache.lengths, penalty, uniforms, params, kv_len)

    def draft_block(self, anchor: torch.Tensor, context_lengths: torch.Tensor, penalty: DraftPenalty,
                    uniforms: torch.Tensor, params, kv_len: int):
        """Draft one block after each anchor ``[B]`` given ``context_lengths`` ``[B]`` committed context
        positions: tokens ``[B, γ]``, ``q`` ``[B, γ, V]`` (``None`` when greedy), confidences ``[B, γ]``.
        ``penalty`` (:mod:`dspark.samplers.penalties`; ``None`` without): the penalty after the
        anchor; the sequential heads carry it along their drafts, DFlash's independent positions
        all take it as it is (their draws may not depend on each other)."""
        hidden, base_logits = self.block_logits(anchor, context_lengths, kv_len)
        return self.draft_from(anchor, hidden, base_logits, penalty, uniforms, params)

    def block_logits(self, anchor: torch.Tensor, context_lengths: torch.Tensor, kv_len: int):
        """The parallel backbone's one forward over ``[anchor, mask × (block − 1)]`` after
        ``context_lengths`` ``[B]`` committed context positions: the drafting positions' hidden
        states ``h_1..h_γ`` ``[B, γ_block, H]`` and base logits ``U`` ``[B, γ_block, V]``."""
        net, target, cache = self.net, self.target, self.cache
        batch = anchor.shape[0]
        block = net.args.block_width
        # 1. parallel backbone: one forward over [anchor, mask × (block−1)], bidirectional in the block
        x = torch.cat([target.embed_tokens(anchor).unsqueeze(1),
                       net.mask_embedding.expand(batch, block - 1, -1)], 1)  # [B, block, H]
        positions = context_lengths.unsqueeze(1) + torch.arange(block, device=anchor.device)
        rope = target.rotary(positions, x.dtype)
        everyone = torch.ones(batch, block, block, dtype=torch.bool, device=anchor.device)
        mask = build_attention_mask(context_lengths, block, kv_len, everyone)
        for layer in net.layers:  # block keys/values land past the context length: never committed
            x = layer(x, rope, cache, positions, mask, kv_len)
        # h_1..h_γ [B, γ_block, H]: from the anchor's position on, or after it (z-lab's DFlash)
        hidden = net.output(x)[:, block - net.args.gamma:]
        return hidden, target.lm_head(hidden)  # U [B, γ_block, V]

    def draft_from(self, anchor: torch.Tensor, hidden: torch.Tensor, base_logits: torch.Tensor, penalty: DraftPenalty,
                   uniforms: torch.Tensor, params):
        """The drafts from the backbone's outputs (:meth:`block_logits`): tokens ``[B, γ]``, ``q``
        ``[B, γ, V]`` (``None`` when greedy), confidences ``[B, γ]``."""
        net, gamma = self.net, self.gamma
        # 2. sequential head: left to right from softmax(U_k + B_k); without a head (DFlash) the
        #    positions are independent given the block and are drafted in one call
        if net.args.head == "none":
            base_logits = penalize_draft(base_logits, params, penalty)  # every position: the committed history's
            if self.guide is None:
                tokens, q = self.sampler.draw(base_logits[:, :gamma], params, uniforms[:, :gamma])
            else:  # one position at a time: a grammar's mask follows the drafts before it
                steps = [self.draw(base_logits[:, k], params, None if params.greedy else uniforms[:, k])
                         for k in range(gamma)]
                tokens, q = torch.stack([t for t, *_ in steps], 1), (None if params.greedy else
                                                                     torch.stack([q for _, q, _ in steps], 1))
        else:
            previous, head_state, drafted, probs = anchor, None, [], []
            for k in range(gamma):
                table_row = None if self.bias_table is None else self.bias_table[previous]  # [B, V]
                bias, head_state = net.head_bias(net.token_embedding(previous), hidden[:, k], head_state,
                                                 self.projection_t, table_row)
                previous, q, _ = self.draw(penalize_draft(base_logits[:, k] + bias, params, penalty), params,
                                           None if params.greedy else uniforms[:, k])
                drafted.append(previous), probs.append(q)
                penalty = after_draft(penalty, previous)
            tokens, q = torch.stack(drafted, 1), (None if params.greedy else torch.stack(probs, 1))
        # 3. confidence head over [h_k; W1[x_{k-1}]] for the whole block at once (if it has one)
        previous = torch.cat([anchor.unsqueeze(1), tokens[:, :-1]], 1)  # [B, γ]
        confidence = net.confidence_of(hidden[:, :gamma], net.previous_embedding(previous))
        if self.calibration is not None and confidence is not None:  # σ(logit(c_k) / T_k + b_k)
            confidence = self.calibration.apply(confidence, 0, gamma, params)
        return tokens, q, confidence

    def commit(self, state: DecodingState, proposal: DraftProposal, result: VerificationResult,
               target_output: ModelOutput) -> None:
        if proposal.gamma == 0:
            # nothing was verified (a plain decoding step, often one that skipped drafting): keep the
            # hidden states for later (copies when CUDA graphs overwrite them next round); no work
            # on the device here, so that a skipped round costs what a plain step does (beyond the
            # append a drafted round before it deferred, if one waits: it goes first)
            self.flush()
            hidden = target_output.hidden_states
            self._pending.append([h.clone() for h in hidden] if self._copy_hidden else list(hidden))
            if len(self._pending) >= MAX_PENDING_ROUNDS:
                self._flush_pending(state.lengths)
            return
        self._flush_pending(state.lengths)
        # mirror the target cache: it now holds every committed token but the anchor
        append = (target_output.hidden_states, (state.lengths - 1) - self.cache.lengths)
        if self._append_and_draft is not None and self.fuse_append:
            # done by the next propose, in its compiled (or graphed) call. Graphed hidden states are
            # a graph's static outputs; a round without drafts before that propose replays the
            # width-1 graph, whose outputs are its own: these stay as they are.
            self._deferred = append
        else:
            self._append_round(*append)
