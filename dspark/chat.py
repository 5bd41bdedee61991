"""Chat prompts: conversations rendered by the tokenizer's chat template, ready for ``generate``.

A conversation is a list of messages ``{"role": "system" | "user" | "assistant" | ..., "content":
"..."}``. Rendering appends the template's generation prompt (the opening of the assistant's
turn), so what the model generates is the assistant's reply. The template is the tokenizer's own
(``tokenizer.chat_template``, shipped with instruct checkpoints) or one given per call.
"""

from __future__ import annotations


def check_conversations(conversations) -> list[list[dict]]:
    """``conversations`` as a list of non-empty lists of ``{"role": str, "content": str}`` messages;
    anything else raises ``TypeError`` / ``ValueError`` naming the conversation and message."""
    if not isinstance(conversations, (list, tuple)):
        raise TypeError("conversations must be a list of conversations, each a list of messages "
                        f"{{'role': ..., 'content': ...}}; got {type(conversations).__name__}")
    if not conversations:
        raise ValueError("conversations is empty: give at least one conversation")
    for i, conversation in enumerate(conversations):
        if not isinstance(conversation, (list, tuple)) or not conversation:
            raise ValueError(f"conversation {i} must be a non-empty list of messages {{'role': ..., 'content': ...}}")
        for j, message in enumerate(conversation):
            if (not isinstance(message, dict) or not isinstance(message.get("role"), str)
                    or not isinstance(message.get("content"), str)):
                raise ValueError(f"conversation {i}, message {j}: each message needs a string 'role' and a "
                                 f"string 'content', got {message!r}")
    return [list(conversation) for conversation in conversations]


def render_conversations(tokenizer, conversations, chat_template: str | None = None,
                         chat_template_kwargs: dict | None = None) -> list[list[int]]:
    """Token ids of each conversation rendered with the generation prompt appended.

    Args:
        tokenizer: a ``transformers`` tokenizer.
        conversations: as :func:`check_conversations` accepts.
        chat_template: a Jinja chat template to use instead of ``tokenizer.chat_template``.
        chat_template_kwargs: more variables for the template, e.g. ``{"enable_thinking": False}``
            for Qwen3's (the non-thinking mode DeepSeek's released drafters were trained on).
    """
    if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, dict):
        raise TypeError(f"chat_template_kwargs must be a dict of template variables, e.g. {{'enable_thinking': False}}, "
                        f"got {type(chat_template_kwargs).__name__}")
    if chat_template is not None and (not isinstance(chat_template, str) or not chat_template.strip()):
        raise TypeError(f"chat_template must be a Jinja template (a non-empty string), got {chat_template!r:.60}")
    kwargs = dict(chat_template_kwargs or {})
    if not all(isinstance(k, str) for k in kwargs):
        raise TypeError(f"chat_template_kwargs must map variable names to values, got keys {list(kwargs)}")
    reserved = sorted(set(kwargs) & {"conversation", "messages", "chat_template", "add_generation_prompt", "tokenize",
                                     "return_dict"})
    if reserved:
        raise ValueError(f"chat_template_kwargs may not set {reserved}: dspark sets them (the conversation, the "
                         "template, the generation prompt, token ids)")
    if tokenizer is None:
        raise ValueError("chat needs a tokenizer: this pipeline has none (target.tokenizer)")
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError("this tokenizer has no chat template (tokenizer.chat_template): pass chat_template=... "
                         "(a Jinja template; dspark generate --chat-template FILE), or call generate() with plain "
                         "prompts")
    from jinja2 import TemplateError

    prompts = []
    for i, conversation in enumerate(check_conversations(conversations)):
        try:
            rendered = tokenizer.apply_chat_template(conversation, chat_template=chat_template,
                                                     add_generation_prompt=True, tokenize=True, return_dict=True,
                                                     **kwargs)
        except TemplateError as err:  # a template's raise_exception ("System role not supported", ...)
            raise ValueError(f"the chat template refused conversation {i}: {err}") from None
        prompts.append(list(rendered["input_ids"]))
    return prompts
