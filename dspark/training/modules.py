"""Lightning modules: next-token training of a target LM, and distillation of a draft model."""

from __future__ import annotations

import math
from dataclasses import dataclass

import lightning as L
import torch
import torch.nn.functional as F

from dspark.training.data import DOMAINS


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay to ``min_lr_ratio × lr``."""

    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 200
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)


def configure_adamw(module: torch.nn.Module, optim: OptimConfig, max_steps: int) -> dict:
    """AdamW (no decay on vectors) with warm-up and cosine decay, over ``module``'s trainable parameters."""
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": optim.weight_decay},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=optim.lr, betas=tuple(optim.betas))

    def schedule(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        progress = min(1.0, (step - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps))
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, schedule),
                                               "interval": "step"}}


def build_hf_model(spec: dict):
    """A freshly initialised ``transformers`` causal LM from ``{model_type, **config}``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(spec)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(spec.pop("model_type"), **spec))


class LanguageModelModule(L.LightningModule):
    """Trains ``model`` on next-token cross-entropy; evaluates loss and bits per byte per domain.

    Args:
        model: a ``transformers`` causal LM (trained in place; exported with ``save_pretrained``).
        byte_lengths: ``[V]`` bytes per token, for bits per byte.
        optim: optimiser settings; max_steps: length of the cosine schedule.
    """

    def __init__(self, model, byte_lengths: torch.Tensor, optim: OptimConfig, max_steps: int):
        super().__init__()
        self.model = model
        self.register_buffer("byte_lengths", byte_lengths.float(), persistent=False)
        self.optim, self.max_steps = optim, max_steps
        self._eval_sums: dict[str, torch.Tensor] = {}

    def loss_terms(self, batch: torch.Tensor):
        """(logits ``[B, T, V]``, targets ``[B, T]``) of a batch of blocks ``[B, T+1]``."""
        return self.model(input_ids=batch[:, :-1]).logits, batch[:, 1:]

    def training_step(self, batch, batch_idx):
        logits, targets = self.loss_terms(batch)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        self.log("train/loss", loss, prog_bar=True)
        self.log("lr", self.optimizers().param_groups[0]["lr"], prog_bar=False)
        return loss

    def _evaluate(self, batch, prefix: str, dataloader_idx: int) -> None:
        logits, targets = self.loss_terms(batch)
        nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")
        sums = self._eval_sums.setdefault(f"{prefix}/{DOMAINS[dataloader_idx]}", torch.zeros(3, dtype=torch.float64))
        sums += torch.tensor([float(nll), targets.numel(), float(self.byte_lengths[targets].sum())], dtype=torch.float64)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self._evaluate(batch, "val", dataloader_idx)

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        self._evaluate(batch, "test", dataloader_idx)

    def _log_eval(self) -> None:
        for key, (nll, tokens, num_bytes) in self._eval_sums.items():
            self.log(f"{key}_loss", nll / tokens, prog_bar=key.endswith("code"))
            self.log(f"{key}_bpb", nll / math.log(2) / max(num_bytes, 1.0))
        self._eval_sums = {}

    def on_validation_epoch_end(self) -> None:
        self._log_eval()

    def on_test_epoch_end(self) -> None:
        self._log_eval()

    def configure_optimizers(self):
        return configure_adamw(self.model, self.optim, self.max_steps)


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of ``KL(p_teacher ‖ p_student)`` at ``temperature`` (both ``[..., V]``)."""
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, -1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, -1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
    return kl.mean() * t * t


class DistillationModule(LanguageModelModule):
    """Trains a draft model to match a frozen teacher's next-token distribution (forward KL),
    optionally mixed with cross-entropy on the data (``ce_weight``). Evaluation adds the KL and
    the top-1 agreement with the teacher (what greedy verification accepts)."""

    def __init__(self, model, teacher, byte_lengths, optim: OptimConfig, max_steps: int, *, temperature: float = 1.0,
                 ce_weight: float = 0.0):
        super().__init__(model, byte_lengths, optim, max_steps)
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature, self.ce_weight = temperature, ce_weight

    def _teacher_logits(self, batch):
        with torch.no_grad():
            return self.teacher(input_ids=batch[:, :-1]).logits

    def training_step(self, batch, batch_idx):
        logits, targets = self.loss_terms(batch)
        kl = distillation_kl(logits, self._teacher_logits(batch), self.temperature)
        loss = kl
        if self.ce_weight:
            loss = loss + self.ce_weight * F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        self.log("train/kl", kl, prog_bar=True)
        self.log("lr", self.optimizers().param_groups[0]["lr"])
        return loss

    def _evaluate(self, batch, prefix, dataloader_idx):
        super()._evaluate(batch, prefix, dataloader_idx)
        logits, teacher = self.loss_terms(batch)[0], self._teacher_logits(batch)
        key = f"{prefix}/{DOMAINS[dataloader_idx]}"
        stats = self._eval_sums.setdefault(key + "#teacher", torch.zeros(3, dtype=torch.float64))
        kl = distillation_kl(logits, teacher) * logits.shape[0] * logits.shape[1]
        agree = (logits.argmax(-1) == teacher.argmax(-1)).sum()
        stats += torch.tensor([float(kl), float(agree), logits.shape[0] * logits.shape[1]], dtype=torch.float64)

    def _log_eval(self) -> None:
        for key in [k for k in self._eval_sums if k.endswith("#teacher")]:
            kl, agree, tokens = self._eval_sums.pop(key)
            base = key[: -len("#teacher")]
            self.log(f"{base}_kl", kl / tokens, prog_bar=base.endswith("code"))
            self.log(f"{base}_top1_agreement", agree / tokens)
        super()._log_eval()
