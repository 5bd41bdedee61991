"""Repetition, presence and frequency penalties, n-gram bans: logits that depend on each request's history.

Definitions (vLLM's and the OpenAI API's; ``repetition_penalty`` and ``no_repeat_ngram_size`` are
also transformers'), applied to the logits before temperature and the top-k / top-p / min-p filters:

* ``repetition_penalty`` ``r``: every token in the prompt or the output so far has its logit
  divided by ``r`` if positive, multiplied by ``r`` otherwise;
* ``frequency_penalty`` ``f``: ``f × (occurrences of the token in the output so far)`` is subtracted;
* ``presence_penalty`` ``p``: ``p`` is subtracted once from every token that occurs in the output;
* ``no_repeat_ngram_size`` ``n``: a token that would complete an n-gram already present in the
  prompt and output (its first ``n − 1`` tokens being the last ``n − 1`` so far) gets logit −∞;
* ``logit_bias``: a fixed amount added to chosen tokens' logits, before the penalties (the
  OpenAI API's; it does not depend on the history, and rides along here).

Each request may have its own settings (:class:`~dspark.records.MixedSamplingParams`: the values
that differ are ``[B]`` columns, applied row by row).

**Why speculative decoding stays exact.** The target's distribution at verify position ``j`` (after
the anchor and the drafts ``x_1..x_j``) is penalised with the history those drafts extend, i.e. the
distribution plain decoding would use had it generated them; rejection sampling against it keeps
the penalised target's output distribution. A drafter may penalise its own distributions the same
way (they get closer to the target's: more drafts accepted) or not: ``q`` is whatever it drew from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dspark.records import MixedSamplingParams, RowBias, SamplingParams, is_on, per_row


@dataclass
class PenaltyHistory:
    """What the penalties read of a batch's history (on the model's device).

    Attributes:
        counts: ``[B, V]`` float32, occurrences of each token in each request's output so far
            (the generated tokens; the anchor is the last of them).
        in_prompt: ``[B, V]`` bool, the tokens of each request's prompt.
        tokens, lengths: the committed tokens ``[B, W]`` (prompt, then output) and their number
            ``[B]`` (the decoding state's own tensors: the n-gram bans read them).
    """

    counts: torch.Tensor
    in_prompt: torch.Tensor
    tokens: torch.Tensor
    lengths: torch.Tensor

    @classmethod
    def of(cls, tokens: torch.Tensor, prompt_lengths: torch.Tensor, lengths: torch.Tensor, vocab_size: int,
           in_prompt: torch.Tensor | None = None) -> "PenaltyHistory":
        """Count the history of ``tokens`` ``[B, W]`` (prompt ``[:P_b]``, output ``[P_b:L_b]``, the rest
        padding). ``in_prompt`` may be passed in when already known (it never changes in a call)."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        prompt = positions < prompt_lengths.unsqueeze(1)  # [B, W]
        output = ~prompt & (positions < lengths.unsqueeze(1))
        counts = tokens.new_zeros(tokens.shape[0], vocab_size, dtype=torch.float32).scatter_add_(1, tokens, output.float())
        if in_prompt is None:
            in_prompt = tokens.new_zeros(tokens.shape[0], vocab_size, dtype=torch.float32).scatter_add_(
                1, tokens, prompt.float()) > 0
        return cls(counts, in_prompt, tokens, lengths)

    def penalize_verify(self, logits: torch.Tensor, drafts: torch.Tensor, num_drafts: torch.Tensor,
                        params: SamplingParams | MixedSamplingParams) -> torch.Tensor:
        """The target's logits of a verify forward over ``[anchor, x_1..x_K]`` ``[B, K+1, V]``, position
        ``j`` penalised with the committed history and ``x_1..x_j`` (a new tensor).

        Args:
            drafts: ``[B, K]`` the verified drafts; those past ``num_drafts[b]`` ``[B]`` (padding)
                count nowhere.

        The logit bias goes first. Every position is then penalised with the committed history
        alone; then the entries of the draft tokens, the only ones the drafts change, are
        recomputed with their counts at each position (``[B, K+1, K]`` values): no
        ``[B, K+1, V]`` counts are built. Half-precision logits come back float32 (:func:`penalize`).
        """
        logits = biased(in_float32(logits), params)
        out = penalized(logits, self.counts.unsqueeze(1), self.in_prompt.unsqueeze(1), params)
        width, vocab = drafts.shape[1], self.counts.shape[1]
        banned = None
        for n in params.ngram_sizes:  # (one size, unless the requests asked for different ones)
            banned_n = banned_ngrams(self.tokens, self.lengths, drafts, n, vocab)
            if isinstance(params.no_repeat_ngram_size, torch.Tensor):
                banned_n &= (params.no_repeat_ngram_size == n).view(-1, 1, 1)
            banned = banned_n if banned is None else banned | banned_n
        if banned is not None:
            out = out.masked_fill(banned, float("-inf"))
        if width == 0:
            return out
        positions = torch.arange(width + 1, device=drafts.device)
        tokens = drafts.clamp(0, vocab - 1)  # [B, K]
        real = positions[:width] < num_drafts.unsqueeze(1)  # [B, K]
        before = positions[:width] < positions.unsqueeze(1)  # [K+1, K]: x_{i+1} comes before position j iff i < j
        same = (tokens.unsqueeze(2) == tokens.unsqueeze(1)) & real.unsqueeze(1)  # [B, K, K]: x_{i'+1} = x_{i+1}, real
        extra = before.float() @ same.float().transpose(1, 2)  # [B, K+1, K]: copies of x_{i+1} before position j
        index = tokens.unsqueeze(1).expand(-1, width + 1, -1)  # [B, K+1, K]
        counts = self.counts.gather(1, tokens).unsqueeze(1) + extra
        fixed = penalized(logits.gather(2, index), counts, self.in_prompt.gather(1, tokens).unsqueeze(1), params)
        if banned is not None:  # a banned draft token stays banned
            fixed = fixed.masked_fill(banned.gather(2, index), float("-inf"))
        return out.scatter(2, index, fixed)


def banned_ngrams(tokens: torch.Tensor, lengths: torch.Tensor, drafts: torch.Tensor, n: int, vocab_size: int) -> torch.Tensor:
    """``[B, K+1, V]`` bool: the tokens ``no_repeat_ngram_size = n`` forbids at each verify position.

    Position ``j`` follows the committed tokens ``tokens[b, :lengths[b]]`` ``[B, W]`` and the drafts
    ``x_1..x_j`` of ``drafts`` ``[B, K]``; a token is banned there when it ends an n-gram of that
    sequence whose first ``n − 1`` tokens are the sequence's last ``n − 1``. Every window of the
    sequence is compared at once (``[B, K+1, W + K, n − 1]`` comparisons), on the device.
    """
    batch, width = drafts.shape
    columns = torch.arange(width + 1, device=tokens.device)
    # the sequence of the last position: committed tokens, then the drafts (padding drafts are
    # written too; a position never sees a draft after its own)
    sequence = torch.cat([tokens, tokens.new_zeros(batch, width)], 1)
    sequence = sequence.scatter(1, lengths.unsqueeze(1) + columns[:width], drafts)  # [B, W + K]
    ends = lengths.unsqueeze(1) + columns  # [B, K+1]: sequence length at position j
    if n > sequence.shape[1]:  # no n-gram fits in the buffer yet: nothing is banned
        return torch.zeros(batch, width + 1, vocab_size, dtype=torch.bool, device=tokens.device)
    windows = sequence.unfold(1, n, 1)  # [B, N, n], N = W + K − n + 1
    suffix = sequence.gather(1, (ends.unsqueeze(-1) - (n - 1) + torch.arange(n - 1, device=tokens.device)).clamp(min=0)
                             .flatten(1)).view(batch, width + 1, n - 1)  # [B, K+1, n−1]
    same = (windows[:, None, :, : n - 1] == suffix[:, :, None, :]).all(-1)  # [B, K+1, N]
    inside = torch.arange(windows.shape[1], device=tokens.device) <= ends.unsqueeze(-1) - n  # the window is history
    # each matching window bans its last token; the others write to a spare column (every write is
    # True, so windows that repeat a token agree)
    follower = torch.where(same & inside, windows[:, None, :, n - 1], vocab_size)  # [B, K+1, N]
    banned = torch.zeros(batch, width + 1, vocab_size + 1, dtype=torch.bool, device=tokens.device)
    return banned.scatter_(2, follower, True)[..., :vocab_size]


def penalized(logits: torch.Tensor, counts: torch.Tensor, in_prompt: torch.Tensor, params: SamplingParams | MixedSamplingParams) -> torch.Tensor:
    """The definitions, elementwise: ``logits``, ``counts`` (output occurrences) and ``in_prompt``
    (bool) broadcast together."""
    present = counts > 0
    if is_on(params.repetition_penalty, 1.0):
        r = per_row(params.repetition_penalty, logits)
        logits = torch.where(present | in_prompt, torch.where(logits > 0, logits / r, logits * r), logits)
    if is_on(params.frequency_penalty, 0.0):
        logits = logits - per_row(params.frequency_penalty, logits) * counts.to(logits.dtype)
    if is_on(params.presence_penalty, 0.0):
        logits = logits - per_row(params.presence_penalty, logits) * present.to(logits.dtype)
    return logits


def biased(logits: torch.Tensor, params: SamplingParams | MixedSamplingParams) -> torch.Tensor:
    """``logits`` ``[B, ..., V]`` plus ``params.logit_bias`` (unchanged without one)."""
    if isinstance(params.logit_bias, RowBias):  # each request its own: padding adds 0 to token 0
        index, values = params.logit_bias
        shape = (*logits.shape[:-1], index.shape[1])
        view = (index.shape[0], *([1] * (logits.dim() - 2)), index.shape[1])
        return logits.scatter_add(-1, index.view(view).expand(shape), values.to(logits.dtype).view(view).expand(shape))
    if not params.logit_bias:
        return logits
    tokens, bias = zip(*params.logit_bias)
    index = torch.tensor(tokens, device=logits.device)
    values = torch.tensor(bias, dtype=logits.dtype, device=logits.device)
    return logits.index_add(-1, index, values.expand(*logits.shape[:-1], len(tokens)))


def in_float32(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision (bfloat16, float16) logits as float32, others as they are. The penalties and
    the bias are applied in float32 at least: in bfloat16 a request's ``[B]`` column of settings
    would be rounded (1.3 → 1.296875) where a batch-wide number is not — a request would decode
    differently beside one with other settings — and float16 overflows for strong penalties. The
    sampler works in float32 anyway."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def penalize(logits: torch.Tensor, counts: torch.Tensor, in_prompt: torch.Tensor, params: SamplingParams | MixedSamplingParams) -> torch.Tensor:
    """``logits`` ``[B, ..., V]`` with the logit bias and the penalties of ``params`` applied (a new
    tensor; float32 for half-precision logits: :func:`in_float32`).

    Args:
        counts: output occurrences before each position, ``[B, ..., V]`` or broadcastable to it
            (the committed history's ``[B, 1, V]`` for every verify position; a drafter's
            running counts ``[B, V]`` at its step).
        in_prompt: ``[B, V]`` bool, each request's prompt tokens.
    """
    prompt = in_prompt.view(in_prompt.shape[0], *([1] * (logits.dim() - 2)), in_prompt.shape[1])
    return penalized(biased(in_float32(logits), params), counts, prompt, params)


def counted(counts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``counts`` ``[B, V]`` after one more output token per request ``tokens`` ``[B]`` (a new tensor):
    a drafter's running history from one draft step to the next."""
    return counts.scatter_add(1, tokens.unsqueeze(1), torch.ones_like(counts[:, :1]))


#: what a drafter carries from one draft step to the next: (running counts ``[B, V]``, ``in_prompt``
#: ``[B, V]``), or ``None`` without penalties
DraftPenalty = tuple[torch.Tensor, torch.Tensor] | None


def draft_penalty(history: PenaltyHistory | None) -> DraftPenalty:
    """A drafter's penalty at its first draft (after the anchor): the committed history's, or ``None``."""
    return None if history is None else (history.counts, history.in_prompt)


def penalize_draft(logits: torch.Tensor, params: SamplingParams | MixedSamplingParams, penalty: DraftPenalty) -> torch.Tensor:
    """A draft step's logits ``[B, V]`` biased and penalised as the target's will be at that position
    (unchanged without penalties): the drafter then draws from a distribution closer to the
    target's. Logits ``[B, ..., V]`` of several positions drafted independently all take the same
    penalty. The n-gram bans are not applied here (they read the whole sequence; a banned draft
    has probability 0 under the target and is rejected)."""
    if penalty is None:
        return logits
    counts, in_prompt = penalty
    return penalize(logits, counts.view(counts.shape[0], *([1] * (logits.dim() - 2)), counts.shape[1]), in_prompt, params)


def after_draft(penalty: DraftPenalty, tokens: torch.Tensor) -> DraftPenalty:
    """The penalty of the next draft step, after drafting ``tokens`` ``[B]``."""
    return None if penalty is None else (counted(penalty[0], tokens), penalty[1])
