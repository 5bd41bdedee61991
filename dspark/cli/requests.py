"""What a request may set beyond the flags, shared by ``dspark generate`` (a ``--prompts-file``
line) and ``dspark serve`` (a request line): the settings a line may carry, its structured output,
JSON's string keys read as token ids; and the chat-template options of both commands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def line_grammar(record: dict):
    """A JSON line's structured output (its ``response_format``, ``structured_outputs`` or
    ``guided_*`` field, read as the OpenAI server reads it), or ``None``."""
    from dspark.serving.protocol import structured_output

    return structured_output(record)[0]


#: what a line of ``--prompts-file`` may set for its own request (besides ``max_new_tokens``)
LINE_SETTINGS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty", "no_repeat_ngram_size", "logit_bias", "seed", "stop", "stop_token_ids",
                 "min_new_tokens", "ignore_eos")


def chat_template_options(args: argparse.Namespace, command: str) -> tuple[str | None, dict | None]:
    """``--chat-template FILE``'s text and ``--chat-template-kwargs``' JSON object (``None`` when not
    given); a missing file or a value that is not a JSON object ends the command, naming it."""
    template = kwargs = None
    if args.chat_template is not None:
        if not Path(args.chat_template).is_file():
            raise SystemExit(f"dspark {command}: --chat-template {args.chat_template} is not a file")
        template = Path(args.chat_template).read_text(encoding="utf-8")
    if args.chat_template_kwargs is not None:
        try:
            kwargs = json.loads(args.chat_template_kwargs)
        except ValueError as err:
            raise SystemExit(f"dspark {command}: --chat-template-kwargs is not JSON: {err}") from None
        if not isinstance(kwargs, dict):
            raise SystemExit(f"dspark {command}: --chat-template-kwargs must be a JSON object, e.g. "
                             "'{\"enable_thinking\": false}'")
    return template, kwargs


def token_keyed(value, where: str) -> dict[int, float]:
    """A JSON object ``{"token id": bias}`` with its keys read as token ids (``where`` names it in errors)."""
    try:
        return keys_as_token_ids(value)
    except ValueError as err:
        raise SystemExit(f"dspark generate: {where} must be a JSON object {{token id: bias}}, got {value!r} ({err})") from None


def keys_as_token_ids(value) -> dict[int, float]:
    """A JSON object's keys (strings) read as token ids (``ValueError`` if they are not)."""
    if not isinstance(value, dict):
        raise ValueError("not an object")
    return {int(token): bias for token, bias in value.items()}


def listed_stops(name: str, value):
    """A line's ``stop`` / ``stop_token_ids``: a single string or id as a list of one."""
    return [value] if name in ("stop", "stop_token_ids") and isinstance(value, (str, int)) else value
