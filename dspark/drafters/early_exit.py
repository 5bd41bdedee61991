"""Self-speculative decoding: the target's own first layers draft (LayerSkip's early exit).

The drafter is the target cut after ``exit_layer`` of its decoder layers, then its final norm and
LM head (:meth:`~dspark.models.native.NativeCausalLM.early_exit`): the same weights, no second
model to train or load — what ``transformers``' ``generate(assistant_early_exit=...)`` does. It
pays off on models trained for it (LayerSkip's checkpoints, trained with layer dropout and an
early-exit loss), whose intermediate layers already predict the next token; on others an early
layer's output read through the final LM head is a poor guess, and the drafts are rejected.

It drafts exactly as the ``draft_model`` drafter does (its own KV cache of ``exit_layer`` layers,
rolled back with the target's; confidences, ``min_survival``, calibration, guided drafting,
continuous batching, ``engine.compile``), so it is that drafter with this model.
"""

from __future__ import annotations

from dataclasses import dataclass

from dspark.drafters.base import Drafter, DrafterConfig, register_drafter
from dspark.drafters.draft_model import DraftModelDrafter


@dataclass
class EarlyExitConfig(DrafterConfig):
    """Config of the ``early_exit`` drafter.

    Attributes:
        num_speculative_tokens: γ, tokens drafted autoregressively per round.
        exit_layer: decoder layers the drafts run through before the target's final norm and LM
            head, ``1`` to the target's layers − 1 (``null``: half of them, rounded down). Each draft
            step costs that share of the target's layers plus its LM head.
        min_survival: stop drafting a request once its survival ``a_k = Π_{i≤k} c_i`` falls below
            this (``c_k``: the early exit's top probability at step k, calibrated when a
            calibration is given); ``0`` (default) drafts γ every round. Lossless either way.
        calibration: a file of per-position maps of the confidences fitted by ``dspark calibrate
            --config early_exit --output FILE``; ``null`` (default) keeps the raw top probabilities.
    """

    name: str = "early_exit"
    num_speculative_tokens: int = 4
    exit_layer: int | None = None
    min_survival: float = 0.0
    calibration: str | None = None


@register_drafter("early_exit")
class EarlyExitDrafter(DraftModelDrafter):
    """Drafts γ tokens with the target's first ``exit_layer`` layers, its final norm and LM head
    (weights shared with the target), as :class:`~dspark.drafters.DraftModelDrafter` drafts with a
    separate model: each ``q_k`` is the early exit's distribution after the sampler's processing,
    and its top probability is the confidence."""

    config_class = EarlyExitConfig

    def __init__(self, config: EarlyExitConfig, *, target, sampler, draft_model=None):
        Drafter.__init__(self, config, target=target, sampler=sampler, draft_model=draft_model)
        if draft_model is not None:
            raise ValueError("drafter 'early_exit' drafts with the target's own first layers: it takes no draft "
                             "model (use drafter.name=draft_model for a separate one)")
        if config.calibration == "auto":  # (it would find nothing and keep the raw confidences, silently)
            raise ValueError("drafter 'early_exit' has no checkpoint for drafter.calibration=auto to read "
                             "calibration.json beside: give the file `dspark calibrate --config early_exit --output "
                             "FILE` wrote, or null")
        if not hasattr(target, "early_exit"):
            raise ValueError(f"drafter 'early_exit' needs a target with a native implementation "
                             f"(target.backend=native; this target runs as {type(target).__name__}): it drafts "
                             "with the target's own layers")
        layers = max(1, target.num_layers // 2) if config.exit_layer is None else config.exit_layer
        if target.num_layers < 2:
            raise ValueError("drafter 'early_exit' needs a target with at least 2 decoder layers (it drafts with "
                             f"fewer of them than the target has); this one has {target.num_layers}")
        try:
            self.model = target.early_exit(layers)
        except ValueError as err:
            raise ValueError(f"drafter.exit_layer: {err}") from None
        self._set_up(None)
