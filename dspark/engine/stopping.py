"""What happens to a round's emitted tokens: :class:`Stopper` appends them and ends requests at a
stop token or their budget (holding stop tokens back through ``min_new_tokens``, recording
log-probabilities); :class:`TokenStream` hands them to streaming callbacks and stop-string checks,
read with the round's one status read."""

from __future__ import annotations

from typing import Callable

import torch

from dspark import kernels
from dspark.records import DecodingState


class TokenStream:
    """The tokens each request emitted since the last status read, read with it (its last
    ``width`` tokens and its length; a round emits at most γ + 1): handed to ``on_tokens`` and
    checked by ``stop_check``, which may end the request after one of them (see :meth:`emit`)."""

    def __init__(self, batch: int, width: int, on_tokens: Callable[[int, list[int]], None] | None,
                 stop_check: Callable[[int, list[int]], int | None] | None):
        self.on_tokens, self.stop_check, self.width = on_tokens, stop_check, width
        self.sent = [0] * batch  # tokens of each slot's request already handed over (prompt included)
        self.request = [-1] * batch  # the request each slot holds (its index in the call)
        self.stopped: set[int] = set()  # requests a stop check ended

    def admit(self, slots: list[int], requests: list[int], prompt_lengths: list[int]) -> None:
        """Requests took these slots: nothing of theirs handed over yet but the prompt."""
        for b, i, length in zip(slots, requests, prompt_lengths):
            self.sent[b], self.request[b] = length, i

    def size(self, batch: int) -> int:
        return batch * (1 + self.width)

    def window(self, state: DecodingState) -> torch.Tensor:
        """``[B · (1 + width)]``: each request's length, then its last ``width`` tokens."""
        start = state.lengths.unsqueeze(1) - self.width
        positions = (start + torch.arange(self.width, device=start.device)).clamp(min=0)
        return torch.cat([state.lengths.unsqueeze(1), state.tokens.gather(1, positions)], 1).flatten()

    def emit(self, values: list[int]) -> list[tuple[int, int, int]]:
        """Hand over the new tokens in ``values`` (the host copy of :meth:`window`); return
        ``(slot, length, dropped)`` for each request a stop check ended: its new length and how
        many emitted tokens past the stop it loses."""
        row, ended = 1 + self.width, []
        for b in range(len(self.sent)):
            length, last = values[b * row], values[b * row + 1: (b + 1) * row]
            new = length - self.sent[b]
            if new > self.width:  # cannot happen: a round emits at most γ + 1 tokens per request
                raise RuntimeError(f"request {b} emitted {new} tokens in one round, more than {self.width}")
            request = self.request[b]
            if new <= 0 or request < 0:  # (an empty slot)
                continue
            ids = last[self.width - new:]
            kept = None if self.stop_check is None else self.stop_check(request, ids)
            if kept is not None:
                self.stopped.add(request)
                ids = ids[:kept]
                ended.append((b, self.sent[b] + kept, new - kept))
            self.sent[b] += len(ids)
            if self.on_tokens is not None:
                self.on_tokens(request, ids)
        return ended


class Stopper:
    """Appends emitted tokens to the state and marks requests done at a stop id or the token budget;
    keeps each request's stop ids out of its first ``min_new_tokens`` tokens. Per slot of the
    batch, set by :meth:`admit` as requests take the slots.

    Args:
        batch: slots. logprobs, top: the buffers the log-probabilities go to (``None``: not asked for).
    """

    def __init__(self, batch: int, vocab_size: int, device, logprobs: torch.Tensor | None = None,
                 top: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.eos = torch.full((batch, 0), -1, dtype=torch.long, device=device)  # [B, E], −1 padding
        # [B] budgets; an empty slot's never binds (it is done, and its commits add nothing)
        self.max_new_tokens = torch.full((batch,), 2**40, dtype=torch.long, device=device)
        self.logprobs, self.top = logprobs, top
        self.vocab_size = vocab_size
        self.min_new = [0] * batch  # (host)
        self.longest_hold = 0  # (host int)
        self.calls = 0  # target distributions suppressed since the last admission (host int)
        self.min_new_tokens = self.stop_vocab = None  # [B], [B, V]: once a request holds stop ids back
        self.wants = [-1] * batch  # (host) each slot's request's log-probabilities: −1 none, k ≥ 0: k likeliest
        self.mass = torch.zeros(1, device=device)  # 0, or NaN once a distribution without mass was drawn from
        self.ended_without_mass: list[tuple[int, int]] = []  # (slot, length): the last status read's (host)
        self._checked: list[tuple] = []  # check_mass's [B, K] maxima and [B] lengths since the last status read
        self._columns = torch.arange(64, device=device)  # (position indices, sliced; grown for wider rounds)

    def admit(self, rows: torch.Tensor, slots: list[int], requests: list) -> None:
        """New requests (:class:`Request`) in ``slots`` (``rows`` on the device): their stop ids,
        budgets and ``min_new_tokens``."""
        device, batch = rows.device, self.eos.shape[0]
        width = max(self.eos.shape[1], *(len(r.stop_ids) for r in requests))
        if width > self.eos.shape[1]:  # a request with more stop ids than any before: widen
            self.eos = torch.cat([self.eos, self.eos.new_full((batch, width - self.eos.shape[1]), -1)], 1)
        eos = torch.tensor([list(r.stop_ids) + [-1] * (width - len(r.stop_ids)) for r in requests], dtype=torch.long,
                           device=device).view(len(requests), width)
        self.eos[rows] = eos
        self.max_new_tokens[rows] = torch.tensor([r.budget for r in requests], dtype=torch.long, device=device)
        for b, request in zip(slots, requests):
            self.min_new[b] = request.min_new if request.stop_ids else 0
            self.wants[b] = -1 if request.logprobs is None else request.logprobs
        if self.stop_vocab is None and any(self.min_new):
            self.min_new_tokens = torch.zeros(batch, dtype=torch.long, device=device)
            self.stop_vocab = torch.zeros(batch, self.vocab_size, dtype=torch.bool, device=device)
        if self.stop_vocab is not None:
            self.min_new_tokens[rows] = torch.tensor([self.min_new[b] for b in slots], dtype=torch.long, device=device)
            spare = torch.where(eos >= 0, eos, self.vocab_size)  # padding → a spare column
            self.stop_vocab[rows] = torch.zeros(len(slots), self.vocab_size + 1, dtype=torch.bool, device=device).scatter_(
                1, spare, True)[:, :self.vocab_size]
            self.calls, self.longest_hold = 0, max(self.min_new)

    def release(self, slots: list[int]) -> None:
        """The requests in ``slots`` were collected: nothing of theirs to record any more."""
        for b in slots:
            self.wants[b] = -1

    def suppress(self, logits: torch.Tensor, state: DecodingState) -> torch.Tensor:
        """The target's logits ``[B, K, V]`` for positions 0..K−1 after each request's last token, with
        its stop ids at −∞ where they would be among its first ``min_new_tokens`` generated
        tokens. Verification then samples from (and accepts drafts by) this distribution, so
        suppressing stays exact. A request has ≥ n − 1 tokens before the n-th call since it was
        admitted (one per call at least): once ``calls ≥`` the largest ``min_new_tokens`` of the
        batch nothing is left to suppress, and the logits pass. (``state``: the first ``B`` slots.)"""
        if self.calls >= self.longest_hold:
            return logits
        self.calls += 1
        rows = state.batch_size
        generated = state.lengths - state.prompt_lengths  # [B]: tokens before position 0's
        early = (generated.unsqueeze(1) + torch.arange(logits.shape[1], device=logits.device)
                 < self.min_new_tokens[:rows].unsqueeze(1))
        return logits.masked_fill(early.unsqueeze(-1) & self.stop_vocab[:rows].unsqueeze(1), float("-inf"))

    def check_mass(self, logits: torch.Tensor, tokens: torch.Tensor, num_emitted: torch.Tensor,
                   lengths: torch.Tensor) -> torch.Tensor:
        """Watch for a request drawing a token from a distribution without mass: its processed logits
        ``[B, ≥K, V]`` at one of its first ``num_emitted[b]`` positions hold a NaN or an infinity, or
        are all −∞ (a grammar's dead end, every token banned, a model whose numbers overflowed:
        greedy would take token 0 there, sampling index ``V``, past the vocabulary). :attr:`mass`
        ``[1]`` turns NaN then; the engine reads it with its status read and ends those requests
        before that position (:meth:`without_mass`). ``lengths`` ``[B]``: the requests' lengths
        before these tokens. Returns ``tokens`` ``[B, K]`` clamped into the vocabulary (in place),
        so nothing in the rest of the round indexes out of range (on CUDA: a device assert) before
        that read. Few torch calls: at batch 1 on a CPU each costs more than its arithmetic."""
        width = tokens.shape[1]
        if width > self._columns.numel():  # (a host-side shape: no sync)
            self._columns = torch.arange(width, device=tokens.device)
        top = logits[:, :width].amax(-1)  # [B, K]: NaN if any is; −∞ if all are; +∞ if any is
        top.masked_fill_(self._columns[:width] >= num_emitted.unsqueeze(1), 0.0)  # (positions not drawn from)
        self.mass += (top - top).sum()  # x − x: 0 if finite, else NaN
        self._checked.append((top, lengths.clone()))
        return tokens.clamp_(max=logits.shape[-1] - 1)

    def without_mass(self) -> list[tuple[int, int]]:
        """After a status read showed :attr:`mass` NaN: ``(slot, length)`` for each request that drew
        from a distribution without mass since the read before, the length it had before that
        token (what it keeps). Resets the watch."""
        cuts: dict[int, int] = {}
        for top, before in self._checked:
            bad = (top - top).isnan()  # [B, K]
            first = bad.long().argmax(1)  # (the first bad position of each row)
            for b in bad.any(1).nonzero().flatten().tolist():
                cuts.setdefault(b, int(before[b] + first[b]))
        self.watched()
        self.mass.zero_()
        return sorted(cuts.items())

    def watched(self) -> None:
        """A status read showed every distribution drawn from had mass: forget what was checked."""
        self._checked = []

    def append(self, state: DecodingState, emitted: torch.Tensor, num_emitted: torch.Tensor,
               logits: torch.Tensor) -> torch.Tensor:
        """Append ``emitted`` ``[B, K]``, of which the first ``num_emitted[b]`` are real; return how many
        were kept ``[B]`` (fewer after an EOS or when the budget runs out). One kernel for the batch.
        With :attr:`logprobs` (a ``[B, S]`` buffer beside ``state.tokens``), also record each
        token's log-probability under the target's ``logits`` ``[B, ≥K, V]`` it was drawn after, and
        with :attr:`top` (``[B, S, k]`` values and token ids) the ``k`` likeliest there; as with the
        tokens, what lands past a request's new length is never read (and is overwritten). Only
        while a request that asks for them holds a slot (:attr:`wants`), and as many likeliest
        tokens as the most any of them asks for: the others pay nothing. (``state``: the first
        ``B`` slots.)"""
        rows = state.batch_size
        kept = kernels.commit_tokens(state.tokens, state.lengths, state.prompt_lengths, state.done, emitted,
                                     num_emitted, self.eos[:rows], self.max_new_tokens[:rows])
        want = max(self.wants[:rows])
        if self.logprobs is not None and want >= 0:
            width = emitted.shape[1]
            distributions = torch.log_softmax(logits[:, :width].float(), -1)  # [B, K, V]
            start = state.lengths - kept  # where this call's tokens went
            positions = start.unsqueeze(1) + torch.arange(width, device=kept.device)  # [B, K]; γ + 1 spare columns
            self.logprobs[:rows].scatter_(1, positions, distributions.gather(-1, emitted.unsqueeze(-1)).squeeze(-1))
            if self.top is not None and want > 0:
                values, ids = distributions.topk(want, -1)  # [B, K, k], likeliest first
                index = positions.unsqueeze(-1).expand_as(ids)
                self.top[0][:rows, :, :want].scatter_(1, index, values)
                self.top[1][:rows, :, :want].scatter_(1, index, ids)
        return kept
