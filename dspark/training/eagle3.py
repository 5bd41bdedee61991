"""Training the EAGLE-3 head with training-time test (Li et al., 2025).

Each training sequence goes through the frozen target once. The draft layer first runs over every
*pair* of the sequence (fused target feature at position p, token p + 1), causally — step 1, and
the keys/values every later step attends to. Then, from anchors sampled at random positions
(the same number per sequence as the DSpark drafter's, so the two see the same supervision),
the head unrolls γ − 1 more steps exactly as it drafts at inference: step s's pair is (the head's
own output of step s − 1, the data's next token), attending to the true pairs before the anchor
and to its own earlier steps. Teacher forcing is on the *tokens* only: wherever the drafted
tokens equal the data's, training and inference compute the same distributions.

Loss: soft cross-entropy to the target's distribution, step weights ``exp(−(s−1)/γ)``. With a
reduced draft vocabulary (``draft_vocab_size > 0``) the draft vocabulary is the most frequent
tokens of the training stream (chosen when training starts), and the soft cross-entropy is taken
to the target's distribution restricted to it and renormalised — the best the head can do; the
logged TV distance and acceptance stay over the full vocabulary, where mass outside the draft
vocabulary counts as lost.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dspark.drafters.eagle_model import Eagle3Head
from dspark.training.block_drafter import BlockDrafterModule, position_weights
from dspark.training.modules import OptimConfig
from dspark.training.teacher_cache import TeacherCache


class Eagle3Module(BlockDrafterModule):
    """Lightning module: the trainable :class:`~dspark.drafters.eagle_model.Eagle3Head` and a
    frozen native target. Validation reports the same metrics as the block drafter's (greedy τ
    under teacher forcing, expected acceptance ``1 − TV`` per position).

    Args:
        net: the head (trained in place); target: the frozen target.
        optim, max_steps: optimiser schedule. anchors: unrolled chains per training sequence.
        teacher_cache: as for :class:`~dspark.training.block_drafter.BlockDrafterModule`.
    """

    def __init__(self, net: Eagle3Head, target, optim: OptimConfig, max_steps: int, *, anchors: int = 16,
                 teacher_cache: TeacherCache | None = None):
        super().__init__(net, target, optim, max_steps, anchors=anchors, teacher_cache=teacher_cache)

    def setup(self, stage: str) -> None:
        """With a reduced draft vocabulary, choose it from the training stream of the data module
        (a resumed run then restores the checkpoint's)."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if self.net.args.draft_vocab_size and datamodule is not None and "train" in datamodule.streams:
            self.net.set_draft_vocabulary(frequent_tokens(datamodule.streams["train"], self.net.args.draft_vocab_size,
                                                          self.net.args.vocab_size))

    def draft_blocks(self, tokens: torch.Tensor, hidden: list[torch.Tensor], anchors: torch.Tensor):
        """Training-time test: logits of the γ unrolled steps after every anchor ``[B, A, γ, V]``
        (and ``None``: the head has no confidence output)."""
        head, t = self.net, self.target
        layer, gamma = head.layer, head.args.gamma
        batch, length = tokens.shape
        num_pairs, num_anchors, device = length - 1, anchors.shape[1], tokens.device
        # step 1 over every pair (feature p, token p + 1), causal
        features = head.fuse([h[:, :num_pairs] for h in hidden])
        rope = t.rotary(torch.arange(num_pairs, device=device).expand(batch, -1), features.dtype)
        q, kv = layer.project_pair(t.embed_tokens(tokens[:, 1:]), features, rope)
        context_k, context_v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # [B, H_kv, N, D]
        causal = torch.ones(num_pairs, num_pairs, dtype=torch.bool, device=device).tril()
        step_one = layer.attend(features, q, context_k, context_v, causal)  # [B, N, H]
        d = step_one.gather(1, (anchors - 1).unsqueeze(-1).expand(-1, -1, step_one.shape[-1]))  # [B, A, H]
        outputs = [d]
        # steps 2..γ: one pair per anchor, the head's own output as the feature
        sees_context = torch.arange(num_pairs, device=device) < anchors.unsqueeze(-1)  # [B, A, N]: pairs < a
        same_chain = torch.eye(num_anchors, dtype=torch.bool, device=device)
        chain_k, chain_v = [], []
        for s in range(2, gamma + 1):
            position = anchors + s - 2  # [B, A]
            token = tokens.gather(1, anchors + s - 1)
            q, kv = layer.project_pair(t.embed_tokens(token), d, t.rotary(position, d.dtype))
            chain_k.append(kv[:, :, 0].transpose(1, 2))
            chain_v.append(kv[:, :, 1].transpose(1, 2))
            keys = torch.cat([context_k, *chain_k], 2)  # [B, H_kv, N + A·(s−1), D]
            values = torch.cat([context_v, *chain_v], 2)
            mask = torch.cat([sees_context, same_chain.repeat(1, s - 1).expand(batch, -1, -1)], -1).unsqueeze(1)
            d = layer.attend(d, q, keys, values, mask)
            outputs.append(d)
        return head.logits(torch.stack(outputs, 2), t), None  # [B, A, γ, V]

    def step(self, batch: torch.Tensor, generator=None):
        """Loss terms of one batch ``[B, T+1]`` tokens."""
        logits, _, target_at, labels = self.drafted_blocks(batch, generator)
        log_p_draft = F.log_softmax(logits.float(), -1)  # -inf outside a draft vocabulary
        p_target = F.softmax(target_at.float(), -1)
        tv = (log_p_draft.exp() - p_target).abs().sum(-1)
        if self.net.args.draft_vocab_size:  # to the target restricted to the draft vocabulary
            d2t = self.net.d2t
            p_inside = p_target[..., d2t]
            p_inside = p_inside / p_inside.sum(-1, keepdim=True).clamp_min(torch.finfo(p_inside.dtype).tiny)
            soft_ce = -(p_inside * log_p_draft[..., d2t]).sum(-1)  # [B, A, γ]
            label_inside = torch.isin(labels, d2t)
            ce = torch.where(label_inside, -log_p_draft.gather(-1, labels.unsqueeze(-1)).squeeze(-1).clamp(max=1e4), 0.0)
        else:
            soft_ce = -(p_target * log_p_draft).sum(-1)  # [B, A, γ]
            ce = -log_p_draft.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        weights = position_weights(self.net.args.gamma, logits.device)
        weighted = {name: (value * weights).sum(-1).mean() for name, value in
                    (("soft_ce", soft_ce), ("tv", tv.detach()), ("ce", ce.detach()))}
        terms = {"soft_ce": soft_ce, "tv": tv, "ce": ce, "accept": (1 - 0.5 * tv).detach().clamp(0.0, 1.0)}
        return weighted["soft_ce"], weighted, terms, logits, target_at


def frequent_tokens(stream: torch.Tensor, size: int, vocab_size: int) -> torch.Tensor:
    """The ``size`` most frequent token ids of a training stream ``[N]``, ascending (ties: lower id
    first) — the draft vocabulary of a reduced-vocabulary head, as its ``d2t`` map."""
    counts = torch.bincount(stream.flatten().long(), minlength=vocab_size)[:vocab_size]
    order = torch.sort(counts, descending=True, stable=True).indices
    return order[:size].sort().values
