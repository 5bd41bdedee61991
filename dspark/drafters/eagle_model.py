"""The EAGLE-3 draft head (Li et al., 2025): one decoder layer over the target's fused features.

A *pair* at position p joins what is known there: a feature ``f_p`` ``[H]`` and the embedding
of the token after it, ``e(t_{p+1})``. Its output ``d_p`` predicts ``t_{p+2}``.

* **Fused features** — the hidden states of a low, a middle and a high target layer at position
  p, concatenated and mapped to the hidden size: ``f_p = W_fc · [h^(l)_p; h^(m)_p; h^(h)_p]``.
* **Draft layer** — a decoder layer whose attention reads ``[norm(e(t_{p+1})); norm(f_p)]``
  (``2H`` wide) and whose residual stream is ``f_p`` (or ``norm(f_p)``: ``norm_before_residual``,
  a variant some published heads were trained with); its output ``d_p`` is the next feature.
* **Drafting** — committed pairs use the target's fused features; every further draft step
  feeds the head's own output back: the pair ``(d_{p-1}, x)`` of the token x it just drafted.
  Training unrolls the same recursion ("training-time test", :mod:`dspark.training.eagle3`).
* **Vocabulary** — the target's LM head (shared, frozen), or a reduced draft vocabulary with its
  own head and a draft-to-target id map ``d2t``; its distribution is scattered onto the target's
  vocabulary, zero elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dspark.drafters.checkpoint import TargetShape, check_size
from dspark.models.linear import Linear
from dspark.models.native import Block, ModelArgs, NativeCausalLM


@dataclass(frozen=True)
class Eagle3Args(TargetShape):
    """Architecture of an EAGLE-3 head, and the target it was built for (:class:`TargetShape`).

    Attributes:
        gamma: draft steps the head was trained to unroll (γ).
        target_layers: the target layers whose outputs are fused (EAGLE-3 fuses three: a low, a
            middle and a high one; DeepSpec's heads five).
        intermediate_size: MLP width of the draft layer.
        draft_vocab_size: size of the draft vocabulary (``0`` = the target's, through its LM head).
        norm_before_residual: the draft layer's residual stream starts from the normalised
            feature instead of the feature (heads trained that way, e.g. some published ones).
    """

    gamma: int
    target_layers: tuple[int, ...]
    intermediate_size: int
    draft_vocab_size: int
    norm_before_residual: bool = False

    @classmethod
    def for_target(cls, target: NativeCausalLM, *, gamma: int, target_layers, intermediate_size: int | None = None,
                   draft_vocab_size: int = 0, qk_norm: bool | None = None,
                   norm_before_residual: bool = False) -> "Eagle3Args":
        """Arguments for a head of ``target``; raises ``ValueError`` on impossible settings.
        ``qk_norm``: whether the draft layer normalises q and k per head (default: as the target
        does; ``False`` for a Qwen3 target gives a head that the EAGLE / SpecForge format, and so
        vLLM and SGLang, can run: :func:`~dspark.drafters.eagle3_export.export_eagle3`)."""
        shape = TargetShape.fields_of(target)
        if qk_norm is not None:
            shape["qk_norm"] = bool(qk_norm)
        return cls(**shape, gamma=gamma, target_layers=tuple(int(i) for i in target_layers),
                   intermediate_size=target.args.intermediate_size if intermediate_size is None else intermediate_size,
                   draft_vocab_size=draft_vocab_size, norm_before_residual=norm_before_residual).validate()

    def validate(self) -> "Eagle3Args":
        """Raise ``ValueError`` naming the bad setting."""
        check_size("gamma", self.gamma)
        check_size("intermediate_size", self.intermediate_size)
        if not self.target_layers:
            raise ValueError("target_layers must name the target layers to fuse (EAGLE-3: three, a low, a middle "
                             "and a high one), got none")
        self.check_target_layers(self.target_layers)
        check_size("draft_vocab_size", self.draft_vocab_size, 0, "0: the target's vocabulary")
        if self.draft_vocab_size > self.vocab_size:
            raise ValueError(f"draft_vocab_size must be in [0, {self.vocab_size}] (0 = the target's vocabulary), "
                             f"got {self.draft_vocab_size}")
        return self

    def layer_args(self) -> ModelArgs:
        """The draft layer's architecture (a target-shaped decoder layer)."""
        return self.decoder_layer_args("eagle3", self.intermediate_size, 1)


class PairLayer(Block):
    """A decoder layer whose attention input is a pair ``[norm(embedding); norm(feature)]`` (``2H``)
    and whose residual stream is the feature (``norm(feature)`` with ``norm_before_residual``)."""

    def __init__(self, args: ModelArgs, norm_before_residual: bool = False):
        super().__init__(args, 0)
        q_dim, kv_dim = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
        self.wqkv = Linear(2 * args.hidden_size, q_dim + 2 * kv_dim, bias=args.qkv_bias)
        self.embedding_norm = nn.Parameter(torch.ones(args.hidden_size))  # attention_norm normalises the feature
        self.norm_before_residual = norm_before_residual

    def project_pair(self, embedding: torch.Tensor, feature: torch.Tensor, rope):
        """Queries and new keys/values (as :meth:`Block.project`) of pairs ``[B, T, H]`` × 2."""
        hidden = embedding.shape[-1]
        h = torch.cat([F.rms_norm(embedding, (hidden,), self.embedding_norm, self.eps),
                       F.rms_norm(feature, (hidden,), self.attention_norm, self.eps)], -1)
        return self.project_normed(h, rope)

    def attend(self, feature: torch.Tensor, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
        """:meth:`Block.attend` with the pairs' features ``[B, T, H]`` as the residual stream."""
        if self.norm_before_residual:
            feature = F.rms_norm(feature, (feature.shape[-1],), self.attention_norm, self.eps)
        return super().attend(feature, q, keys, values, mask)


class Eagle3Head(nn.Module):
    """The trainable part of an EAGLE-3 drafter (the target's embedding, and its LM head unless a
    draft vocabulary is set, are passed in, never owned).

    Args:
        args: architecture.
    """

    def __init__(self, args: Eagle3Args):
        super().__init__()
        self.args = args
        hidden = args.hidden_size
        self.fc = Linear(len(args.target_layers) * hidden, hidden, bias=False)
        self.layer = PairLayer(args.layer_args(), args.norm_before_residual)
        self.norm = nn.Parameter(torch.ones(hidden))
        if args.draft_vocab_size:
            self.lm_head = Linear(hidden, args.draft_vocab_size, bias=False)
            self.register_buffer("d2t", torch.arange(args.draft_vocab_size))  # draft id → target id
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def set_draft_vocabulary(self, d2t: torch.Tensor) -> None:
        """Set the draft-to-target map ``[V_d]``: distinct target ids in ``[0, V)``."""
        d2t = torch.as_tensor(d2t, dtype=torch.long)
        if not self.args.draft_vocab_size:
            raise ValueError("this head uses the target's vocabulary (draft_vocab_size 0): it has no d2t map")
        if d2t.shape != (self.args.draft_vocab_size,):
            raise ValueError(f"d2t must have draft_vocab_size={self.args.draft_vocab_size} entries, got {tuple(d2t.shape)}")
        out_of_range = d2t[(d2t < 0) | (d2t >= self.args.vocab_size)]
        if out_of_range.numel():
            raise ValueError(f"d2t maps to target ids {out_of_range[:5].tolist()} outside the target's vocabulary "
                             f"[0, {self.args.vocab_size})")
        if d2t.unique().numel() != d2t.numel():
            raise ValueError("d2t maps two draft ids to the same target id")
        self.d2t.copy_(d2t)

    def fuse(self, target_hidden: list[torch.Tensor]) -> torch.Tensor:
        """``f = W_fc · [h_low; h_mid; h_high]`` ``[B, T, H]`` from the fused layers' ``[B, T, H]`` each."""
        return self.fc(torch.cat(target_hidden, -1))

    def logits(self, d: torch.Tensor, target: NativeCausalLM) -> torch.Tensor:
        """Logits over the *target's* vocabulary ``[..., V]`` from layer outputs ``d`` ``[..., H]``
        (a draft vocabulary's logits are scattered to their target ids, ``-inf`` elsewhere)."""
        h = F.rms_norm(d, (d.shape[-1],), self.norm, self.args.rms_norm_eps)
        if not self.args.draft_vocab_size:
            return target.lm_head(h)
        small = self.lm_head(h)
        full = small.new_full((*small.shape[:-1], self.args.vocab_size), float("-inf"))
        return full.index_copy(-1, self.d2t, small)
