"""The drafter interface: propose up to γ tokens per request for the target to verify."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from dspark.records import DecodingState, DraftProposal, MixedSamplingParams, ModelOutput, SamplingParams, VerificationResult
from dspark.registry import Registry
from dspark.structured import mask_logits


@dataclass
class DrafterConfig:
    """Config section ``drafter`` (subclasses add their own keys).

    Attributes:
        name: registered drafter (``none``, ``ngram``, ``draft_model`` …).
        _target_: dotted path of a user's :class:`Drafter` subclass (wins over ``name``).
        num_speculative_tokens: γ, drafts proposed per round.
    """

    name: str = "none"
    _target_: str | None = None
    num_speculative_tokens: int = 0


class Drafter(ABC):
    """Proposes draft tokens; keeps whatever per-request state it needs in step with the target.

    Life cycle per ``generate`` batch: :meth:`start` once after the target's prefill, then per round
    :meth:`propose` → (target verifies) → :meth:`commit`; between rounds, :meth:`admit` when new
    requests take the slots of finished ones (continuous batching). Subclasses register themselves with
    ``@register_drafter("name")`` and declare a ``config_class`` dataclass for their config keys.

    Args:
        config: this drafter's config section.
        target: the target model (drafters may share its embedding or read its hidden states).
        sampler: the sampler the verifier uses; drafters that sample must use it for ``q``.
        draft_model: an optional separate model (for drafters that need one).
    """

    config_class = DrafterConfig
    #: target decoder layers whose hidden states this drafter reads (passed to :meth:`start` / :meth:`commit`)
    hidden_layers: tuple[int, ...] = ()
    #: whether proposals carry ``confidence`` (needed by the ``threshold`` and ``dspark`` schedulers)
    provides_confidence: bool = False
    #: how ``dspark calibrate`` fits the confidences by default: ``sts`` (a temperature per position,
    #: for confidences trained to predict acceptance) or ``platt`` (a temperature and a shift, for
    #: confidences that rank well but sit on the wrong side of one half, such as a top probability)
    calibration_method: str = "sts"

    def __init__(self, config: DrafterConfig, *, target, sampler, draft_model=None):
        gamma = config.num_speculative_tokens
        if isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < self.min_gamma:
            raise ValueError(
                f"drafter.num_speculative_tokens must be an integer >= {self.min_gamma} for drafter "
                f"{getattr(self, 'registered_name', type(self).__name__)!r}, got {gamma!r}"
            )
        self.config = config
        self.target = target
        self.sampler = sampler
        self.draft_model = draft_model

    #: smallest allowed γ (1 for real drafters; the ``none`` drafter allows 0)
    min_gamma = 1
    #: True when a round may skip :meth:`propose`: :meth:`commit` is then called with no
    #: :meth:`propose` before it (and an empty proposal — which a drafted round whose drafts the
    #: scheduler all declined has too: tell the two apart by whether :meth:`propose` ran), and the
    #: drafter catches up on the skipped tokens itself. A scheduler can then fall back to plain
    #: decoding steps under load
    skippable = False
    #: True when the engine may replace drafts before verification (its :meth:`commit` reads the
    #: committed tokens and the target's hidden states, never its own drafts): under a grammar
    #: that allows one token alone at a position, that token is drafted there, with ``q`` one-hot
    #: (:mod:`dspark.structured`). A drafter that keeps state over its own drafts leaves it False
    replaceable_drafts = False
    #: True when :meth:`propose` draws each draft through :meth:`draw`, left to right, one step
    #: per call while :attr:`guide` is set (eagerly, or compiled steps through
    #: :meth:`~dspark.structured.DraftGuide.steps`): constrained requests' drafts then follow
    #: their grammars (``engine.guide_drafts``)
    guidable = False
    #: the round's grammars over the drafts, while :meth:`propose` runs under one (set by the engine)
    guide = None

    def draw(self, logits: torch.Tensor, params: SamplingParams | MixedSamplingParams,
             uniforms: torch.Tensor | None, allowed: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """One draft step: tokens ``[B]`` from ``logits`` ``[B, V]`` as the sampler draws them
        (:meth:`~dspark.samplers.Sampler.draw`: ``q`` ``[B, V]``, ``None`` when greedy). Under a
        :attr:`guide`, the constrained rows' logits are first masked by their grammars after the
        drafts so far, and the drawn tokens go back to it; or, in a step that
        :meth:`~dspark.structured.DraftGuide.steps` runs (a compiled one, say), by the masks
        ``allowed`` ``[B, V]`` it was given (the guide takes the tokens). Returns ``(tokens, q,
        logits)``, the logits drawn from (masked ones under a guide: confidences read them too)."""
        guide = self.guide if allowed is None else None
        if allowed is not None:
            logits = mask_logits(logits, allowed)
        elif guide is not None:
            logits = guide.mask(logits)
        tokens, q = self.sampler.draw(logits, params, uniforms)
        if guide is not None:
            guide.take(tokens)
        return tokens, q, logits

    @classmethod
    def check_checkpoint(cls, config: DrafterConfig, target) -> None:
        """Refuse (``ValueError`` naming why) a checkpoint that ``config`` names and that cannot
        run on ``target``, from the files' configs alone. ``target`` may be a skeleton of the
        target's architecture on the meta device (:func:`~dspark.models.loading.model_skeleton`):
        :func:`~dspark.build_pipeline` calls this before it reads the target's weights, so a
        mismatch costs no target load. Default: nothing to check."""

    @property
    def gamma(self) -> int:
        """γ, the number of drafts per round."""
        return self.config.num_speculative_tokens

    def num_uniforms(self, params: SamplingParams | MixedSamplingParams) -> int:
        """Uniform draws per request per round that :meth:`propose` consumes (0 if it never samples)."""
        return 0

    def compile(self) -> None:
        """Compile the drafter's own model forwards (called once when ``engine.compile`` is set);
        drafters without a model of their own have nothing to compile."""

    def use_graphs(self, capture=None) -> None:
        """Replay the drafter's own forwards from CUDA graphs (called once, after :meth:`compile`,
        when ``engine.cuda_graphs`` is set; ``capture`` as for
        :class:`~dspark.models.graphs.GraphedFunction`). Drafters that do not implement it run eagerly."""

    def flush(self) -> None:
        """Finish work a drafter defers to its next :meth:`propose` (e.g. a compiled round's context
        append, fused into the next draft call), so that its state can be inspected between rounds.
        The engine never needs it; the default has nothing to do."""

    def start(self, state: DecodingState, target_output: ModelOutput, max_len: int) -> None:
        """Called once per batch after the target's prefill.

        ``target_output.hidden_states`` holds :attr:`hidden_layers` over the prompt ``[B, P_max, H]``;
        ``max_len`` bounds the positions any request will reach (size caches with it).
        """

    def admit(self, rows: torch.Tensor, state: DecodingState, target_output: ModelOutput) -> None:
        """Continuous batching: new requests took the slots ``rows`` ``[k]`` (int64, distinct) of the
        batch between two rounds (after :meth:`commit`, before the next :meth:`propose`); reset
        whatever this drafter keeps for those rows, as :meth:`start` does for a whole batch.

        ``state`` is the whole batch, already holding the new requests' prompts and first tokens
        (their anchors); ``target_output`` is the target's prefill over the new requests alone, in
        the order of ``rows`` (``hidden_states``: :attr:`hidden_layers` ``[k, P, H]``, ``P`` their
        longest prompt). The other rows' state must not change.

        The default raises ``NotImplementedError``, and the engine then decodes in static batches
        (each batch runs until its last request ends): a drafter without per-request state
        implements it as a no-op."""
        raise NotImplementedError(f"{type(self).__name__} does not implement admit()")

    @property
    def can_admit(self) -> bool:
        """Whether :meth:`admit` is implemented (continuous batching)."""
        return type(self).admit is not Drafter.admit

    def use_rows(self, rows: int, state: DecodingState) -> None:
        """From the next round on, rounds run over the batch's first ``rows`` slots alone (the others
        hold no unfinished request: :attr:`~dspark.engine.EngineConfig.trim_idle_slots`):
        :meth:`propose` and :meth:`commit` receive states of ``rows`` requests, until the next call.
        Called between rounds, after :meth:`start` (which serves every slot) whenever the rows
        change; :meth:`admit` may then start requests in rows past them (they join the rounds'
        rows by a later call). Work deferred from earlier rounds is over the old rows: finish it
        first. ``state`` is the whole batch.

        The default raises ``NotImplementedError``, and the engine then runs every round over all
        slots: a drafter without per-request state implements it as a no-op."""
        raise NotImplementedError(f"{type(self).__name__} does not implement use_rows()")

    @property
    def can_use_rows(self) -> bool:
        """Whether :meth:`use_rows` is implemented (rounds over the occupied slots alone)."""
        return type(self).use_rows is not Drafter.use_rows

    @abstractmethod
    def propose(self, state: DecodingState, uniforms: torch.Tensor) -> DraftProposal:
        """Draft up to γ tokens after each request's anchor.

        Args:
            state: the batch (``state.tokens`` holds prompt + generated tokens, ``state.anchor`` the last).
            uniforms: ``[B, num_uniforms(params)]`` draws in ``[0, 1)`` from each request's generator.

        Returns:
            a :class:`DraftProposal` of width γ, or narrower when every request stopped drafting
            early (width ``max ℓ_b``: the target then verifies only that many columns). Whether
            ``x_k`` is offered may depend on the drafts before it and the drafter's own state, never
            on ``x_k`` itself nor on the target: that is what keeps the output distribution exact.
        """

    def commit(self, state: DecodingState, proposal: DraftProposal, result: VerificationResult,
               target_output: ModelOutput) -> None:
        """After verification: drop rejected drafts from the drafter's own state.

        ``state`` is already updated with the emitted tokens; ``target_output.hidden_states`` covers the
        verified inputs ``[anchor, x_1..x_γ]`` (``[B, γ+1, H]`` per layer); of those, the anchor and the
        first ``result.num_accepted[b]`` drafts are now committed context.
        """


DRAFTERS: Registry = Registry("drafter", Drafter)
register_drafter = DRAFTERS.register
