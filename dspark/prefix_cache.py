"""Prefix reuse per slot: a new request whose prompt starts as the last prompt prefilled into a
free slot prefills only the rest (vLLM's automatic prefix caching, with one prompt per slot).

A slot's rows of the target cache keep the keys and values of the last prompt prefilled into them
until another request takes the slot: the request decoding there writes past its prompt only, and
a finished request's row rides along writing past its length. So when request ``R`` takes a slot
whose last prompt shares its first ``c`` tokens, positions ``[0, c − 1)`` are already there and
``R``'s prefill feeds ``prompt[c − 1:]`` from that offset (the last shared token is fed again:
the distribution after it is needed — to score ``R``'s next prompt token, or to draw its first
token when the slot holds its whole prompt — and a slot keeps no logits). The drafter still gets
the target's hidden states over the whole prompt, as after a full prefill: those of the reused
positions were kept with the slot (:class:`ResidentPrompt`), and so were the prompt's scores when
they were computed. Requests admitted together share their common prefixes the same way, one
request's freshly prefilled rows copied to another's (the engine's admission). A finished
request's output counts too (a conversation's next turn: :meth:`SlotPrefixes.extend`); for a
drafter that reads the target's hidden states, the rounds keep those over the positions they feed
(:class:`HiddenHistory`). Keys, values and hidden states depend only on the tokens up to their
position, so reuse changes nothing but the work.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace

import torch


@dataclass
class ResidentPrompt:
    """The last prompt prefilled into a slot, and what reusing it needs.

    Attributes:
        tokens: the prompt (and what its request generated, when the slot keeps outputs:
            :meth:`SlotPrefixes.extend`).
        hidden: the target's hidden states over it, one ``[P, H]`` per drafter layer.
        scores: its scores when computed: log p(prompt[i + 1] | prompt[:i + 1]) ``[P − 1]``, then
            (``top ≥ 1``) the ``top`` likeliest tokens' log-probabilities and ids ``[P − 1, top]``.
        top: how many likeliest tokens ``scores`` holds (−1: no scores).
    """

    tokens: list[int]
    hidden: list[torch.Tensor]
    scores: list[torch.Tensor] | None
    top: int


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many first tokens ``a`` and ``b`` share (binary search over slice comparisons)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


class SlotPrefixes:
    """What each slot of a batch holds of its last prompt (:class:`ResidentPrompt`, or ``None``),
    and the prompt tokens admitted and reused so far (vLLM's prefix-cache queries and hits)."""

    def __init__(self, slots: int, with_outputs: bool = False):
        self.with_outputs = with_outputs  # a finished request's slot keeps its output too (:meth:`extend`)
        self.resident: list[ResidentPrompt | None] = [None] * slots
        self.kept_at = [-1] * slots  # when each slot's prompt was kept (a count of keeps; −1: never)
        self._keeps = 0
        self.queries = 0  # prompt tokens admitted
        self.hits = 0  # of those, tokens not prefilled (reused from a slot, or from a request of the same prompt)

    def assign(self, prompts: list[list[int]], free: list[int], lowest: bool = False) -> list[int]:
        """A free slot for each prompt, in order: the one whose last prompt shares the most first
        tokens with it; among equals, the one whose prompt is oldest (an empty slot first, then the
        least recently filled; the lowest of those), so that recent prompts stay for longer — or,
        with ``lowest``, the lowest one, and the lowest free slot where no slot holds anything to
        reuse (rounds that run over the slots up to the last busy one stay narrow:
        :attr:`~dspark.engine.EngineConfig.trim_idle_slots`). Slots holding the same
        tokens are compared once (a batch of thousands of copies of one prompt costs one
        comparison per request)."""
        # oldest first, empty slots before all (or lowest first)
        order = sorted(free) if lowest else sorted(free, key=lambda b: (self.kept_at[b], b))
        if all(self.resident[b] is None for b in free):  # (no free slot holds anything: the first admission)
            return order[:len(prompts)]
        groups: dict[tuple, deque] = {}  # the free slots holding each token sequence, oldest first
        for b in order:
            if self.resident[b] is not None:
                groups.setdefault(tuple(self.resident[b].tokens), deque()).append(b)
        by_first: dict[int, list[deque]] = {}  # (a slot shares something with a prompt of its first token)
        for key, slots in groups.items():
            by_first.setdefault(key[0], []).append(slots)
        taken, chosen, oldest = set(), [], iter(order)
        for prompt in prompts:
            best, best_rank = None, None
            for slots in by_first.get(prompt[0], ()):
                while slots and slots[0] in taken:
                    slots.popleft()
                if slots:
                    head = slots[0]
                    rank = (common_prefix(self.resident[head].tokens, prompt), 0 if lowest else -self.kept_at[head], -head)
                    if lowest and rank[0] < 2:  # (nothing to reuse: the lowest free slot serves as well)
                        continue
                    if best_rank is None or rank > best_rank:
                        best, best_rank = head, rank
            if best is None:  # nothing shared: the oldest (or lowest) free slot
                best = next(b for b in oldest if b not in taken)
            taken.add(best)
            chosen.append(best)
        return chosen

    def shared(self, slot: int, prompt: list[int]) -> int:
        resident = self.resident[slot]
        return 0 if resident is None else common_prefix(resident.tokens, prompt)

    def reusable(self, slot: int, prompt: list[int], top: int) -> int:
        """How many first positions of ``prompt`` a prefill into ``slot`` may skip: all the shared
        tokens but the last (fed again for its output), none when the request asks for its
        prompt's ``top`` likeliest tokens (``top ≥ 0``) and the slot kept fewer."""
        resident = self.resident[slot]
        if resident is None or (top >= 0 and resident.top < top):
            return 0
        shared = self.shared(slot, prompt)
        if resident.hidden:  # (kept over the prompt alone: its reused positions' hidden states)
            shared = min(shared, resident.hidden[0].shape[0] + 1)
        if top >= 0:  # (its scores: the prompt's alone)
            shared = min(shared, resident.scores[0].shape[0] + 1)
        return max(shared - 1, 0)

    def extend(self, slot: int, tokens: list[int], hidden: list[torch.Tensor] | None = None) -> None:
        """The request in ``slot`` ended with ``tokens`` (its prompt, then what it generated) in its
        cache rows: with :attr:`with_outputs`, a next prompt that goes on from them (a
        conversation's next turn) reuses them too. A slot that keeps hidden states for the drafter
        needs them over the generated positions as well: ``hidden``, the slot's rows of the
        rounds' :class:`HiddenHistory` (``[≥ len(tokens), H]`` per layer; without them the slot
        keeps its prompt alone)."""
        resident = self.resident[slot]
        if not (self.with_outputs and resident is not None and tokens[:len(resident.tokens)] == resident.tokens):
            return
        if resident.hidden:
            if hidden is None:
                return
            kept = resident.hidden[0].shape[0]  # (the prompt's, from its prefill)
            resident.hidden = [torch.cat([mine[:kept], rows[kept:len(tokens)]]) for mine, rows in zip(resident.hidden, hidden)]
        resident.tokens = list(tokens)

    def copy(self, source: int, target: int) -> None:
        """``target`` now holds what ``source`` does (its cache rows were copied)."""
        resident = self.resident[source]
        self.resident[target] = None if resident is None else replace(resident, tokens=list(resident.tokens))
        self.kept_at[target] = self.kept_at[source]

    def keep(self, slot: int, prompt: list[int], hidden: list[torch.Tensor], scores: list[torch.Tensor] | None,
             top: int) -> None:
        """``slot`` now holds ``prompt`` (:class:`ResidentPrompt`'s fields)."""
        self.resident[slot] = ResidentPrompt(list(prompt), hidden, scores, top)
        self.kept_at[slot], self._keeps = self._keeps, self._keeps + 1

    def keep_admitted(self, slots: list[int], prompts: list[list[int]], hidden_states: list[torch.Tensor],
                      scores: list[torch.Tensor] | None, tops: list[int]) -> None:
        """After an admission: each of ``slots`` holds its prompt, with the prefill's hidden states
        over it (``[k, P, H]`` per layer) and its scores (the prefill's, put back at
        the prompts' positions: ``[k, P − 1]``, ``[k, P − 1, K]`` ×2) as far as they are valid
        (``tops``: :func:`valid_scores` per slot)."""
        for k, (slot, prompt, top) in enumerate(zip(slots, prompts, tops)):
            n = len(prompt)
            kept = None if top < 0 else [x[k, :n - 1, :top].clone() if x.dim() > 2 else x[k, :n - 1].clone()
                                         for x in scores[:3 if top > 0 else 1]]
            self.keep(slot, prompt, [h[k, :n].clone() for h in hidden_states], kept, top)


class HiddenHistory:
    """The target's hidden states at the positions the rounds feed, per slot (the drafter's layers):
    what a slot keeps over its request's output, for a next prompt that goes on from it
    (:meth:`SlotPrefixes.extend`). Written like the cache — every column a round feeds, from where
    the row's cache stood; those past what it kept are overwritten by later rounds or never read.

    Args:
        slots: the batch's slots (rows). width: positions per row (the cache's, plus a round's
            width: a round writes all its columns).
    """

    def __init__(self, slots: int, width: int):
        self.slots, self.width = slots, width
        self.layers: list[torch.Tensor] = []  # [slots, width, H] per layer (made on the first write)

    def write(self, begin: torch.Tensor, hidden_states: list[torch.Tensor]) -> None:
        """A round over the first ``B`` slots fed positions ``begin[b] + j`` ``[B]``; their hidden
        states ``[B, W, H]`` per layer (``W`` ≤ ``width``)."""
        if not self.layers:
            self.layers = [h.new_zeros(self.slots, self.width, h.shape[-1]) for h in hidden_states]
        rows, width = begin.shape[0], hidden_states[0].shape[1]
        index = begin.unsqueeze(1) + torch.arange(width, device=begin.device)  # [B, W]
        row = torch.arange(rows, device=begin.device).unsqueeze(1).expand(rows, width)
        for layer, h in zip(self.layers, hidden_states):
            layer.index_put_((row, index), h)

    def rows(self, slot: int) -> list[torch.Tensor] | None:
        """``slot``'s positions ``[width, H]`` per layer (views; ``None`` before any round)."""
        return [layer[slot] for layer in self.layers] or None


def valid_scores(start: int, resident: ResidentPrompt | None, computed: int) -> int:
    """How many likeliest tokens of a row's prompt scores are valid after a prefill from ``start``
    that scored ``computed`` of them (−1: no scores; 0: the chosen token's alone): all for a row
    prefilled whole; for a reused prefix no more than it had kept — none if it had kept no scores
    (a request that asked for none, beside one that asked, reuses a prefix whatever it kept)."""
    if not start:
        return computed
    return -1 if resident.scores is None else min(resident.top, computed)


def with_prefixes(relative: torch.Tensor, prefixes: list[torch.Tensor | None], starts: list[int], counts: list[int],
                  total: int) -> torch.Tensor:
    """Rows of a prefill over prompt suffixes put back at their prompts' positions: row ``j`` is
    ``prefixes[j][:starts[j]]`` then ``relative[j, :counts[j]]`` (``relative`` ``[k, W, ...]``), in a
    ``[k, total, ...]`` tensor (zeros past each row's end). A prefix's trailing dimension may be
    narrower than ``relative``'s (fewer likeliest tokens kept): it fills what it has."""
    out = relative.new_zeros(relative.shape[0], total, *relative.shape[2:])
    for j, (prefix, start, count) in enumerate(zip(prefixes, starts, counts)):
        if start and prefix is not None:  # (no prefix: a row whose scores nobody reads)
            part = prefix[:start]
            if relative.dim() > 2:  # (the likeliest tokens: a slot may have kept more, or fewer, than computed now)
                width = min(part.shape[-1], relative.shape[-1])
                out[j, :start, :width] = part[:, :width]
            else:
                out[j, :start] = part
        out[j, start:start + count] = relative[j, :count]
    return out
