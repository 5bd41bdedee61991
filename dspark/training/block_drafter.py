"""Training the DSpark / DFlash block drafter against a frozen target (Cheng et al., 2026, §3.3).

Each training sequence goes through the frozen target once (its chosen layers' hidden states and
its next-token distributions, computed on the fly). Anchors are sampled at random positions; a
block of γ draft positions follows each anchor. All blocks of a sequence are drafted in one
forward: block ``i`` attends to the context before its anchor and, bidirectionally, to itself.
The sequential head is teacher-forced with the data's previous token.

Loss, with position weights ``w_k = exp(−(k−1)/γ)``:
``0.1·CE + 0.9·TV + 1.0·BCE(c_k, 1 − ½‖p_d − p_t‖₁)`` where ``TV = ‖p_d − p_t‖₁`` (the paper's);
an optional ``KL(p_t ‖ p_d)`` term (weight ``kl``, default 0) adds the soft cross-entropy to the
target's distribution that the EAGLE-3 head trains with.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F

from dspark.drafters.block_model import BlockDrafter
from dspark.training.data import DOMAINS
from dspark.training.modules import OptimConfig, configure_adamw
from dspark.training.teacher_cache import TeacherCache


def position_weights(gamma: int, device=None) -> torch.Tensor:
    """``w_k = exp(−(k−1)/γ)`` for k = 1..γ: earlier positions matter more under prefix acceptance."""
    return torch.exp(-torch.arange(gamma, dtype=torch.float32, device=device) / gamma)


def block_losses(draft_logits: torch.Tensor, target_logits: torch.Tensor, labels: torch.Tensor,
                 confidence: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-position loss terms ``[..., γ]`` and the soft acceptance label.

    Args:
        draft_logits: ``[..., γ, V]`` ``U_k + B_k``; target_logits: ``[..., γ, V]`` the target's.
        labels: ``[..., γ]`` the data's next tokens; confidence: ``[..., γ]`` ``c_k`` in (0, 1) (or
            ``None``: no confidence head, ``bce`` is zero).

    Returns:
        ``ce``, ``tv`` (``‖p_d − p_t‖₁``), ``kl`` (``KL(p_t ‖ p_d)``), ``accept`` (``1 − tv/2``, the
        probability that rejection sampling accepts a draft from ``p_d``; the confidence label, no
        gradient), ``bce``.
    """
    log_p_draft = F.log_softmax(draft_logits.float(), -1)
    p_target = F.softmax(target_logits.float(), -1)
    ce = -log_p_draft.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    tv = (log_p_draft.exp() - p_target).abs().sum(-1)
    kl = F.kl_div(log_p_draft, F.log_softmax(target_logits.float(), -1), reduction="none", log_target=True).sum(-1)
    accept = (1 - 0.5 * tv).detach().clamp(0.0, 1.0)
    bce = (torch.zeros_like(ce) if confidence is None  # a drafter without a confidence head
           else F.binary_cross_entropy(confidence.float().clamp(1e-6, 1 - 1e-6), accept, reduction="none"))
    return {"ce": ce, "tv": tv, "kl": kl, "accept": accept, "bce": bce}


#: the block drafter's loss terms and their default weights (the paper's; ``kl`` is ours, off)
LOSS_WEIGHTS = {"ce": 0.1, "tv": 0.9, "conf": 1.0, "kl": 0.0}


def check_loss_weights(weights: dict | None) -> dict[str, float]:
    """The defaults updated with ``weights``; an unknown term or a negative / non-finite weight is
    refused, naming it and what is allowed."""
    import math

    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(LOSS_WEIGHTS))
    if unknown:
        raise ValueError(f"unknown loss_weights {unknown}: the block drafter's terms are {sorted(LOSS_WEIGHTS)}")
    for name, value in weights.items():
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"loss_weights.{name} must be a finite number >= 0, got {value!r}")
    weights = {**LOSS_WEIGHTS, **{name: float(value) for name, value in weights.items()}}
    if not any(weights.values()):
        raise ValueError(f"loss_weights are all 0 ({weights}): the loss would be 0 and nothing would train")
    return weights


def target_outputs(target, tokens: torch.Tensor, layers: tuple[int, ...]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The frozen ``target`` over ``tokens`` ``[B, T]``: hidden states ``[B, T, H]`` of ``layers`` and
    logits ``[B, T, V]``, float32."""
    from dspark.cache import StaticKVCache

    batch, length = tokens.shape
    with torch.no_grad():
        cache = StaticKVCache.for_model(target, batch, length)
        out = target(tokens, cache, hidden_layers=layers, kv_len=length)
    return [h.float() for h in out.hidden_states], out.logits.float()


class BlockDrafterModule(L.LightningModule):
    """Lightning module: the trainable :class:`BlockDrafter` and a frozen native target.

    Args:
        net: the drafter network (trained in place).
        target: the frozen target (a :class:`~dspark.models.NativeCausalLM`); kept out of the
            module's parameters and checkpoints.
        optim, max_steps: optimiser schedule. anchors: blocks per training sequence.
        loss_weights: weights of the ``ce``, ``tv``, ``conf`` and ``kl`` terms (missing: :data:`LOSS_WEIGHTS`).
        teacher_cache: where the target's outputs are read from / written to (default: computed
            on every batch).
    """

    def __init__(self, net: BlockDrafter, target, optim: OptimConfig, max_steps: int, *, anchors: int = 16,
                 loss_weights: dict | None = None, teacher_cache: TeacherCache | None = None):
        super().__init__()
        if not getattr(net.args, "anchor_predicts", True):  # (EAGLE-3 heads train through this module too)
            raise ValueError("the block drafter recipe trains drafters whose anchor position drafts x_1 "
                             "(anchor_predicts); z-lab's DFlash layout is read, not trained, here")
        self.net = net
        object.__setattr__(self, "target", target.eval().requires_grad_(False))  # not a submodule
        self.optim, self.max_steps, self.anchors = optim, max_steps, anchors
        self.loss_weights = check_loss_weights(loss_weights)
        self.teacher_cache = teacher_cache
        self._eval: dict[str, torch.Tensor] = {}

    def target_pass(self, tokens: torch.Tensor):
        """The frozen target over ``tokens`` ``[B, T]``: hidden states of the drafter's layers and
        logits, float32 (read from the teacher cache when it has them)."""
        layers = tuple(self.net.args.target_layers)
        if self.teacher_cache is not None:
            return self.teacher_cache.fetch(tokens, layers, self.run_target)
        return self.run_target(tokens, layers)

    def run_target(self, tokens: torch.Tensor, layers: tuple[int, ...]):
        """One target forward over ``tokens`` ``[B, T]`` (:func:`target_outputs`)."""
        return target_outputs(self.target, tokens, layers)

    def sample_anchors(self, batch: int, length: int, generator=None) -> torch.Tensor:
        """``[B, A]`` anchor positions in ``[1, T − γ − 1]`` (each block has context and γ labels)."""
        gamma = self.net.args.gamma
        high = length - gamma - 1
        if high < 1:
            raise ValueError(f"training sequences of {length} tokens are too short for blocks of γ={gamma}")
        return torch.randint(1, high + 1, (batch, self.anchors), generator=generator, device=self.device)

    def draft_blocks(self, tokens: torch.Tensor, hidden: list[torch.Tensor], anchors: torch.Tensor):
        """Teacher-forced drafting of every block: (``U_k + B_k`` ``[B, A, γ, V]``, ``c_k`` ``[B, A, γ]``)."""
        net, t = self.net, self.target
        batch, length = tokens.shape
        gamma, num_anchors = net.args.gamma, anchors.shape[1]
        offsets = torch.arange(gamma, device=tokens.device)
        features = net.context_features(hidden)  # [B, T, H]
        rope_context = t.rotary(torch.arange(length, device=tokens.device).expand(batch, -1), features.dtype)
        block_positions = (anchors.unsqueeze(-1) + offsets).flatten(1)  # [B, A·γ]
        rope_block = t.rotary(block_positions, features.dtype)
        anchor_tokens = tokens.gather(1, anchors)  # [B, A]
        x = torch.cat([t.embed_tokens(anchor_tokens).unsqueeze(2).float(),
                       net.mask_embedding.expand(batch, num_anchors, gamma - 1, -1)], 2).flatten(1, 2)

        # block i sees the context before its anchor, and all of block i
        context_visible = torch.arange(length, device=tokens.device) < anchors.repeat_interleave(gamma, 1).unsqueeze(-1)
        block_id = torch.arange(num_anchors, device=tokens.device).repeat_interleave(gamma)
        same_block = (block_id.unsqueeze(1) == block_id.unsqueeze(0)).expand(batch, -1, -1)
        mask = torch.cat([context_visible, same_block], -1).unsqueeze(1)  # [B, 1, A·γ, T + A·γ]
        for layer in net.layers:
            context_kv = net.layer_context_kv(layer, features, rope_context)
            q, block_kv = layer.project(x, rope_block)
            kv = torch.cat([context_kv, block_kv], 1)  # [B, T + A·γ, 2, H_kv, D]
            x = layer.attend(x, q, kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2), mask)
        h = net.output(x).view(batch, num_anchors, gamma, -1)
        base_logits = t.lm_head(h)  # U [B, A, γ, V]

        previous = tokens.gather(1, (anchors.unsqueeze(-1) + offsets).flatten(1)).view(batch, num_anchors, gamma)
        embedding = net.previous_embedding(previous)  # W1[x_{k-1}], teacher-forced
        confidence = net.confidence_of(h, embedding)
        if net.args.head == "rnn":
            biases, state = [], None
            for k in range(gamma):
                bias, state = net.head_bias(embedding[:, :, k], h[:, :, k], state)
                biases.append(bias)
            logits = base_logits + torch.stack(biases, 2)
        else:
            bias, _ = net.head_bias(embedding, h, None)
            logits = base_logits if bias is None else base_logits + bias
        return logits, confidence

    def drafted_blocks(self, batch: torch.Tensor, generator=None):
        """The target pass, the anchors and the drafter's blocks of a batch ``[B, T+1]`` tokens:
        draft logits ``[B, A, γ, V]``, confidences (or ``None``), the target's logits at the same
        positions and the data's tokens there."""
        tokens = batch[:, :-1]
        hidden, target_logits = self.target_pass(tokens)
        anchors = self.sample_anchors(tokens.shape[0], tokens.shape[1], generator)
        logits, confidence = self.draft_blocks(tokens, hidden, anchors)
        target_at, labels = self.block_targets(tokens, target_logits, anchors)
        return logits, confidence, target_at, labels

    def step(self, batch: torch.Tensor, generator=None):
        """Loss terms of one batch of blocks ``[B, T+1]`` tokens."""
        logits, confidence, target_at, labels = self.drafted_blocks(batch, generator)
        terms = block_losses(logits, target_at, labels, confidence)
        weights = position_weights(self.net.args.gamma, logits.device)
        weighted = {name: (terms[name] * weights).sum(-1).mean() for name in ("ce", "tv", "kl", "bce")}
        w = self.loss_weights
        loss = w["ce"] * weighted["ce"] + w["tv"] * weighted["tv"] + w["conf"] * weighted["bce"]
        if w["kl"]:
            loss = loss + w["kl"] * weighted["kl"]
        return loss, weighted, terms, logits, target_at

    def block_targets(self, tokens: torch.Tensor, target_logits: torch.Tensor, anchors: torch.Tensor):
        """What draft k after anchor a must match: the target's logits at position a + k − 1
        ``[B, A, γ, V]`` and the data's token a + k ``[B, A, γ]``."""
        where = anchors.unsqueeze(-1) + torch.arange(self.net.args.gamma, device=tokens.device)  # [B, A, γ]
        target_at = target_logits.gather(1, where.flatten(1).unsqueeze(-1).expand(-1, -1, target_logits.shape[-1]))
        return target_at.view(*where.shape, -1), tokens.gather(1, (where + 1).flatten(1)).view_as(where)

    def training_step(self, batch, batch_idx):
        loss, weighted, _, _, _ = self.step(batch)
        self.log("train/loss", loss, prog_bar=True)
        for name, value in weighted.items():
            self.log(f"train/{name}", value)
        if self.teacher_cache is not None:  # share of sequences whose target pass was read from disk
            cache = self.teacher_cache
            self.log("train/teacher_cache_hit_rate", cache.hits / max(1, cache.hits + cache.misses))
        return loss

    def validation_step(self, batch, batch_idx, dataloader_idx=0, prefix: str = "val"):
        generator = torch.Generator(device=batch.device).manual_seed(batch_idx)  # the same anchors every time
        loss, _, terms, logits, target_logits = self.step(batch, generator)
        top1 = logits.argmax(-1) == target_logits.argmax(-1)  # [B, A, γ]
        leading = top1.long().cumprod(-1).sum(-1)  # greedy acceptance under teacher forcing
        key = f"{prefix}/{DOMAINS[dataloader_idx]}"
        sums = self._eval.setdefault(key, torch.zeros(4 + 2 * top1.shape[-1], dtype=torch.float64))
        gamma = top1.shape[-1]
        sums[:4] += torch.tensor([float(loss) * top1.shape[0], top1.shape[0], float(leading.float().sum()),
                                  top1.shape[0] * top1.shape[1]], dtype=torch.float64)
        sums[4:4 + gamma] += terms["accept"].sum((0, 1)).double().cpu()
        sums[4 + gamma:] += top1.sum((0, 1)).double().cpu()

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        self.validation_step(batch, batch_idx, dataloader_idx, prefix="test")

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end()

    def on_validation_epoch_end(self) -> None:
        gamma = self.net.args.gamma
        for key, sums in self._eval.items():
            blocks = sums[3]
            self.log(f"{key}_loss", sums[0] / sums[1], prog_bar=key.endswith("code"))
            self.log(f"{key}_tau_greedy", 1 + sums[2] / blocks, prog_bar=key.endswith("code"))
            self.log(f"{key}_acceptance", float(sums[4:4 + gamma].sum() / (blocks * gamma)))
            for k in range(gamma):
                self.log(f"{key}_acceptance_{k + 1}", sums[4 + k] / blocks)
        self._eval = {}

    def configure_optimizers(self):
        return configure_adamw(self.net, self.optim, self.max_steps)

