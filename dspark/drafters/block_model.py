"""The DSpark block drafter network: parallel backbone, sequential head, confidence head.

One forward drafts a whole block of γ positions (Cheng et al., 2026, §3.1):

* **context features** — hidden states of chosen target layers at every committed position,
  concatenated, projected by ``W_c`` (``context_proj``) and RMS-normalised; every backbone layer
  turns them into extra keys/values ("KV injection"), kept in the drafter's own cache;
* **parallel backbone** — decoder layers over ``[anchor, mask, …, mask]`` (γ inputs), attending
  to all context and bidirectionally within the block; the anchor is the first prediction
  position. Token embedding and LM head are the target's (frozen, never stored here): base
  logits ``U_1..U_γ`` ``[B, γ, V]`` and hiddens ``h_1..h_γ`` ``[B, γ, H]``;
* **sequential head** — a bias ``B_k`` on ``U_k`` from the previously drafted token(s), so the
  block is sampled left to right from ``softmax(U_k + B_k)``: ``none`` (DFlash), ``markov``
  (``W2·W1[x_{k-1}]``, rank r), ``gated_markov`` (the same, scaled by a learned gate in (0, 1)),
  ``rnn`` (a gated recurrent state over ``[s_{k-1}; W1[x_{k-1}]; h_k]``);
* **confidence head** — ``c_k = σ(wᵀ[h_k; W1[x_{k-1}]])``, the predicted probability that
  draft k survives verification given that drafts 1..k−1 did.

Two options exist for drafters trained elsewhere (DeepSpec's released checkpoints,
:mod:`dspark.drafters.deepspec_import`): context features may enter the keys/values without the
layer's input norm (``context_input_norm: false``), and the confidence head may read ``h_k`` alone
(``confidence: hidden``) or be absent (``confidence: none``; then no ``W1`` is needed without a
sequential head, ``rank: 0``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dspark.drafters.checkpoint import TargetShape, check_size
from dspark.models.linear import Linear
from dspark.models.native import Block, ModelArgs, NativeCausalLM

HEADS = ("none", "markov", "gated_markov", "rnn")
#: what the confidence head reads: ``[h_k; W1[x_{k-1}]]``, ``h_k`` alone, or no confidence head
CONFIDENCE_INPUTS = ("token", "hidden", "none")


@dataclass(frozen=True)
class BlockDrafterArgs(TargetShape):
    """Architecture of a block drafter, and the target it was built for (:class:`TargetShape`).

    Attributes:
        gamma: block size γ (draft positions per forward).
        num_layers: backbone decoder layers (same width and head layout as the target).
        intermediate_size: MLP width of the backbone layers.
        target_layers: target decoder layers whose outputs form the context features.
        head: sequential head, one of ``none``, ``markov``, ``gated_markov``, ``rnn``.
        rank: width r of the sequential head's token embedding ``W1`` and state (``0``: no ``W1``,
            for ``head: none`` with a confidence head that does not read it, or none).
        context_input_norm: each layer normalises the context features (its input norm) before
            projecting them to keys/values (dspark's drafters); ``False``: projected as they are.
        confidence: what the confidence head reads (:data:`CONFIDENCE_INPUTS`).
        anchor_predicts: the block is ``[anchor, mask × (γ−1)]`` and position k−1 drafts ``x_k``
            (dspark's and DeepSpec's drafters); ``False``: the block is ``[anchor, mask × γ]`` and
            each mask position drafts its own token, the anchor's output unused (z-lab's DFlash).
    """

    gamma: int
    num_layers: int
    intermediate_size: int
    target_layers: tuple[int, ...]
    head: str
    rank: int
    context_input_norm: bool = True
    confidence: str = "token"
    anchor_predicts: bool = True

    @property
    def block_width(self) -> int:
        """Positions of one block forward: γ, or γ + 1 when the anchor's own output is not a draft."""
        return self.gamma + (0 if self.anchor_predicts else 1)

    @classmethod
    def for_target(cls, target: NativeCausalLM, *, gamma: int, num_layers: int, target_layers, head: str,
                   rank: int, intermediate_size: int | None = None, context_input_norm: bool = True,
                   confidence: str = "token", qk_norm: bool | None = None,
                   anchor_predicts: bool = True) -> "BlockDrafterArgs":
        """Arguments for a drafter of ``target``; raises ``ValueError`` on impossible settings.
        ``qk_norm``: per-head q/k norms in the backbone layers (default: as the target has them)."""
        shape = TargetShape.fields_of(target)
        if qk_norm is not None:
            shape["qk_norm"] = bool(qk_norm)
        return cls(**shape, gamma=gamma, num_layers=num_layers,
                   intermediate_size=target.args.intermediate_size if intermediate_size is None else intermediate_size,
                   target_layers=tuple(int(i) for i in target_layers), head=head, rank=rank,
                   context_input_norm=context_input_norm, confidence=confidence,
                   anchor_predicts=anchor_predicts).validate()

    def validate(self) -> "BlockDrafterArgs":
        """Raise ``ValueError`` naming the bad setting."""
        if self.head not in HEADS:
            raise ValueError(f"drafter.head must be one of {', '.join(HEADS)}, got {self.head!r}")
        if self.confidence not in CONFIDENCE_INPUTS:
            raise ValueError(f"confidence must be one of {', '.join(CONFIDENCE_INPUTS)}, got {self.confidence!r}")
        for name in ("gamma", "num_layers", "intermediate_size"):
            check_size(name, getattr(self, name))
        needs_w1 = self.head != "none" or self.confidence == "token"
        check_size("rank", self.rank, int(needs_w1), f"W1 is {'' if needs_w1 else 'not '}used")
        if not self.target_layers:
            raise ValueError("target_layers must name at least one target layer")
        self.check_target_layers(self.target_layers)
        return self

    def layer_args(self) -> ModelArgs:
        """The backbone layers' architecture (a target-shaped decoder layer)."""
        return self.decoder_layer_args("dspark", self.intermediate_size, self.num_layers)


class BlockDrafter(nn.Module):
    """The trainable part of a DSpark / DFlash drafter (the target's embedding and LM head are
    passed in, never owned).

    Args:
        args: architecture.
    """

    def __init__(self, args: BlockDrafterArgs):
        super().__init__()
        self.args = args
        hidden, rank, vocab = args.hidden_size, args.rank, args.vocab_size
        self.context_proj = Linear(len(args.target_layers) * hidden, hidden, bias=False)  # W_c
        self.context_norm = nn.Parameter(torch.ones(hidden))
        self.mask_embedding = nn.Parameter(torch.zeros(hidden))
        self.layers = nn.ModuleList(Block(args.layer_args(), i) for i in range(args.num_layers))
        self.norm = nn.Parameter(torch.ones(hidden))
        self.token_embedding = nn.Embedding(vocab, rank) if rank else None  # W1: sequential and confidence heads
        self.confidence = None if args.confidence == "none" else Linear(
            hidden + (rank if args.confidence == "token" else 0), 1)
        if args.head in ("markov", "gated_markov", "rnn"):
            self.bias_projection = Linear(rank, vocab, bias=False)  # W2
        if args.head == "gated_markov":
            self.gate = Linear(hidden + rank, 1)
        if args.head == "rnn":
            self.recurrent = Linear(2 * rank + hidden, 3 * rank)  # gate, candidate, output
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Small random init; the sequential bias starts at zero so training begins from DFlash."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        if hasattr(self, "bias_projection"):
            nn.init.zeros_(self.bias_projection.weight)
        nn.init.normal_(self.mask_embedding, std=0.02)

    # ------------------------------------------------------------------ context
    def context_features(self, target_hidden: list[torch.Tensor]) -> torch.Tensor:
        """``[B, L, H]`` features from the target's layer outputs (one ``[B, L, H]`` per layer id)."""
        x = self.context_proj(torch.cat(target_hidden, -1))
        return F.rms_norm(x, (x.shape[-1],), self.context_norm, self.args.rms_norm_eps)

    def context_kv(self, features: torch.Tensor, rope) -> list[torch.Tensor]:
        """Per backbone layer, the injected keys/values ``[B, L, 2, H_kv, D]`` of context features."""
        return [self.layer_context_kv(layer, features, rope) for layer in self.layers]

    def layer_context_kv(self, layer: Block, features: torch.Tensor, rope) -> torch.Tensor:
        """One layer's injected keys/values ``[B, L, 2, H_kv, D]`` of context features ``[B, L, H]``."""
        return layer.project_kv(features, rope, normalise=self.args.context_input_norm)

    def previous_embedding(self, previous: torch.Tensor) -> torch.Tensor | None:
        """``W1[x_{k-1}]`` ``[..., r]`` of the previous tokens ``[...]`` (``None`` without ``W1``)."""
        return None if self.token_embedding is None else self.token_embedding(previous)

    # ------------------------------------------------------------------ heads
    def head_bias(self, prev_embedding: torch.Tensor, hidden: torch.Tensor, state: torch.Tensor | None,
                  projection_t: torch.Tensor | None = None, table_row: torch.Tensor | None = None):
        """The sequential bias ``B_k`` ``[N, V]`` (``None`` for the ``none`` head) and the new state.

        ``prev_embedding``: ``W1[x_{k-1}]`` ``[N, r]``; ``hidden``: ``h_k`` ``[N, H]``; ``state``:
        the RNN state ``s_{k-1}`` ``[N, r]`` (``None`` at k = 1 and for the other heads). Drafting
        may pass one of two precomputed forms of the product with ``W2`` (the same bias, up to
        rounding): ``projection_t``, ``W2ᵀ`` ``[r, V]`` contiguous (a row-major ``[N, r] @ [r, V]``
        streams the weight in order, about twice as fast on a CPU at batch 1 as ``W2``'s own
        ``[V, r]`` layout), or, for the ``markov`` and ``gated_markov`` heads, ``table_row``
        ``[N, V]``: the rows of :meth:`bias_table` at ``x_{k-1}``, so no product at all.
        """
        head = self.args.head
        if head == "none":
            return None, state
        project = self.bias_projection if projection_t is None else (lambda z: z @ projection_t)
        if head in ("markov", "gated_markov"):
            markov = project(prev_embedding) if table_row is None else table_row
            if head == "markov":
                return markov, state
            return torch.sigmoid(self.gate(torch.cat([hidden, prev_embedding], -1))) * markov, state
        if state is None:
            state = prev_embedding.new_zeros(prev_embedding.shape)
        z = torch.cat([state, prev_embedding, hidden], -1)
        gate, candidate, out = self.recurrent(z).chunk(3, -1)
        gate = torch.sigmoid(gate)
        state = gate * state + (1 - gate) * torch.tanh(candidate)
        return project(torch.tanh(out)), state

    def bias_table(self) -> torch.Tensor:
        """``[V, V]`` the Markov bias of every previous token, row ``x`` = ``W2·W1[x]`` (``markov`` and
        ``gated_markov`` heads; the gated head scales the row by its gate). Computed in float32 at
        least, returned in the weights' dtype. It costs ``V²`` entries, so drafting keeps one only
        for small vocabularies (``drafter.bias_table_mib``), where each left-to-right step then
        reads one row instead of multiplying by ``W2``."""
        if self.args.head not in ("markov", "gated_markov"):
            raise ValueError(f"only the markov and gated_markov heads have a bias table, not {self.args.head!r}")
        w1, w2 = self.token_embedding.weight, self.bias_projection.weight  # [V, r] each
        compute = torch.promote_types(w1.dtype, torch.float32)
        return (w1.to(compute) @ w2.to(compute).t()).to(w1.dtype)

    def confidence_of(self, hidden: torch.Tensor, prev_embedding: torch.Tensor | None) -> torch.Tensor | None:
        """``c_k = σ(wᵀ[h_k; W1[x_{k-1}]])`` ``[...]`` (``σ(wᵀh_k)`` with ``confidence: hidden``;
        ``None`` without a confidence head)."""
        if self.confidence is None:
            return None
        features = torch.cat([hidden, prev_embedding], -1) if self.args.confidence == "token" else hidden
        return torch.sigmoid(self.confidence(features).squeeze(-1))

    def output(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone output → normalised hiddens ``h`` (the LM head turns them into ``U``)."""
        return F.rms_norm(x, (x.shape[-1],), self.norm, self.args.rms_norm_eps)
