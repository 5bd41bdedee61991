"""Structured outputs: a request's output constrained by a grammar — a JSON schema, any JSON, a
regular expression, a list of choices or an EBNF grammar (vLLM's and SGLang's structured outputs,
through the same library, `xgrammar <https://github.com/mlc-ai/xgrammar>`_).

A grammar turns the target's distribution at each position into the *constrained* one: tokens
that cannot continue a string of the grammar get probability 0 (their logits −∞, after the
penalties and before the sampler's processing), and EOS is allowed exactly where the output is a
complete string. Speculative decoding stays lossless with respect to that distribution: the mask
at verify position ``j`` is the grammar's after the committed tokens *and the drafts* ``x_1..x_j``
(the drafts are walked through the grammar, then rolled back), so the target scores each draft as
constrained decoding would after the same prefix. A draft the grammar forbids has probability 0
and is rejected; the positions after it are never used.

Drafters that draft left to right through :meth:`~dspark.drafters.Drafter.draw` are *guided*
too (:class:`DraftGuide`, ``engine.guide_drafts``): before each draft step their logits are masked
with the same grammar state after the drafts so far, so they propose what the constrained target
can accept, and their ``q`` is the masked distribution they drew from (any proposal distribution
keeps verification exact). The masks they fill are the verify positions' masks, reused.

Objects:

* :class:`Grammar` — what a request asks for (a frozen spec: kind and text), from
  :meth:`Grammar.json_schema`, :meth:`Grammar.json`, :meth:`Grammar.regex`, :meth:`Grammar.choice`,
  :meth:`Grammar.ebnf`;
* :class:`GrammarCompiler` — compiles specs for one vocabulary (a tokenizer's, or a list of token
  strings), cached;
* :class:`GrammarRows` — a batch's matchers, one per slot, and the masks of a round (:class:`RoundMasks`);
* :class:`DraftGuide` — a round's grammars over a drafter's own draft steps.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from dataclasses import dataclass, replace

import numpy as np
import torch

KINDS = ("json_schema", "json", "regex", "choice", "ebnf")


def _xgrammar():
    try:
        import xgrammar
    except ImportError as err:  # (an optional dependency: pip install "dspark[structured]")
        raise ImportError("structured outputs need the xgrammar package: pip install xgrammar "
                          "(or the project's structured extra)") from err
    return xgrammar


@dataclass(frozen=True)
class Grammar:
    """A constraint on a request's output (compile it with :class:`GrammarCompiler`).

    Attributes:
        kind: one of :data:`KINDS`.
        text: the JSON schema (JSON text), the regular expression, the choices (a JSON list of
            strings) or the EBNF grammar; empty for ``json`` (any JSON value: xgrammar's built-in
            JSON grammar, what vLLM gives OpenAI's ``json_object``).
        any_whitespace: ``json_schema``: any whitespace between tokens of the JSON (``False``: one
            space after ``:`` and ``,``, none elsewhere — vLLM's ``disable_any_whitespace``; a
            small model may otherwise fill its budget with newlines).
    """

    kind: str
    text: str = ""
    any_whitespace: bool = True

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown grammar kind {self.kind!r}; allowed: {', '.join(KINDS)}")
        if not isinstance(self.text, str):
            raise TypeError(f"a grammar's text is a str, got {type(self.text).__name__}")

    @classmethod
    def json_schema(cls, schema: dict | str, *, any_whitespace: bool = True) -> "Grammar":
        """Output that is JSON valid under ``schema`` (a dict, or its JSON text)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as err:
                raise ValueError(f"the JSON schema is not valid JSON: {err}") from err
        if not isinstance(schema, (dict, bool)):
            raise ValueError(f"a JSON schema is an object (or true/false), got {type(schema).__name__}")
        return cls("json_schema", json.dumps(schema), bool(any_whitespace))

    @classmethod
    def json(cls) -> "Grammar":
        """Any JSON value (OpenAI's ``response_format: {"type": "json_object"}``, as vLLM serves it)."""
        return cls("json")

    @classmethod
    def regex(cls, pattern: str) -> "Grammar":
        """Output that matches ``pattern`` whole."""
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"a regex grammar needs a non-empty pattern, got {pattern!r}")
        return cls("regex", pattern)

    @classmethod
    def choice(cls, options: list[str]) -> "Grammar":
        """Output that is exactly one of ``options`` (vLLM's ``guided_choice``)."""
        if (not isinstance(options, (list, tuple)) or not options
                or not all(isinstance(o, str) and o for o in options)):
            raise ValueError(f"choices are a non-empty list of non-empty strings, got {options!r}")
        if any("\0" in o for o in options):  # (xgrammar's strings end at a NUL)
            raise ValueError(f"a choice cannot contain a NUL character, got {options!r}")
        return cls("choice", json.dumps(list(options)))

    @classmethod
    def ebnf(cls, grammar: str) -> "Grammar":
        """Output derived from the rule ``root`` of an EBNF (GBNF) grammar."""
        if not isinstance(grammar, str) or "root" not in grammar:
            raise ValueError("an EBNF grammar is a str that defines the rule root ::= ...")
        return cls("ebnf", grammar)


#: compiled grammars a :class:`GrammarCompiler` keeps (least recently used dropped first): a
#: server with a schema per request must not grow without bound (one compiled grammar over a
#: 130k-token vocabulary holds about 0.3 MB)
GRAMMAR_CACHE_SIZE = 256


class GrammarCompiler:
    """Compiles :class:`Grammar` specs for one vocabulary; each spec once while it is among the
    last :data:`GRAMMAR_CACHE_SIZE` used (cached).

    Args:
        tokenizer: a ``transformers`` tokenizer (its vocabulary, decoded as the model emits it), or
        vocabulary: the token strings themselves, ``vocabulary[i]`` token ``i``'s text (models
            without a tokenizer; tests).
        vocab_size: the model's vocabulary (its logits' width; may exceed the tokenizer's).
        stop_token_ids: the tokens that end a request (EOS): allowed where the output is complete.
    """

    def __init__(self, *, tokenizer=None, vocabulary: list[str] | None = None, vocab_size: int,
                 stop_token_ids: list[int]):
        if (tokenizer is None) == (vocabulary is None):
            raise ValueError("give a tokenizer or a vocabulary (a list of token strings), one of them")
        if not stop_token_ids:
            raise ValueError("structured outputs need an EOS token (a grammar ends its request at EOS once the output "
                             "is complete); the model and tokenizer define none")
        xgr = _xgrammar()
        self.vocab_size, self.stop_token_ids = vocab_size, list(stop_token_ids)
        if tokenizer is not None:
            info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=self.stop_token_ids)
        else:
            if len(vocabulary) > vocab_size:
                raise ValueError(f"the vocabulary has {len(vocabulary)} tokens, more than the model's {vocab_size}")
            info = xgr.TokenizerInfo(list(vocabulary), xgr.VocabType.RAW, vocab_size=vocab_size,
                                     stop_token_ids=self.stop_token_ids)
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)  # (this class caches)
        self._compiled: OrderedDict[Grammar, object] = OrderedDict()

    def compile(self, grammar: Grammar):
        """``grammar`` compiled (an ``xgrammar.CompiledGrammar``); ``ValueError`` naming the problem
        when the spec is not a valid one of its kind."""
        if not isinstance(grammar, Grammar):
            raise TypeError(f"a grammar is a dspark.structured.Grammar (Grammar.json_schema(...), .regex(...), "
                            f".choice([...]), .json(), .ebnf(...)), got {type(grammar).__name__}")
        compiled = self._compiled.get(grammar)
        if compiled is not None:
            self._compiled.move_to_end(grammar)
        else:
            compiler = self._compiler
            try:
                if grammar.kind == "json_schema":
                    compiled = compiler.compile_json_schema(grammar.text, any_whitespace=grammar.any_whitespace)
                elif grammar.kind == "json":
                    compiled = compiler.compile_builtin_json_grammar()
                elif grammar.kind == "regex":
                    compiled = compiler.compile_regex(grammar.text)
                elif grammar.kind == "choice":
                    compiled = compiler.compile_grammar(_choice_ebnf(json.loads(grammar.text)))
                else:
                    compiled = compiler.compile_grammar(grammar.text)
            except (RuntimeError, ValueError) as err:  # (xgrammar's parse errors)
                first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
                first = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", first)  # (xgrammar's time and source line)
                raise ValueError(f"the {grammar.kind} grammar does not compile: {first}") from err
            self._compiled[grammar] = compiled
            if len(self._compiled) > GRAMMAR_CACHE_SIZE:
                self._compiled.popitem(last=False)
        return compiled


def _choice_ebnf(options: list[str]) -> str:
    """An EBNF grammar whose strings are exactly ``options``."""
    return "root ::= " + " | ".join(_ebnf_literal(o) for o in options)


def _ebnf_literal(text: str) -> str:
    """``text`` as an EBNF string literal: ``\\`` and ``"`` escaped, control characters as
    ``\\uNNNN`` (a raw newline ends the literal; xgrammar's ``\\x`` takes any number of digits),
    everything else as is."""
    return '"' + "".join("\\" + c if c in '\\"' else f"\\u{ord(c):04x}" if c < " " else c
                         for c in text) + '"'


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """xgrammar's token bitmask ``[..., ⌈V/32⌉]`` int32 (bit ``v % 32`` of word ``v // 32``: token
    ``v`` allowed) → ``[..., V]`` bool, on the bitmask's device."""
    if bitmask.device.type == "cpu":  # (NumPy's unpackbits: a few µs where torch's ops take tens)
        return unpack_words(bitmask.numpy(), vocab_size)
    return _unpack_with_torch(bitmask, vocab_size)


def _unpack_with_torch(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """:func:`unpack_bitmask` by tensor ops, on any device."""
    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = (bitmask.unsqueeze(-1) >> bits) & 1  # (an arithmetic shift of a negative word keeps bit v)
    return allowed.flatten(-2)[..., :vocab_size].bool()


def unpack_words(words: np.ndarray, vocab_size: int) -> torch.Tensor:
    """:func:`unpack_bitmask` of a bitmask's words as a NumPy array (on the host) → a CPU tensor."""
    words = np.ascontiguousarray(words, dtype=np.int32)  # (little-endian words: byte i holds bits 8i..8i+7)
    bits = np.unpackbits(words.view(np.uint8), axis=-1, bitorder="little")[..., :vocab_size]
    return torch.from_numpy(bits.view(np.bool_))


@dataclass
class RoundMasks:
    """A round's grammars over the constrained rows (``k`` of them, in the order asked), verify width ``W``.

    Attributes:
        allowed: ``[k, W, V]`` bool, the tokens allowed at each verify position.
        forced: ``[k, W − 1]`` the tokens drafted where the grammar allows one alone (−1: the
            drafter's draft stays); ``None`` when none was.
        verify: ``[k]`` the rows' drafts to verify (forced drafts may verify past the scheduler's
            choice; ``cut`` stops a row before a draft its grammar forbids); ``None`` when nothing
            was forced or cut.
        dictated: ``[k]`` the position of each row's first verified draft the grammar dictated
            (allowed alone there, drafted by the drafter or forced; ``W − 1`` where none was):
            the drafts before it are the drafter's own choices. ``None`` when no row has one.
    """

    allowed: torch.Tensor
    forced: torch.Tensor | None
    verify: torch.Tensor | None
    dictated: torch.Tensor | None
    #: the largest entry of ``verify`` (read on the host), ``None`` with it
    widest: int | None = None


class GrammarRows:
    """The matchers of a batch's constrained requests, one per slot (``None``: unconstrained), and
    how many of its generated tokens each has taken (``taken``): a matcher follows its request a
    round behind, taking the tokens the last round committed when the next one asks for masks.

    Args:
        slots: the batch's slots. vocab_size: the logits' width. lookahead: a round's widest
            verify (γ + 1 positions).
    """

    def __init__(self, slots: int, vocab_size: int, lookahead: int):
        self.vocab_size, self.lookahead = vocab_size, lookahead
        self.matchers: list = [None] * slots
        self.taken = [0] * slots
        self.prompt_lengths = [0] * slots
        self._batch = _xgrammar().BatchGrammarMatcher(max_threads="auto")  # (fills masks in threads)

    def admit(self, slot: int, compiled, prompt_length: int) -> None:
        """``slot`` now holds a request constrained by ``compiled`` (or none: ``None``)."""
        if compiled is None:
            self.matchers[slot] = None
            return
        xgr = _xgrammar()
        self.matchers[slot] = xgr.GrammarMatcher(compiled)  # (rollbacks: unlimited)
        self.taken[slot], self.prompt_lengths[slot] = 0, prompt_length

    def release(self, slot: int) -> None:
        """``slot``'s request ended: its matcher goes."""
        self.matchers[slot] = None

    def constrained(self, slots: list[int]) -> list[int]:
        """Those of ``slots`` whose requests are constrained."""
        return [b for b in slots if self.matchers[b] is not None]

    def first_masks(self, slots: list[int]) -> torch.Tensor:
        """The allowed first tokens of the constrained requests just admitted in ``slots`` ``[k, V]`` bool."""
        bitmask = _xgrammar().allocate_token_bitmask(len(slots), self.vocab_size)
        self._batch.batch_fill_next_token_bitmask([self.matchers[b] for b in slots], bitmask)
        return unpack_bitmask(bitmask, self.vocab_size)

    def _take(self, slot: int, length: int, window: list[int]) -> None:
        """``slot``'s matcher takes its request's committed tokens it has not taken yet: those of
        ``window`` (its tokens from the first one not taken) up to the request's ``length``."""
        new = window[: length - self.prompt_lengths[slot] - self.taken[slot]]  # (a round's at most: γ + 1)
        for token in new:
            if not self.matchers[slot].accept_token(token):
                raise RuntimeError(f"slot {slot}: a committed token {token} breaks its grammar (a mask was not applied)")
        self.taken[slot] += len(new)

    def _window(self, state, slots: list[int]) -> torch.Tensor:
        """``[k, lookahead + 1]`` each of ``slots``' tokens from the first its matcher has not taken."""
        device = state.tokens.device
        starts = torch.tensor([self.prompt_lengths[b] + self.taken[b] for b in slots], device=device)
        return state.tokens[torch.tensor(slots, device=device)].gather(
            1, (starts.unsqueeze(1) + torch.arange(self.lookahead + 1, device=device)).clamp(max=state.tokens.shape[1] - 1))

    def guide(self, state, slots: list[int]) -> "DraftGuide":
        """A :class:`DraftGuide` for a round's drafting over the constrained rows ``slots`` of
        ``state``, their matchers first taking the tokens the last round committed (one host read)."""
        rows = torch.tensor(slots, device=state.tokens.device)
        read = torch.cat([state.lengths[rows].unsqueeze(1), self._window(state, slots)], 1).tolist()
        for b, row in zip(slots, read):
            self._take(b, row[0], row[1:])
        return DraftGuide(self, slots, state.batch_size, state.tokens.device)

    def round_masks(self, state, drafts: torch.Tensor, num_verify: torch.Tensor, slots: list[int],
                    force: bool = False, guide: "DraftGuide | None" = None, cut: bool = False) -> "RoundMasks":
        """The allowed tokens at each verify position of the constrained requests in ``slots``
        (rows of the round's ``state``): position ``j`` after their committed tokens and the drafts
        ``x_1..x_j`` ``[k, W, V]`` bool, ``W = drafts.shape[1] + 1``. One host read: the tokens
        committed since the matchers last took some, the lengths, the drafts and how many of them
        are verified. Positions past a draft the grammar forbids (it is rejected there, whatever
        the sampler draws), or past the end of a complete output, allow every token: never read.

        With ``force``, where the grammar allows one token alone, that token is the draft (it has
        probability 1 under the constrained target: accepted whatever the drafter proposed) — in
        place of a verified draft, and past them while the grammar keeps allowing one token alone
        (up to the round's width: those are verified too).

        ``guide``: the :class:`DraftGuide` the drafts were drawn under (same ``slots``, rolled
        back): its masks are taken where they lie along the walked drafts, not filled again.

        With ``cut``, a row verifies its drafts only up to the first one its grammar forbids
        (``verify``). That draft would be rejected whatever the sampler draws; for *deterministic*
        drafts (``q`` one-hot) its recovered token is drawn from the constrained target's own
        distribution, as the bonus token that takes its place is, so cutting is exact there. For
        sampled drafts it is not (whether the cut happens depends on the draw): never cut them."""
        if guide is not None and guide.slots != slots:
            raise ValueError(f"the guide was made for rows {guide.slots}, the round's constrained rows are {slots}")
        xgr = _xgrammar()
        device, width = drafts.device, drafts.shape[1] + 1
        rows = torch.tensor(slots, device=device)
        read = torch.cat([state.lengths[rows].unsqueeze(1), num_verify[rows].unsqueeze(1), self._window(state, slots),
                          drafts[rows]], 1).tolist()
        bitmask = xgr.allocate_token_bitmask(len(slots) * width, self.vocab_size)  # (all allowed)
        words = bitmask.numpy()  # (the same memory, read on the host)
        forced, verify = [[-1] * (width - 1) for _ in slots], [row[1] for row in read]
        dictated = [width - 1] * len(slots)
        matchers = [self.matchers[b] for b in slots]
        for b, row in zip(slots, read):  # the tokens the last round committed, for good
            self._take(b, row[0], row[2:])
        # position by position, every row at once (the masks filled in xgrammar's threads): the mask
        # at j, then the draft x_{j+1} (or the token the grammar allows alone) taken, until a row's
        # last verified draft, a draft its grammar forbids, or its output's end
        walked, limits = [0] * len(slots), [width - 1 if force else row[1] for row in read]
        was_cut = False
        live = list(range(len(slots)))
        along = [guide is not None] * len(slots)  # (the walk still follows the drafts the guide took)
        for j in range(width):
            live = [k for k in live if not matchers[k].is_terminated()]
            if not live:
                break
            known = [k for k in live if along[k] and j < guide.filled[k]]
            if known:
                words[[k * width + j for k in known]] = guide.words[[k * guide.width + j for k in known]]
            self._fill([matchers[k] for k in live if k not in known], bitmask,
                       [k * width + j for k in live if k not in known])
            live = [k for k in live if j < limits[k]]
            if not live:
                break
            going, tokens = [], []
            for k, single in zip(live, self._only_tokens(words[[k * width + j for k in live]])):
                if j < read[k][1]:
                    token = read[k][3 + self.lookahead + j]
                    if single is not None:
                        dictated[k] = min(dictated[k], j)
                        if force and single != token:
                            forced[k][j] = token = single
                elif single is None:  # (past the drafter's drafts: only a forced token goes on)
                    continue
                else:
                    forced[k][j], token, verify[k] = single, single, j + 1
                along[k] = along[k] and j < len(guide.taken[k]) and guide.taken[k][j] == token
                going.append(k)
                tokens.append(token)
            accepted = xgr.BatchGrammarMatcher.batch_accept_token([matchers[k] for k in going], tokens)
            live = []
            for k, ok in zip(going, accepted):
                if ok:
                    live.append(k)
                elif cut:  # (a refused token is a verified draft of the drafter's: forced ones are allowed)
                    verify[k], was_cut = j, True
            for k in live:
                walked[k] += 1
        back = [k for k in range(len(slots)) if walked[k]]
        if back:
            xgr.BatchGrammarMatcher.batch_rollback([matchers[k] for k in back], [walked[k] for k in back])
        masks = unpack_bitmask(bitmask.to(device), self.vocab_size).view(len(slots), width, self.vocab_size)
        was_forced = any(t >= 0 for row in forced for t in row)
        return RoundMasks(
            allowed=masks,
            forced=torch.tensor(forced, device=device) if was_forced else None,
            verify=torch.tensor(verify, device=device) if was_forced or was_cut else None,
            dictated=torch.tensor(dictated, device=device) if min(dictated) < width - 1 else None,
            widest=max(verify) if was_forced or was_cut else None)

    def _fill(self, matchers: list, bitmask: torch.Tensor, indices: list[int]) -> None:
        """Fill the rows ``indices`` of ``bitmask`` with the masks of ``matchers``."""
        if len(matchers) == 1:  # (one row: no threads to wake)
            matchers[0].fill_next_token_bitmask(bitmask, indices[0])
        elif matchers:
            self._batch.batch_fill_next_token_bitmask(matchers, bitmask, indices)

    def _only_tokens(self, words) -> list[int | None]:
        """For each mask row (``[n, ⌈V/32⌉]`` int32 words, a NumPy array or a tensor), the one token
        it allows, or ``None`` where it allows more: one word set, to a power of two."""
        words = np.asarray(words, dtype=np.int32).astype(np.int64) & 0xFFFFFFFF  # (as unsigned)
        nonzero = words != 0
        index = nonzero.argmax(-1)
        word = words[np.arange(len(words)), index]
        single = (nonzero.sum(-1) == 1) & ((word & (word - 1)) == 0)
        out = []
        for alone, at, w in zip(single.tolist(), index.tolist(), word.tolist()):
            token = at * 32 + w.bit_length() - 1 if alone else None
            out.append(token if token is not None and token < self.vocab_size else None)
        return out


class DraftGuide:
    """A round's grammars over a drafter's own draft steps (:meth:`~dspark.drafters.Drafter.draw`):
    before step ``j + 1`` the constrained rows' logits are masked with their grammars' states after
    the drafts ``x_1..x_j`` (:meth:`mask`, the mask verify position ``j`` takes too), then the
    drawn tokens are taken (:meth:`take`); or a compiled step takes the masks as an input
    (:meth:`steps` runs the steps one at a time with :meth:`allowed`). Made by
    :meth:`GrammarRows.guide`; the engine rolls its walk back (:meth:`rollback`) once the drafter
    has proposed, and :meth:`GrammarRows.round_masks` reuses the masks it filled.

    A row stops being guided at the end of its output (EOS taken), or where its masked logits
    would have no finite entry left (a drafter's vocabulary holds none of the tokens the grammar
    allows: its own distribution stays, and its draft is rejected — ``q`` is always the
    distribution the draft came from, which is what keeps verification exact).

    Attributes:
        slots: the constrained rows. width: the most masks a row may take (the lookahead, γ + 1).
        filled: per row, the masks filled (positions ``0..filled − 1``). taken: per row, the
            drafts its grammar took. words: the masks, ``[k · width, ⌈V/32⌉]`` int32 (row ``k``'s
            position ``j`` at ``k · width + j``).
    """

    def __init__(self, rows: GrammarRows, slots: list[int], batch_size: int, device):
        self.grammars, self.slots, self.width, self.device = rows, list(slots), rows.lookahead, device
        self._batch_size = batch_size
        self.matchers = [rows.matchers[b] for b in slots]
        self.bitmask = _xgrammar().allocate_token_bitmask(len(slots) * self.width, rows.vocab_size)
        self.words = self.bitmask.numpy()  # (the same memory)
        self.filled, self.taken = [0] * len(slots), [[] for _ in slots]
        self.live = [k for k, m in enumerate(self.matchers) if not m.is_terminated()]
        self.step = 0  # (the draft step the next mask is for: 0, x_1's)
        self._masked: list[int] = []  # (the rows the last mask applied to)

    def _next_masks(self) -> torch.Tensor | None:
        """The guided rows' masks for the next draft step ``[n, V]`` bool on the device (filled on
        the host; ``None`` when no row is guided any more)."""
        j = self.step
        self.live = [k for k in self.live if not self.matchers[k].is_terminated() and j < self.width]
        self._masked = self.live
        if not self.live:
            return None
        at = [k * self.width + j for k in self.live]
        self.grammars._fill([self.matchers[k] for k in self.live], self.bitmask, at)
        for k in self.live:
            self.filled[k] = j + 1
        return unpack_words(self.words[at], self.grammars.vocab_size).to(self.device)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` ``[B, V]`` of the next draft step with the guided rows' forbidden tokens at
        −∞ (:func:`mask_logits`; a new tensor, the other rows as they are)."""
        allowed = self._next_masks()
        if allowed is None:
            return logits
        rows = self._rows()
        if rows is None:
            return mask_logits(logits, allowed)
        return logits.index_put((rows,), mask_logits(logits[rows], allowed))

    def allowed(self) -> torch.Tensor:
        """The next draft step's masks for the whole batch ``[B, V]`` bool: the guided rows'
        grammars' after the drafts so far, every token for the other rows — an input of a compiled
        draft step that applies it with :func:`mask_logits` (see :meth:`steps`)."""
        masks = self._next_masks()
        rows = self._rows()
        if masks is not None and rows is None:
            return masks
        allowed = torch.ones(self._batch_size, self.grammars.vocab_size, dtype=torch.bool, device=self.device)
        return allowed if masks is None else allowed.index_put((rows,), masks)

    def steps(self, step, carry, start: int, stop: int):
        """Draft steps ``start..stop − 1`` one at a time, each under this round's masks:
        ``step(carry, k, allowed)`` drafts ``x_{k+1}`` with the mask ``allowed`` ``[B, V]``
        (:meth:`allowed`, applied by :meth:`~dspark.drafters.Drafter.draw`; a compiled function
        takes it as an input) and returns ``(tokens [B, 1], q [B, 1, V] or None, confidences
        [B, 1], carry)``; its tokens are taken before the next step. Returns the steps' tokens,
        ``q`` and confidences, concatenated, and the last carry."""
        drafted = []
        for k in range(start, stop):
            tokens, q, confidence, carry = step(carry, k, self.allowed())
            self.take(tokens[:, 0])
            drafted.append((tokens, q, confidence))
        joined = [None if drafted[0][i] is None else torch.cat([d[i] for d in drafted], 1) for i in range(3)]
        return (*joined, carry)

    def _rows(self) -> torch.Tensor | None:
        """The masked rows' indices in the batch, ``None`` when they are the batch's first rows in
        order (every row of a batch of one)."""
        slots = [self.slots[k] for k in self._masked]
        if slots == list(range(len(slots))) and self._batch_size == len(slots):
            return None
        return torch.tensor(slots, device=self.device)

    def take(self, tokens: torch.Tensor) -> None:
        """The tokens ``[B]`` drawn from the last :meth:`mask`'s logits: each guided row's grammar
        takes its own (one host read); a row whose token its grammar forbids is guided no more."""
        self.step += 1
        if not self._masked:
            return
        rows = self._rows()
        drawn = (tokens if rows is None else tokens[rows]).tolist()
        going = []
        for k, token in zip(self._masked, drawn):
            if self.matchers[k].accept_token(token):
                self.taken[k].append(token)
                going.append(k)
        self.live, self._masked = going, []

    def rollback(self) -> None:
        """Undo the drafts the grammars took (the matchers are back after the committed tokens)."""
        back = [k for k, t in enumerate(self.taken) if t]
        if back:
            _xgrammar().BatchGrammarMatcher.batch_rollback([self.matchers[k] for k in back],
                                                           [len(self.taken[k]) for k in back])


def mask_logits(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """``logits`` ``[..., V]`` at −∞ where ``allowed`` ``[..., V]`` is false — except in rows that
    would keep no finite logit (a drafter whose vocabulary holds none of the allowed tokens):
    those stay as they are. Tensor ops alone (compiled draft steps run it)."""
    masked = torch.where(allowed, logits, float("-inf"))
    return torch.where(masked.amax(-1, keepdim=True) > float("-inf"), masked, logits)


def constrain(logits: torch.Tensor, slots: list[int], allowed: torch.Tensor) -> torch.Tensor:
    """``logits`` ``[B, W, V]`` (or ``[B, V]``) with the rows ``slots`` masked: −∞ where ``allowed``
    ``[k, W, V]`` (``[k, V]``) is false. A new tensor: the raw logits stay for log-probabilities."""
    rows = torch.tensor(slots, device=logits.device)
    return logits.index_put((rows,), logits[rows].masked_fill(~allowed, float("-inf")))


def with_forced(proposal, slots: list[int], forced: torch.Tensor):
    """``proposal`` with the drafts of rows ``slots`` replaced where ``forced`` ``[k, γ]`` is a token
    (≥ 0): that token, drawn from a one-hot ``q`` (the drafts after it stay the drafter's — any
    draft drawn from the ``q`` it reports is a valid proposal)."""
    rows = torch.tensor(slots, device=forced.device)
    replaced = forced >= 0
    tokens = proposal.tokens.clone()
    tokens[rows] = torch.where(replaced, forced, tokens[rows])
    probs = proposal.probs
    if probs is not None:
        probs = probs.clone()
        one_hot = torch.nn.functional.one_hot(forced.clamp(min=0), probs.shape[-1]).to(probs.dtype)
        probs[rows] = torch.where(replaced.unsqueeze(-1), one_hot, probs[rows])
    return replace(proposal, tokens=tokens, probs=probs)
