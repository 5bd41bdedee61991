"""The OpenAI API's request and response bodies, as dspark reads and writes them.

A request body (``/v1/completions`` or ``/v1/chat/completions``) becomes a :class:`Job`: the
prompts, how many choices each, and the settings :meth:`Session.submit
<dspark.session.Session.submit>` takes. Everything is checked here, before anything is queued;
a bad field raises :class:`ProtocolError`, which names it and says what is allowed (HTTP 400).

Where the two APIs' defaults differ from ``generate``'s, the API's hold: ``temperature`` is 1 and
stop strings are left out of the returned text (vLLM's ``include_stop_str_in_output`` keeps
them). vLLM's extra sampling fields are read too (``top_k``, ``min_p``, ``repetition_penalty``,
``min_tokens``, ``ignore_eos``, ``stop_token_ids``), and dspark's ``no_repeat_ngram_size``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from dspark.records import LOGIT_BIAS_RANGE, MAX_INTEGER_SETTING, REPETITION_PENALTY_RANGE

#: choices one request may ask for (``n`` × prompts)
MAX_CHOICES = 128


class ProtocolError(ValueError):
    """A request the API refuses: ``status`` (400: bad request, 404: no such model or path) and
    the field at fault (``param``), as OpenAI's error body carries them."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status

    def body(self) -> dict:
        """The API's error body: ``{"error": {"message", "type", "param", "code"}}``."""
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": None}}


@dataclass
class Job:
    """One API request, checked.

    Attributes:
        chat: a chat completion (``prompts`` are conversations) or a completion (text or ids).
        prompts: ``list[str | list[int]]``, or ``list[list[dict]]`` messages for chat.
        n: choices per prompt; choice ``i · n + j`` is prompt ``i``'s ``j``-th.
        max_tokens: each choice's budget (0: with ``echo``, the prompt alone — scored, nothing
            generated; ``None``: a chat's that set none, the rest of the context — set on submit).
        seed: choice ``k`` uses ``seed + k`` (``None``: fresh).
        settings: :meth:`Session.submit`'s sampling and stop keywords (all but the prompt,
            ``max_new_tokens`` and ``seed``).
        stops: the stop strings (cut from the text unless ``include_stop``).
        logprobs: ``None``, or how many likeliest tokens to list at each position (0: the chosen
            token's log-probability alone).
        echo: a completion's choices start with its prompt (with ``logprobs``, the prompt's tokens
            scored too: what lm-eval-harness's loglikelihood tasks read).
        stream: send server-sent events; include_usage: a last event with the usage.
        chat_template_kwargs: more variables for the chat template.
        grammar_field: the field that asked for a structured output (``settings["grammar"]``), if one did.
    """

    chat: bool
    prompts: list
    n: int
    max_tokens: int | None
    seed: int | None
    settings: dict
    stops: list[str]
    include_stop: bool
    logprobs: int | None
    stream: bool
    include_usage: bool
    chat_template_kwargs: dict | None = None
    echo: bool = False
    grammar_field: str | None = None
    choices: int = field(init=False)
    prompt_ids: list[list[int]] | None = None  # the prompts as the target reads them (set once submitted)

    def __post_init__(self):
        self.choices = len(self.prompts) * self.n


# vLLM's older structured-output fields (one of them at most, or structured_outputs, or response_format)
GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
#: the fields a request may ask for a structured output with (:func:`structured_output`)
STRUCTURED_FIELDS = ("response_format", "structured_outputs", *GUIDED)
# fields each endpoint reads (others are refused, naming them); "user" is accepted and ignored
_COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
           "presence_penalty", "frequency_penalty", "logit_bias", "user", "top_k", "min_p", "repetition_penalty",
           "min_tokens", "ignore_eos", "stop_token_ids", "include_stop_str_in_output", "no_repeat_ngram_size",
           *STRUCTURED_FIELDS}
COMPLETION_FIELDS = _COMMON | {"prompt", "logprobs", "echo", "best_of", "suffix"}
CHAT_FIELDS = _COMMON | {"messages", "logprobs", "top_logprobs", "max_completion_tokens", "chat_template_kwargs"}


#: a completion's budget when neither the request nor the server sets one (OpenAI's and vLLM's)
COMPLETIONS_MAX_TOKENS = 16


def parse_request(body, *, chat: bool, model: str, default_max_tokens: int | None, max_logprobs: int) -> Job:
    """Check a request body (the parsed JSON) and read it into a :class:`Job`.

    Args:
        chat: ``/v1/chat/completions`` (else ``/v1/completions``).
        model: the served model's name (a body naming another is refused, 404).
        default_max_tokens: the budget of a request that sets none; ``None``: a completion's is
            :data:`COMPLETIONS_MAX_TOKENS`, a chat's the rest of the context (``max_tokens`` is then
            ``None`` here, set once the conversation is rendered), as OpenAI's and vLLM's are.
        max_logprobs: the most likeliest tokens a request may ask for (0: log-probabilities are off).
    """
    if not isinstance(body, dict):
        raise ProtocolError(f"the request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - (CHAT_FIELDS if chat else COMPLETION_FIELDS))
    if unknown:
        raise ProtocolError(f"unsupported fields {unknown}; this server reads {sorted(CHAT_FIELDS if chat else COMPLETION_FIELDS)}",
                            unknown[0])
    _check_model(body, model)
    prompts = _messages(body) if chat else _prompts(body)
    echo = not chat and _boolean(body, "echo", False)
    if not chat and body.get("suffix") is not None:
        raise ProtocolError("suffix is not supported (no insertion mode)", "suffix")
    n = _integer(body, "n", 1, low=1)
    if not chat and body.get("best_of") is not None and _integer(body, "best_of", n, low=1) != n:
        raise ProtocolError("best_of must equal n here (every sampled choice is returned)", "best_of")
    if len(prompts) * n > MAX_CHOICES:
        raise ProtocolError(f"{len(prompts)} prompts × n={n} is {len(prompts) * n} choices, more than {MAX_CHOICES}",
                            "n")
    budget_field = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    if echo and type(body.get(budget_field)) is int and body[budget_field] == 0:  # the prompt alone, scored (vLLM's "echo without generation")
        max_tokens = 0
    elif chat and body.get(budget_field) is None and default_max_tokens is None:
        max_tokens = None  # the rest of the context: known once the conversation is rendered
    else:
        try:
            default = COMPLETIONS_MAX_TOKENS if default_max_tokens is None else default_max_tokens
            max_tokens = _integer(body, budget_field, default, low=1)
        except ProtocolError as err:
            raise ProtocolError(f"{err} (0 only with echo=true: the prompt alone)" if not chat else str(err),
                                budget_field) from None
    stream = _boolean(body, "stream", False)
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise ProtocolError("stream_options applies with stream=true", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise ProtocolError('stream_options must be {"include_usage": true|false}', "stream_options")
    include_usage = bool(options and _boolean(options, "include_usage", False))
    stops = body.get("stop")
    stops = [] if stops is None else [stops] if isinstance(stops, str) else stops
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ProtocolError(f"stop must be a non-empty string or a list of them, got {body.get('stop')!r}", "stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ProtocolError(f"seed must be an integer, got {seed!r}", "seed")
    top_k = _integer(body, "top_k", 0, low=-1, high=MAX_INTEGER_SETTING)
    grammar, grammar_field = structured_output(body)
    settings = dict(
        temperature=_number(body, "temperature", 1.0, low=0.0, high=2.0),
        top_p=_number(body, "top_p", 1.0, low=0.0, high=1.0, open_low=True),
        top_k=0 if top_k == -1 else top_k,
        min_p=_number(body, "min_p", 0.0, low=0.0, high=1.0),
        presence_penalty=_number(body, "presence_penalty", 0.0, low=-2.0, high=2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, low=-2.0, high=2.0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, low=REPETITION_PENALTY_RANGE[0],
                                   high=REPETITION_PENALTY_RANGE[1]),
        no_repeat_ngram_size=_integer(body, "no_repeat_ngram_size", 0, low=0, high=MAX_INTEGER_SETTING),
        logit_bias=_logit_bias(body.get("logit_bias")),
        min_new_tokens=_integer(body, "min_tokens", 0, low=0),
        ignore_eos=_boolean(body, "ignore_eos", False),
        stop_token_ids=_token_ids(body.get("stop_token_ids"), "stop_token_ids"),
        stop=stops or None,
        grammar=grammar,
    )
    if settings["grammar"] is not None:  # (a grammar ends its request at EOS, once the output is complete)
        for name, off in (("ignore_eos", not settings["ignore_eos"]), ("min_tokens", not settings["min_new_tokens"])):
            if not off:
                raise ProtocolError(f"{name} cannot be set with a structured output (response_format, "
                                    "structured_outputs, guided_*): it ends at EOS once complete", name)
    if max_tokens is not None and settings["min_new_tokens"] > max_tokens:
        raise ProtocolError(f"min_tokens ({settings['min_new_tokens']}) must not exceed {budget_field} ({max_tokens})",
                            "min_tokens")
    logprobs = _logprobs(body, chat, max_logprobs)
    template_kwargs = _template_kwargs(body) if chat else None
    return Job(chat=chat, prompts=prompts, n=n, max_tokens=max_tokens, seed=seed, settings=settings, stops=stops,
               include_stop=_boolean(body, "include_stop_str_in_output", False), logprobs=logprobs, stream=stream,
               include_usage=include_usage, chat_template_kwargs=template_kwargs, echo=echo,
               grammar_field=grammar_field)


def parse_tokenize(body, *, model: str) -> tuple[str | list, bool, dict | None, bool]:
    """``POST /tokenize``'s body (vLLM's): ``{"prompt": text}`` (with ``add_special_tokens``,
    default true) or ``{"messages": [...]}`` → ``(text or conversation, chat, chat_template_kwargs,
    add_special_tokens)``."""
    if not isinstance(body, dict):
        raise ProtocolError(f"the request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - {"model", "prompt", "messages", "chat_template_kwargs", "add_special_tokens"})
    if unknown:
        raise ProtocolError(f"unsupported fields {unknown}; /tokenize reads model, prompt (and add_special_tokens) "
                            "or messages", unknown[0])
    _check_model(body, model)
    if ("prompt" in body) == ("messages" in body):
        raise ProtocolError('give either "prompt" (text) or "messages" (a conversation)', "prompt")
    special = _boolean(body, "add_special_tokens", True)
    if "messages" in body:
        if "add_special_tokens" in body:
            raise ProtocolError("add_special_tokens applies to a prompt; a conversation is tokenized as its chat "
                                "template renders it", "add_special_tokens")
        return _messages(body)[0], True, _template_kwargs(body), True
    if not isinstance(body["prompt"], str) or not body["prompt"]:
        raise ProtocolError(f"prompt must be a non-empty string, got {_show(body['prompt'])}", "prompt")
    return body["prompt"], False, None, special


def parse_detokenize(body, *, model: str, vocab_size: int) -> list[int]:
    """``POST /detokenize``'s body (vLLM's): ``{"tokens": [ids]}`` → the ids, each in the vocabulary."""
    if not isinstance(body, dict):
        raise ProtocolError(f"the request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - {"model", "tokens"})
    if unknown:
        raise ProtocolError(f"unsupported fields {unknown}; /detokenize reads model and tokens", unknown[0])
    _check_model(body, model)
    tokens = _token_ids(body.get("tokens"), "tokens")
    if tokens is None:
        raise ProtocolError("tokens is required: a list of token ids", "tokens")
    outside = [t for t in tokens if not 0 <= t < vocab_size]
    if outside:
        raise ProtocolError(f"tokens {outside[:5]} are outside the vocabulary (0..{vocab_size - 1})", "tokens")
    return tokens


def structured_output(body: dict):
    """The structured output a request asks for and the field that asks (a
    :class:`~dspark.structured.Grammar` and its name; ``(None, None)``): OpenAI's
    ``response_format`` (``text``, ``json_object``, ``json_schema``), vLLM's
    ``structured_outputs`` (``json``, ``regex``, ``choice``, ``grammar``, ``json_object``) or its
    older ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar`` — one of them."""
    given = [name for name in STRUCTURED_FIELDS if body.get(name) is not None]
    if len(given) > 1:
        raise ProtocolError(f"give one structured output at most, got {given}", given[1])
    if not given:
        return None, None
    grammar = _read_grammar(given[0], body[given[0]])
    return grammar, None if grammar is None else given[0]


def _read_grammar(name: str, value):
    """The :class:`~dspark.structured.Grammar` field ``name`` holds (``None``: plain text)."""
    from dspark.structured import Grammar

    asked = name  # (the field an error names)
    try:
        if name == "response_format":
            if not isinstance(value, dict) or value.get("type") not in ("text", "json_object", "json_schema"):
                raise ProtocolError('response_format must be {"type": "text" | "json_object" | "json_schema", ...}',
                                    name)
            if value["type"] == "text":
                return None
            if value["type"] == "json_object":
                return Grammar.json()
            spec = value.get("json_schema")
            if not isinstance(spec, dict) or "schema" not in spec:
                raise ProtocolError('response_format json_schema needs {"json_schema": {"name": ..., "schema": {...}}}',
                                    name)
            return Grammar.json_schema(spec["schema"])
        if name == "structured_outputs":
            kinds = {"json", "regex", "choice", "grammar", "json_object"}
            chosen = [k for k in kinds if isinstance(value, dict) and value.get(k) not in (None, False)]
            if not isinstance(value, dict) or set(value) - kinds - {"disable_any_whitespace"} or len(chosen) != 1:
                raise ProtocolError(f"structured_outputs must hold one of {sorted(kinds)} (and disable_any_whitespace)",
                                    name)
            kind, spec = chosen[0], value[chosen[0]]
            if kind == "json_object":
                return Grammar.json()
            if kind == "json":
                return Grammar.json_schema(spec, any_whitespace=not value.get("disable_any_whitespace", False))
            name, value = "guided_" + kind, spec
        if name == "guided_json":
            return Grammar.json_schema(value)
        if name == "guided_regex":
            return Grammar.regex(value)
        if name == "guided_choice":
            return Grammar.choice(value)
        return Grammar.ebnf(value)
    except ProtocolError:
        raise
    except (ValueError, TypeError) as err:
        raise ProtocolError(str(err), asked) from None


def _template_kwargs(body: dict) -> dict | None:
    value = body.get("chat_template_kwargs")
    if value is not None and not isinstance(value, dict):
        raise ProtocolError("chat_template_kwargs must be an object of template variables", "chat_template_kwargs")
    return value


def _check_model(body: dict, model: str) -> None:
    if body.get("model") is not None and body["model"] != model:
        raise ProtocolError(f"the model {body['model']!r} does not exist: this server serves {model!r}", "model", 404)


def _prompts(body: dict) -> list:
    """``prompt``: a string, a list of strings, a list of token ids, or a list of those lists."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [list(prompt)]
        if all(isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
               for p in prompt):
            return [list(p) for p in prompt]
    raise ProtocolError("prompt must be a string, a list of strings, a list of token ids or a list of such lists "
                        f"(none empty), got {_show(prompt)}", "prompt")


def _messages(body: dict) -> list:
    """``messages``: ``{"role", "content"}`` objects; a content may be a list of text parts."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ProtocolError(f"messages must be a non-empty list of {{'role': ..., 'content': ...}}, got {_show(messages)}",
                            "messages")
    conversation = []
    for j, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ProtocolError(f"messages[{j}] must be an object with a string 'role', got {_show(message)}", "messages")
        content = message.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                       for part in content):
                raise ProtocolError(f"messages[{j}].content: only text parts ({{'type': 'text', 'text': ...}}) are "
                                    "supported", "messages")
            content = "\n".join(part["text"] for part in content)  # (as vLLM joins them)
        if not isinstance(content, str):
            raise ProtocolError(f"messages[{j}].content must be a string or a list of text parts, got {_show(content)}",
                                "messages")
        conversation.append({"role": message["role"], "content": content})
    return [conversation]


def _logprobs(body: dict, chat: bool, max_logprobs: int) -> int | None:
    """How many likeliest tokens to list (``None``: no log-probabilities): completions' integer
    ``logprobs``, chat's boolean ``logprobs`` with ``top_logprobs``."""
    if chat:
        wanted = _boolean(body, "logprobs", False)
        top = _integer(body, "top_logprobs", 0, low=0)
        if top and not wanted:
            raise ProtocolError("top_logprobs needs logprobs=true", "top_logprobs")
        count, name = (top if wanted else None), "top_logprobs"
    else:
        count, name = (None if body.get("logprobs") is None else _integer(body, "logprobs", 0, low=0)), "logprobs"
    if count is None:
        return None
    if max_logprobs <= 0:
        raise ProtocolError("this server does not return log-probabilities: it was started with --max-logprobs 0",
                            "logprobs")
    if count > max_logprobs:
        raise ProtocolError(f"{name} must be at most {max_logprobs} (--max-logprobs), got {count}", name)
    return count


def _integer(body: dict, name: str, default: int, *, low: int, high: int | None = None) -> int:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ProtocolError(f"{name} must be an integer {bounds}, got {value!r}", name)
    return value


def _number(body: dict, name: str, default: float, *, low: float, high: float = math.inf,
            open_low: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            (low < value if open_low else low <= value) and value <= high and math.isfinite(value)):
        bounds = f"{'(' if open_low else '['}{low:g}, {high:g}]" if high < math.inf else f"{'>' if open_low else '>='} {low:g}"
        raise ProtocolError(f"{name} must be a number {'in ' if high < math.inf else ''}{bounds}, got {value!r}", name)
    return float(value)


def _boolean(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ProtocolError(f"{name} must be true or false, got {value!r}", name)
    return value


def _logit_bias(value) -> dict[int, float] | None:
    """``{"token id": bias}`` (JSON keys are strings; biases in [-100, 100], OpenAI's range) →
    ``{int: float}``."""
    if value is None:
        return None
    low, high = LOGIT_BIAS_RANGE
    number = lambda bias: isinstance(bias, (int, float)) and not isinstance(bias, bool) and low <= bias <= high  # noqa: E731
    if not isinstance(value, dict) or not all(
            isinstance(token, str) and token.isascii() and token.isdigit() and number(bias) for token, bias in value.items()):
        raise ProtocolError(f'logit_bias must map token ids to numbers in [{low:g}, {high:g}], e.g. {{"50256": -100}}, '
                            f"got {_show(value)}", "logit_bias")
    return {int(token): float(bias) for token, bias in value.items()}


def _token_ids(value, name: str) -> list[int] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise ProtocolError(f"{name} must be a list of token ids, got {_show(value)}", name)
    return value


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# responses ------------------------------------------------------------------------------------


def cut_at_stop(text: str, stops: list[str], include_stop: bool, after: int = 0) -> tuple[str, bool]:
    """``text`` up to its first stop string that ends past character ``after`` (with it when
    ``include_stop``), and whether one was found. A request ends on the token that completes a
    stop string; that token's text may go on past it, and the API returns the text before the
    stop. (``after``: with ``min_tokens``, the text of the tokens that could not complete one.)"""
    found = [(at, stop) for stop in stops if (at := text.find(stop, max(0, after - len(stop) + 1))) >= 0]
    if not found:
        return text, False
    at, stop = min(found)
    return text[:at + len(stop) if include_stop else at], True


class ChoiceText:
    """What a streamed choice may send: its text so far with the stop strings cut. Until the
    choice ends, the last ``len(longest stop) − 1`` characters wait (they may begin a stop
    string the next tokens complete); :meth:`finish` sends the rest, cut."""

    def __init__(self, stops: list[str], include_stop: bool):
        self.stops, self.include_stop = stops, include_stop
        self.hold = 0 if include_stop or not stops else max(len(s) for s in stops) - 1
        self.text, self.sent = "", 0

    def feed(self, piece: str) -> str:
        self.text += piece
        ready = max(self.sent, len(self.text) - self.hold)
        delta, self.sent = self.text[self.sent:ready], ready
        return delta

    def finish(self, piece: str, after: int = 0) -> str:
        """The rest of the text, cut at the stop string that ended the choice (one ending past
        character ``after``: :func:`cut_at_stop`)."""
        self.text += piece
        final, _ = cut_at_stop(self.text, self.stops, self.include_stop, after)
        delta, self.sent = final[self.sent:], max(self.sent, len(final))
        return delta


def logprobs_body(chat: bool, tokens: list[str], logprobs: list[float | None],
                  top: list[list[tuple] | None] | None, offset: int = 0,
                  raw: list[bytes | None] | None = None) -> dict:
    """A choice's ``logprobs`` object: chat's ``{"content": [{token, logprob, bytes, top_logprobs}]}``
    or completions' ``{tokens, token_logprobs, top_logprobs, text_offset}`` (``offset``: where
    these tokens' text starts in the choice's). Completions list the chosen token among the
    likeliest too, as OpenAI's do (up to ``k + 1`` entries); an echoed prompt's first token has
    ``None`` for both. Chat's ``bytes`` are each token's raw bytes where known (``raw``, and a
    third element of a ``top`` entry), else its text's UTF-8."""
    if chat:
        def entry(token, lp, data=None):
            return {"token": token, "logprob": lp, "bytes": list(token.encode("utf-8") if data is None else data)}

        raw = raw or [None] * len(tokens)
        return {"content": [{**entry(token, lp, data), "top_logprobs": [entry(*t) for t in (top[i] if top else [])]}
                            for i, (token, lp, data) in enumerate(zip(tokens, logprobs, raw))]}
    offsets, at = [], offset
    for token in tokens:
        offsets.append(at)
        at += len(token)
    if top is not None:
        top = [None if alternatives is None else {**{a[0]: a[1] for a in alternatives}, token: lp}
               for token, lp, alternatives in zip(tokens, logprobs, top)]
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": top, "text_offset": offsets}


def joined(first: dict, second: dict) -> dict:
    """Two completions ``logprobs`` objects one after the other (an echoed prompt's, then the
    generated tokens')."""
    top = None if first["top_logprobs"] is None else first["top_logprobs"] + second["top_logprobs"]
    return {"tokens": first["tokens"] + second["tokens"],
            "token_logprobs": first["token_logprobs"] + second["token_logprobs"], "top_logprobs": top,
            "text_offset": first["text_offset"] + second["text_offset"]}
