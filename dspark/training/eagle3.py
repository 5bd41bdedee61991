"""Training the EAGLE-3 head with training-time test (Li et al., 2025).

Each training sequence goes through the frozen target once. The draft layer first runs over every
*pair* of the sequence (fused target feature at position p, token p + 1), causally — step 1, and
the keys/values every later step attends to. Then, from anchors sampled at random positions
(the same number per sequence as the DSpark drafter's, so the two see the same supervision),
the head unrolls γ − 1 more steps exactly as it drafts at inference: step s's pair is (the head's
own output of step s − 1, the data's next token), attending to the true pairs before the anchor
and to its own earlier steps. Teacher forcing is on the *tokens* only: wherever the drafted
tokens equal the data's, training and inference compute the same distributions.

Loss: soft cross-entropy to the target's distribution, step weights ``exp(−(s−1)/γ)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dspark.drafters.eagle_model import Eagle3Head
from dspark.training.block_drafter import BlockDrafterModule, position_weights
from dspark.training.modules import OptimConfig


class Eagle3Module(BlockDrafterModule):
    """Lightning module: the trainable :class:`~dspark.drafters.eagle_model.Eagle3Head` and a
    frozen native target. Validation reports the same metrics as the block drafter's (greedy τ
    under teacher forcing, expected acceptance ``1 − TV`` per position).

    Args:
        net: the head (trained in place); target: the frozen target.
        optim, max_steps: optimiser schedule. anchors: unrolled chains per training sequence.
    """

    def __init__(self, net: Eagle3Head, target, optim: OptimConfig, max_steps: int, *, anchors: int = 16):
        if net.args.draft_vocab_size:
            raise ValueError("training a head with a reduced draft vocabulary is not supported: use draft_vocab_size 0")
        super().__init__(net, target, optim, max_steps, anchors=anchors)

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
        tokens = batch[:, :-1]
        hidden, target_logits = self.target_pass(tokens)
        anchors = self.sample_anchors(tokens.shape[0], tokens.shape[1], generator)
        logits, _ = self.draft_blocks(tokens, hidden, anchors)
        target_at, labels = self.block_targets(tokens, target_logits, anchors)
        log_p_draft = F.log_softmax(logits.float(), -1)
        p_target = F.softmax(target_at.float(), -1)
        soft_ce = -(p_target * log_p_draft).sum(-1)  # [B, A, γ]
        tv = (log_p_draft.exp() - p_target).abs().sum(-1)
        ce = -log_p_draft.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        weights = position_weights(self.net.args.gamma, tokens.device)
        weighted = {name: (value * weights).sum(-1).mean() for name, value in
                    (("soft_ce", soft_ce), ("tv", tv.detach()), ("ce", ce.detach()))}
        terms = {"soft_ce": soft_ce, "tv": tv, "ce": ce, "accept": (1 - 0.5 * tv).detach().clamp(0.0, 1.0)}
        return weighted["soft_ce"], weighted, terms, logits, target_at
