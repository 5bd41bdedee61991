"""The public API: :func:`build_pipeline` composes a config into a :class:`Pipeline` that generates."""

from __future__ import annotations

import logging
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from omegaconf import DictConfig

from dspark.chat import render_conversations
from dspark.config import load_config, section_object
from dspark.engine import Engine
from dspark.models import load_model, random_hf_model
from dspark.models.loading import model_skeleton, resolve_checkpoint
from dspark.records import SamplingParams
from dspark.stats import GenerationStats
from dspark.stop_strings import StopStrings, check_stop_strings
from dspark.streaming import CONTEXT_TOKENS, TextStreamer, decode_continuation
from dspark.tokenization import has_tokenizer_files, load_tokenizer

if TYPE_CHECKING:
    from dspark.session import Session

log = logging.getLogger(__name__)

#: the most alternatives ``generate(top_logprobs=k)`` returns per position (the OpenAI API's bound)
MAX_TOP_LOGPROBS = 20


@dataclass
class GenerationResult:
    """What :meth:`Pipeline.generate` returns.

    Attributes:
        token_ids: generated tokens only, one list per request (EOS included when it ended the request).
        texts: decoded generations (special tokens skipped) when the pipeline has a tokenizer, else ``None``.
        stats: :class:`~dspark.engine.GenerationStats` of the call.
        logprobs: with ``generate(logprobs=True)``, one list per request: each generated token's
            log-probability under the target's own distribution (the model's log-softmax, before
            temperature and the other sampling settings), aligned with ``token_ids``; else ``None``.
        top_logprobs: with ``generate(logprobs=True, top_logprobs=k)``, per request and generated
            token, the ``k`` likeliest tokens of that distribution as ``(token id, log-probability)``
            pairs, likeliest first; else ``None``.
        prompt_logprobs: with ``generate(prompt_logprobs=True)``, per request, each prompt token's
            log-probability under the target given the tokens before it (``None`` for the first,
            as vLLM's); else ``None``.
        prompt_top_logprobs: with ``generate(prompt_logprobs=True, prompt_top_logprobs=k)``, per
            request and prompt position, the ``k`` likeliest tokens there as ``(token id,
            log-probability)`` pairs, likeliest first (``None`` for the first position); else ``None``.
    """

    token_ids: list[list[int]]
    texts: list[str] | None
    stats: GenerationStats
    logprobs: list[list[float]] | None = None
    top_logprobs: list[list[list[tuple[int, float]]]] | None = None
    prompt_logprobs: list[list[float | None]] | None = None
    prompt_top_logprobs: list[list[list[tuple[int, float]] | None]] | None = None

    @property
    def finish_reasons(self) -> list[str]:
        """Why each request ended: ``"stop"`` (EOS, a stop token or a stop string) or ``"length"``
        (its ``max_new_tokens``), as vLLM's ``CompletionOutput.finish_reason``."""
        return [row["finish_reason"] for row in self.stats.per_request]


class Pipeline:
    """A target, a drafter, a verifier, a sampler and a cache, composed into a generator.

    Build one with :func:`build_pipeline`.
    """

    def __init__(self, config: DictConfig, engine: Engine, tokenizer=None):
        self.config = config
        self.engine = engine
        self.tokenizer = tokenizer
        self._grammar_compiler = None

    @property
    def grammar_compiler(self):
        """The :class:`~dspark.structured.GrammarCompiler` of this pipeline's vocabulary (made from
        its tokenizer on first use; set one built from a list of token strings for a model without
        a tokenizer)."""
        if self._grammar_compiler is None:
            from dspark.structured import GrammarCompiler

            if self.tokenizer is None:
                raise ValueError("structured outputs need the vocabulary's token strings: this pipeline has no "
                                 "tokenizer; give one (target.tokenizer), or set pipe.grammar_compiler = "
                                 "dspark.structured.GrammarCompiler(vocabulary=[...], vocab_size=<the target's logits width>, "
                                 "stop_token_ids=...)")
            self._grammar_compiler = GrammarCompiler(tokenizer=self.tokenizer, vocab_size=self.target.vocab_size,
                                                     stop_token_ids=list(self.engine.eos_token_ids))
        return self._grammar_compiler

    @grammar_compiler.setter
    def grammar_compiler(self, compiler) -> None:
        size = getattr(compiler, "vocab_size", None)
        if compiler is not None and size != self.target.vocab_size:
            raise ValueError(f"the grammar compiler is for a vocabulary of {size} tokens; this pipeline's target "
                             f"has {self.target.vocab_size} logits: build it with vocab_size={self.target.vocab_size}")
        self._grammar_compiler = compiler

    def _grammars(self, grammar, count: int, ignore_eos: list[bool], min_new: list[int]) -> list | None:
        """``generate``'s ``grammar`` checked and compiled, one per request (``None``: none asks)."""
        if grammar is None:
            return None
        grammars = list(grammar) if isinstance(grammar, (list, tuple)) else [grammar] * count
        if len(grammars) != count:
            raise ValueError(f"grammar has {len(grammars)} entries for {count} prompts: give one per prompt, or one "
                             "grammar for all")
        for i, g in enumerate(grammars):
            if g is None:
                continue
            if ignore_eos[i]:
                raise ValueError(f"request {i}: a grammar ends its request at EOS once the output is complete; "
                                 "ignore_eos cannot be set with it")
            if min_new[i]:
                raise ValueError(f"request {i}: min_new_tokens holds EOS back, which a complete output needs; "
                                 "give a grammar or min_new_tokens, not both")
        compiled = []
        for i, g in enumerate(grammars):
            try:
                compiled.append(None if g is None else self.grammar_compiler.compile(g))
            except ValueError as err:
                raise ValueError(f"request {i}: {err}" if len(grammars) > 1 else str(err)) from err
        return compiled

    @property
    def target(self):
        """The target model."""
        return self.engine.target

    @property
    def drafter(self):
        """The drafter."""
        return self.engine.drafter

    def encode(self, prompts) -> list[list[int]]:
        """Validate prompts and turn them into token-id lists (strings need a tokenizer)."""
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple)):
            raise TypeError("prompts must be a list of strings or a list of token-id lists")
        if len(prompts) == 0:
            raise ValueError("prompts is empty: give at least one prompt")
        vocab = self.target.vocab_size
        encoded = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                if self.tokenizer is None:
                    raise ValueError(f"prompt {i} is a string but this pipeline has no tokenizer; pass token-id lists, "
                                     "or a tokenizer (build_pipeline(tokenizer=...) or target.tokenizer)")
                if prompt == "":
                    raise ValueError(f"prompt {i} is an empty string")
                ids = self.tokenizer(prompt)["input_ids"]
            elif isinstance(prompt, (list, tuple)) or (isinstance(prompt, torch.Tensor) and prompt.dim() == 1):
                # (int() would truncate 5.7 and read "5" and True: nothing is silently converted)
                if isinstance(prompt, torch.Tensor):
                    if not _integer_dtype(prompt.dtype):
                        raise TypeError(f"prompt {i} is a {prompt.dtype} tensor: token ids are integers (torch.long)")
                elif wrong := [t for t in prompt if not _is_token_id(t)]:
                    raise TypeError(f"prompt {i} has values that are not integer token ids: {wrong[:5]!r}")
                ids = [int(t) for t in prompt]
                bad = [t for t in ids if not 0 <= t < vocab]
                if bad:
                    raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
            else:
                raise TypeError(f"prompt {i} must be a string or a list of token ids, got {type(prompt).__name__}")
            if len(ids) == 0:
                raise ValueError(f"prompt {i} is empty (0 tokens)")
            encoded.append(ids)
        return encoded

    def _check_stop_token_ids(self, stop_token_ids) -> tuple[int, ...]:
        if stop_token_ids is None:
            return ()
        if isinstance(stop_token_ids, (str, bytes, int)) or not isinstance(stop_token_ids, (list, tuple)):
            raise TypeError(f"stop_token_ids must be a list of token ids, got {stop_token_ids!r}")
        vocab = self.target.vocab_size
        bad = [t for t in stop_token_ids if isinstance(t, bool) or not isinstance(t, numbers.Integral)
               or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"stop_token_ids must be token ids in [0, {vocab}), got {bad[:5]}")
        return tuple(int(t) for t in stop_token_ids)

    def generate(self, prompts, *, max_new_tokens: int | list[int], temperature: float | list[float] = 0.0,
                 top_k: int | list[int] = 0, top_p: float | list[float] = 1.0, min_p: float | list[float] = 0.0,
                 seed: int | list[int] | None = None, ignore_eos: bool | list[bool] = False,
                 progress: bool | None = None, on_tokens: Callable[[int, list[int]], None] | None = None,
                 stop_token_ids: list[int] | list[list[int] | None] | None = None,
                 stop: list[str] | list[list[str] | None] | None = None, min_new_tokens: int | list[int] = 0, logprobs: bool = False, top_logprobs: int = 0, prompt_logprobs: bool = False,
                 prompt_top_logprobs: int = 0,
                 repetition_penalty: float | list[float] = 1.0, presence_penalty: float | list[float] = 0.0,
                 frequency_penalty: float | list[float] = 0.0, no_repeat_ngram_size: int | list[int] = 0,
                 logit_bias: dict[int, float] | list[dict[int, float] | None] | None = None,
                 grammar=None) -> GenerationResult:
        """Generate continuations of ``prompts``.

        Args:
            prompts: ``list[str]`` (needs a tokenizer) or ``list[list[int]]``.
            max_new_tokens: generation budget (≥ 1): one for every request, or a list with one per
                request (requests with different budgets still share a batch).
            temperature, top_k, top_p, min_p: sampling settings (see :class:`~dspark.records.SamplingParams`).
            repetition_penalty, presence_penalty, frequency_penalty, no_repeat_ngram_size: penalties
                from each request's history (1, 0, 0, 0: off; see :mod:`dspark.samplers.penalties`);
                the drafts are verified against the penalised target, so the output is exactly
                penalised decoding's.
            logit_bias: ``{token id: bias}``, biases in [-100, 100] added to those logits first
                (the OpenAI API's; -100 all but bans a token).

                Each sampling setting (``temperature`` to ``logit_bias``) is one value for every
                request, or a list with one per request (vLLM's ``SamplingParams`` per request):
                requests with different settings — greedy and sampled ones too — share a batch,
                each decoded exactly as it would be alone.
            seed: one int (request ``i`` uses ``seed + i``), one int per request (``None`` in the list:
                a fresh seed for that request), or ``None`` (fresh seeds from ``torch``'s global
                generator).
            ignore_eos: keep generating past EOS until ``max_new_tokens``.
            stop_token_ids: more tokens that end a request, for this call (as EOS does, and kept in
                its output); they apply with ``ignore_eos`` too.
            stop: stop strings (needs a tokenizer): a request ends after the token that completes one
                in its generated text; that token stays in its output, the text keeps the string.
            min_new_tokens: no EOS or stop token among a request's first ``min_new_tokens``
                tokens (they get probability 0 there; ``0 ≤ min_new_tokens ≤ max_new_tokens``), and
                stop strings count only when completed by the ``min_new_tokens``-th token or later.

                ``ignore_eos``, ``stop_token_ids``, ``stop`` and ``min_new_tokens`` may be given per
                request too: a list of bools, of id lists, of string lists (``None``: none for that
                request), of ints.
            grammar: structured output (:mod:`dspark.structured`): a
                :class:`~dspark.structured.Grammar` — ``Grammar.json_schema(schema)``,
                ``Grammar.json()``, ``Grammar.regex(pattern)``, ``Grammar.choice([...])``,
                ``Grammar.ebnf(text)`` — for every request, or a list with one per request
                (``None``: unconstrained). The output is a string of the grammar, ended by EOS
                (so not with ``ignore_eos`` or ``min_new_tokens``) unless ``max_new_tokens``
                comes first; drafts are verified against the constrained target, so it is exactly
                constrained decoding's.
            progress: show a progress bar (default: ``engine.progress``).
            logprobs: also return each generated token's log-probability under the target
                (:attr:`GenerationResult.logprobs`).
            top_logprobs: with ``logprobs``, also the ``k`` likeliest tokens at each generated
                position, ``0 ≤ k ≤ 20`` (:attr:`GenerationResult.top_logprobs`).
            prompt_logprobs: also return each prompt token's log-probability given the ones before
                it (:attr:`GenerationResult.prompt_logprobs`; native targets score the prompt in
                chunks of positions, transformers-backed ones compute the logits at every prompt
                position at once, ``[batch, prompt length, vocabulary]`` floats).
            prompt_top_logprobs: with ``prompt_logprobs``, also the ``k`` likeliest tokens at each
                prompt position, ``0 ≤ k ≤ 20`` (:attr:`GenerationResult.prompt_top_logprobs`; what
                lm-eval-harness's loglikelihood tasks read: whether the prompt's continuation is greedy).
            on_tokens: streaming: ``on_tokens(i, ids)`` is called as request ``i`` emits tokens
                (after prefill and after every round; several tokens per call when drafts are
                accepted). The ids are final: request ``i``'s calls concatenate to its
                ``token_ids``. :class:`~dspark.streaming.TextStreamer` turns them into text.

        All arguments are checked before any compute; a bad one raises ``ValueError``/``TypeError``.
        """
        top_logprobs, prompt_top_logprobs = check_score_options(logprobs, top_logprobs, prompt_logprobs,
                                                                prompt_top_logprobs)
        if on_tokens is not None and not callable(on_tokens):
            raise TypeError("on_tokens must be a callable on_tokens(request_index, token_ids), "
                            f"got {type(on_tokens).__name__}")
        encoded, budgets, params, seeds, (ignore, stop_ids, checks, min_new) = self._requests(
            prompts, max_new_tokens, seed, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
            repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty, no_repeat_ngram_size=no_repeat_ngram_size, logit_bias=logit_bias,
            ignore_eos=ignore_eos, stop_token_ids=stop_token_ids, stop=stop, min_new_tokens=min_new_tokens)
        self.engine.check_fits([len(p) for p in encoded], budgets)
        grammars = self._grammars(grammar, len(encoded), ignore, min_new)

        if isinstance(on_tokens, TextStreamer):  # its first tokens decode after their prompts' text
            for i, prompt in enumerate(encoded):
                on_tokens.start(i, prompt)
        show = self.engine.config.progress if progress is None else progress
        bar = _progress_bar(show)
        stop_check = None if not any(checks) else (lambda i, ids: None if checks[i] is None else checks[i](i, ids))
        token_ids, stats, scores = self.engine.generate(
            encoded, max_new_tokens=budgets, params=params, seeds=seeds, ignore_eos=ignore, progress=bar,
            on_tokens=on_tokens, stop_token_ids=stop_ids, min_new_tokens=min_new, stop_check=stop_check,
            logprobs=logprobs, top_logprobs=top_logprobs, prompt_logprobs=prompt_logprobs,
            prompt_top_logprobs=prompt_top_logprobs, grammars=grammars)
        if bar is not None:
            bar.close()
        texts = None
        if self.tokenizer is not None:  # (each read on from its prompt: a first word keeps its space)
            texts = [decode_continuation(self.tokenizer, prompt[-CONTEXT_TOKENS:], ids)
                     for prompt, ids in zip(encoded, token_ids)]
        return GenerationResult(token_ids=token_ids, texts=texts, stats=stats, logprobs=scores.tokens,
                                top_logprobs=scores.top, prompt_logprobs=scores.prompt,
                                prompt_top_logprobs=scores.prompt_top)

    def session(self, *, max_len: int | None = None, logprobs: bool = False, top_logprobs: int = 0,
                prompt_logprobs: bool = False, prompt_top_logprobs: int = 0) -> "Session":
        """A :class:`~dspark.session.Session`: requests submitted one by one, while others decode
        (continuous batching over ``engine.max_batch_size`` slots of ``max_len`` positions each)."""
        from dspark.session import Session

        return Session(self, max_len=max_len, logprobs=logprobs, top_logprobs=top_logprobs,
                       prompt_logprobs=prompt_logprobs, prompt_top_logprobs=prompt_top_logprobs)

    def _requests(self, prompts, max_new_tokens, seed, *, ignore_eos, stop_token_ids, stop, min_new_tokens,
                  **sampling):
        """``generate``'s per-request arguments, checked and one per request: the encoded prompts,
        budgets, sampling settings, seeds, and the stop settings (``ignore_eos``, stop ids, a
        :class:`~dspark.stop_strings.StopStrings` or ``None``, ``min_new_tokens``)."""
        budgets = [max_new_tokens] if not isinstance(max_new_tokens, (list, tuple)) else list(max_new_tokens)
        if not budgets or not all(_is_integer(m) and m >= 1 for m in budgets):
            raise ValueError(f"max_new_tokens must be an integer >= 1, or a list of them (one per request), "
                             f"got {max_new_tokens!r}")
        budgets = [int(m) for m in budgets]
        encoded = self.encode(prompts)
        params = self._sampling_params(len(encoded), **sampling)
        if isinstance(max_new_tokens, (list, tuple)) and len(budgets) != len(encoded):
            raise ValueError(f"max_new_tokens has {len(budgets)} budgets for {len(encoded)} prompts: give one per "
                             "prompt, or one integer for all")
        budgets = budgets * len(encoded) if len(budgets) == 1 else budgets
        ignore, stop_ids, stop_strings, min_new = self._stop_settings(budgets, ignore_eos, stop_token_ids, stop,
                                                                      min_new_tokens)
        checks = [StopStrings(self.tokenizer, strings, m, prompt) if strings else None
                  for strings, m, prompt in zip(stop_strings, min_new, encoded)]
        return encoded, budgets, params, _request_seeds(seed, len(encoded)), (ignore, stop_ids, checks, min_new)

    def _stop_settings(self, budgets: list[int], ignore_eos, stop_token_ids, stop, min_new_tokens):
        """``generate``'s stop settings, one per request (each given once for all or as a list),
        checked: ``(ignore_eos, stop ids, stop strings, min_new_tokens)`` lists."""
        count = len(budgets)

        def per_request(name: str, value, listed: bool) -> list:
            if not listed:
                return [value] * count
            if len(value) != count:
                raise ValueError(f"{name} has {len(value)} entries for {count} prompts: give one per prompt, "
                                 "or one for all")
            return list(value)

        nested = lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(  # noqa: E731
            x is None or isinstance(x, (list, tuple)) for x in v)
        ignore = per_request("ignore_eos", ignore_eos, isinstance(ignore_eos, (list, tuple)))
        if not all(isinstance(i, bool) for i in ignore):
            raise TypeError(f"ignore_eos must be True or False, or one per request, got {ignore_eos!r}")
        stop_ids = [self._check_stop_token_ids(ids) for ids in per_request("stop_token_ids", stop_token_ids,
                                                                           nested(stop_token_ids))]
        stop_strings = [check_stop_strings(strings, self.tokenizer) for strings in per_request("stop", stop,
                                                                                              nested(stop))]
        listed = isinstance(min_new_tokens, (list, tuple))
        min_new = per_request("min_new_tokens", min_new_tokens, listed)
        least = min(budgets)
        for i, (m, budget) in enumerate(zip(min_new, budgets)):
            bound = budget if listed else least
            if not _is_integer(m) or not 0 <= m <= bound:
                raise ValueError(f"{f'request {i}: ' if listed else ''}min_new_tokens must be an integer in "
                                 f"[0, max_new_tokens={bound}], got {m!r}")
        return ignore, stop_ids, stop_strings, [int(m) for m in min_new]

    def _sampling_params(self, count: int, **settings) -> SamplingParams | list[SamplingParams]:
        """``generate``'s sampling settings as :class:`SamplingParams`: one for all ``count``
        requests, or one per request where some setting is a list (checked: one value per
        request, each valid; a bad one is named with its request). The engine shares one record
        among requests that agree (:func:`~dspark.records.batch_params`)."""
        lists = {name: value for name, value in settings.items() if isinstance(value, (list, tuple))}
        for name, values in lists.items():
            if len(values) != count:
                raise ValueError(f"{name} has {len(values)} values for {count} prompts: give one per prompt, "
                                 "or one value for all")

        def one(index: int | None) -> SamplingParams:
            value = {name: (lists[name][index] if name in lists else settings[name]) for name in settings}
            try:
                return SamplingParams(
                    _as_float(value["temperature"]), _as_int(value["top_k"]), _as_float(value["top_p"]),
                    _as_float(value["min_p"]), _as_float(value["repetition_penalty"]), _as_float(value["presence_penalty"]),
                    _as_float(value["frequency_penalty"]), _as_int(value["no_repeat_ngram_size"]),
                    self._logit_bias(value["logit_bias"])).validate()
            except ValueError as err:
                raise ValueError(f"request {index}: {err}" if index is not None else str(err)) from None

        return one(None) if not lists else [one(i) for i in range(count)]

    def _logit_bias(self, logit_bias) -> tuple[tuple[int, float], ...]:
        """``generate``'s ``logit_bias`` as the parameters hold it (sorted pairs), its token ids
        checked against the target's vocabulary (the rest by :meth:`SamplingParams.validate`)."""
        if logit_bias is None:
            return ()
        if not isinstance(logit_bias, dict):
            raise ValueError(f"logit_bias must be a dict {{token id: bias}}, got {type(logit_bias).__name__}")
        vocab = self.engine.target.vocab_size
        if not all(_is_integer(t) for t in logit_bias):
            raise ValueError(f"logit_bias keys must be token ids (integers), got {list(logit_bias)!r}")
        outside = [int(t) for t in logit_bias if not 0 <= t < vocab]
        if outside:
            raise ValueError(f"logit_bias token ids {outside} are outside the target's vocabulary (0..{vocab - 1})")
        return tuple(sorted((int(t), _as_float(b)) for t, b in logit_bias.items()))

    def chat(self, conversations, *, chat_template: str | None = None, chat_template_kwargs: dict | None = None,
             **generate_kwargs) -> GenerationResult:
        """Generate the assistant's reply to each conversation.

        Args:
            conversations: a list of conversations, each a list of messages ``{"role": ...,
                "content": ...}``, rendered by the tokenizer's chat template with the assistant's
                turn opened (:func:`dspark.chat.render_conversations`).
            chat_template: a Jinja template to use instead of the tokenizer's own.
            chat_template_kwargs: more template variables, e.g. ``{"enable_thinking": False}`` (Qwen3).
            **generate_kwargs: as for :meth:`generate` (``max_new_tokens``, sampling, stops, ...).

        Returns:
            :meth:`generate`'s result: the replies' token ids and texts, in conversation order.
        """
        return self.generate(render_conversations(self.tokenizer, conversations, chat_template, chat_template_kwargs),
                             **generate_kwargs)


def check_score_options(logprobs, top_logprobs, prompt_logprobs, prompt_top_logprobs=0) -> tuple[int, int]:
    """Refuse bad ``logprobs`` / ``top_logprobs`` / ``prompt_logprobs`` / ``prompt_top_logprobs``
    options (``TypeError`` / ``ValueError`` naming the option); return the two counts as ints
    (numpy's are taken)."""
    for name, flag in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    for name, count in (("top_logprobs", top_logprobs), ("prompt_top_logprobs", prompt_top_logprobs)):
        if not _is_integer(count) or not 0 <= count <= MAX_TOP_LOGPROBS:
            raise ValueError(f"{name} must be an integer in [0, {MAX_TOP_LOGPROBS}], got {count!r}")
    if top_logprobs and not logprobs:
        raise ValueError("top_logprobs needs logprobs=True (the likeliest tokens come with the chosen one's)")
    if prompt_top_logprobs and not prompt_logprobs:
        raise ValueError("prompt_top_logprobs needs prompt_logprobs=True (the likeliest tokens come with the "
                         "prompt token's)")
    return int(top_logprobs), int(prompt_top_logprobs)


def _as_float(value):
    """A real number (an int, numpy's float32 or int64 too; not a bool) as a float, so that ``1``,
    ``1.0`` and ``np.float32(1)`` make the same parameters; anything else unchanged (validation
    names it)."""
    return float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else value


def _as_int(value):
    """An integer (numpy's too; not a bool) as an int; anything else unchanged (validation names it)."""
    return int(value) if _is_integer(value) else value


def _integer_dtype(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _is_integer(value) -> bool:
    """An int, numpy's too; not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_token_id(value) -> bool:
    """An int (numpy's too) or a 0-d integer tensor; not a bool, float or string."""
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and _integer_dtype(value.dtype)
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _request_seeds(seed, count: int) -> list[int]:
    """One seed per request: ``seed + i``, the list's own (``None`` entries: fresh ones from
    ``torch``'s global generator), or all fresh without a seed."""
    if seed is None:
        return torch.randint(0, 2**62, (count,)).tolist()
    if _is_integer(seed):
        return _in_seed_range([int(seed) + i for i in range(count)])
    if isinstance(seed, (str, bytes)) or not isinstance(seed, (list, tuple)):
        raise TypeError(f"seed must be an int, a list of ints (None for a fresh one), or None, got {seed!r}")
    seeds = list(seed)
    if len(seeds) != count or not all(s is None or _is_integer(s) for s in seeds):
        raise ValueError(f"seed must be an int or one int per request ({count}; None for a fresh one), got {seed!r}")
    fresh = iter(torch.randint(0, 2**62, (count,)).tolist())
    return _in_seed_range([next(fresh) if s is None else int(s) for s in seeds])


SEED_RANGE = (-2**63, 2**64 - 1)
"""The seeds ``torch.Generator.manual_seed`` takes (signed or unsigned 64-bit)."""


def _in_seed_range(seeds: list[int]) -> list[int]:
    bad = [s for s in seeds if not SEED_RANGE[0] <= s <= SEED_RANGE[1]]
    if bad:
        raise ValueError(f"seed must lie in [-2**63, 2**64 - 1] (request i of one seed uses seed + i), got {bad[0]}")
    return seeds


def _progress_bar(show: bool):
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(desc="decoding rounds", unit="round")


def build_pipeline(config=None, *, target_model=None, draft_model=None, tokenizer=None, overrides=()) -> Pipeline:
    """Compose a config into a :class:`Pipeline`.

    Args:
        config: YAML path or bare config name (``"ar"``), dict, ``DictConfig`` or ``None``.
        target_model: a ``transformers`` model, a dspark model or a checkpoint directory that replaces
            ``target.path`` / ``target.random``.
        draft_model: the same for drafters that need a separate model (replaces the drafter's configured one).
        tokenizer: a tokenizer object or directory (default: ``target.tokenizer``, else the target
            checkpoint's own tokenizer files if it has them).
        overrides: dotlist strings, e.g. ``["drafter.num_speculative_tokens=5"]``.
    """
    from dspark.cache import CACHES
    from dspark.drafters import DRAFTERS
    from dspark.samplers import SAMPLERS
    from dspark.scheduling import SCHEDULERS
    from dspark.verifiers import VERIFIERS

    cfg = load_config(config, overrides)
    target_cfg = section_object(cfg, "target")
    # resolve every component class first: a bad name fails before any model is loaded
    sampler_cls = SAMPLERS.resolve(cfg.sampler.name, cfg.sampler.get("_target_"))
    verifier_cls = VERIFIERS.resolve(cfg.verifier.name, cfg.verifier.get("_target_"))
    drafter_cls = DRAFTERS.resolve(cfg.drafter.name, cfg.drafter.get("_target_"))
    cache_cls = CACHES.resolve(cfg.cache.name, cfg.cache.get("_target_"))
    scheduler_cls = SCHEDULERS.resolve(cfg.scheduler.name, cfg.scheduler.get("_target_"))
    if scheduler_cls.needs_confidence and not drafter_cls.provides_confidence:
        raise ValueError(f"scheduler {cfg.scheduler.name!r} reads draft confidences, which the {cfg.drafter.name!r} "
                         "drafter does not produce; use a drafter that does (dspark, eagle3, draft_model), scheduler: adaptive "
                         "(acceptance estimated from earlier rounds) or scheduler: fixed")

    source = target_model
    if source is None:
        if target_cfg.path is not None:
            source = target_cfg.path
        elif target_cfg.random is not None:
            spec = dict(target_cfg.random)
            seed = int(spec.pop("seed", 0))
            source = random_hf_model(spec, seed=seed)
        elif target_cfg.name is not None:
            source = resolve_checkpoint(target_cfg.name)
        else:
            raise ValueError("no target model: set target.name (an embedded model), target.path (a checkpoint "
                             "directory) or target.random, or pass build_pipeline(target_model=...)")
    drafter_cfg = section_object(cfg, "drafter")
    if draft_model is None and target_cfg.backend != "hf":  # a drafter checkpoint that cannot run: no target load
        skeleton = model_skeleton(source, trust_remote_code=target_cfg.trust_remote_code)
        if skeleton is not None:
            drafter_cls.check_checkpoint(drafter_cfg, skeleton)
    target = load_model(source, dtype=target_cfg.dtype, device=target_cfg.device, backend=target_cfg.backend,
                        trust_remote_code=target_cfg.trust_remote_code)

    if tokenizer is None:
        if target_cfg.tokenizer is not None:
            tokenizer = target_cfg.tokenizer
        elif isinstance(source, (str, Path)) and has_tokenizer_files(resolve_checkpoint(source)):
            tokenizer = resolve_checkpoint(source)
    tokenizer = load_tokenizer(tokenizer, trust_remote_code=target_cfg.trust_remote_code)

    sampler = sampler_cls(section_object(cfg, "sampler"))
    verifier = verifier_cls(section_object(cfg, "verifier"))
    drafter = drafter_cls(drafter_cfg, target=target, sampler=sampler, draft_model=draft_model)
    if scheduler_cls.needs_confidence and not drafter.provides_confidence:  # e.g. a checkpoint without the head
        raise ValueError(f"scheduler {cfg.scheduler.name!r} reads draft confidences, which this {cfg.drafter.name!r} "
                         "drafter does not produce (its checkpoint has no confidence head); use scheduler: adaptive "
                         "or scheduler: fixed")
    scheduler = scheduler_cls(section_object(cfg, "scheduler"), target=target,
                              model_name=str(source) if isinstance(source, (str, Path)) else "")
    if not hasattr(target, "cache_shape") and cfg.cache.name == "static" and not cfg.cache.get("_target_"):
        log.info("the transformers adapter cannot use the static cache; using cache.name=hf_dynamic")
        cache_cls = CACHES.get("hf_dynamic")
    engine = Engine(target, drafter, verifier, sampler, scheduler=scheduler, cache_class=cache_cls,
                    cache_config=section_object(cfg, "cache"),
                    engine_config=section_object(cfg, "engine"), eos_token_ids=_eos_ids(target, tokenizer))
    return Pipeline(cfg, engine, tokenizer)


def _eos_ids(target, tokenizer) -> list[int]:
    """EOS ids from the target's generation config, else its config, else the tokenizer."""
    ids = []
    hf_config = getattr(target, "hf_config", None)
    generation_config = getattr(target, "generation_config", None)
    for source in (generation_config, hf_config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if value is not None:
            ids = [value] if isinstance(value, int) else list(value)
            break
    if not ids and tokenizer is not None and tokenizer.eos_token_id is not None:
        ids = [tokenizer.eos_token_id]
    return [i for i in ids if 0 <= i < target.vocab_size]
