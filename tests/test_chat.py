"""Chat prompts: conversations rendered by a chat template, then generated like any prompt."""

import pytest

import dspark
from dspark.chat import check_conversations, render_conversations

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
CONVERSATIONS = [[{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Add two numbers."}],
                 [{"role": "user", "content": "Name a river."}]]


@pytest.fixture(scope="module")
def pipe():
    return dspark.build_pipeline("ar", overrides=["target.device=cpu"])


def test_chat_generates_from_the_rendered_conversation(pipe):
    """The reply is what generate() gives for the rendered text, whose end opens the assistant's turn."""
    prompts = render_conversations(pipe.tokenizer, CONVERSATIONS, TEMPLATE)
    assert pipe.tokenizer.decode(prompts[0]) == "<|system|>You write Python.\n<|user|>Add two numbers.\n<|assistant|>"
    assert prompts[1] == pipe.tokenizer("<|user|>Name a river.\n<|assistant|>")["input_ids"]
    reply = pipe.chat(CONVERSATIONS, chat_template=TEMPLATE, max_new_tokens=8, temperature=1.0, seed=3)
    plain = pipe.generate(prompts, max_new_tokens=8, temperature=1.0, seed=3)
    assert reply.token_ids == plain.token_ids and reply.texts == plain.texts


def test_the_tokenizers_own_template_is_used(pipe, monkeypatch):
    monkeypatch.setattr(pipe.tokenizer, "chat_template", TEMPLATE, raising=False)
    assert render_conversations(pipe.tokenizer, CONVERSATIONS) == render_conversations(pipe.tokenizer, CONVERSATIONS,
                                                                                       TEMPLATE)


def test_bad_conversations_are_refused_naming_the_problem(pipe, monkeypatch):
    monkeypatch.setattr(pipe.tokenizer, "chat_template", None, raising=False)
    with pytest.raises(ValueError, match="no chat template"):
        pipe.chat(CONVERSATIONS, max_new_tokens=4)
    with pytest.raises(TypeError, match="list of conversations"):
        check_conversations("hello")
    with pytest.raises(ValueError, match="conversation 0 must be a non-empty list"):
        check_conversations([[]])
    with pytest.raises(ValueError, match="conversation 1, message 0: each message needs a string 'role'"):
        check_conversations([[{"role": "user", "content": "hi"}], [{"content": "no role"}]])
    with pytest.raises(ValueError, match="message 1: .*string 'content'"):
        check_conversations([[{"role": "user", "content": "hi"}, {"role": "user", "content": 3}]])
    with pytest.raises(ValueError, match="chat needs a tokenizer"):
        render_conversations(None, CONVERSATIONS, TEMPLATE)
    with pytest.raises(ValueError, match="max_new_tokens"):  # generate's own checks still apply
        pipe.chat(CONVERSATIONS, chat_template=TEMPLATE, max_new_tokens=0)


def test_chat_template_kwargs_reach_the_template(pipe):
    """Extra template variables (Qwen3's enable_thinking) render; dspark's own arguments stay its own."""
    template = TEMPLATE.replace("<|assistant|>{% endif %}",
                                "<|assistant|>{% if enable_thinking is defined and not enable_thinking %}"
                                "<think></think>{% endif %}{% endif %}")
    plain = render_conversations(pipe.tokenizer, CONVERSATIONS[1:], template)
    quiet = render_conversations(pipe.tokenizer, CONVERSATIONS[1:], template, {"enable_thinking": False})
    assert pipe.tokenizer.decode(quiet[0]) == pipe.tokenizer.decode(plain[0]) + "<think></think>"
    reply = pipe.chat(CONVERSATIONS[1:], chat_template=template, chat_template_kwargs={"enable_thinking": False},
                      max_new_tokens=6, temperature=1.0, seed=2)
    assert reply.token_ids == pipe.generate(quiet, max_new_tokens=6, temperature=1.0, seed=2).token_ids
    with pytest.raises(ValueError, match=r"chat_template_kwargs may not set \['add_generation_prompt'\]"):
        render_conversations(pipe.tokenizer, CONVERSATIONS, template, {"add_generation_prompt": False})
    with pytest.raises(TypeError, match="chat_template_kwargs must be a dict of template variables"):
        render_conversations(pipe.tokenizer, CONVERSATIONS, template, "enable_thinking")
    with pytest.raises(TypeError, match="chat_template_kwargs must be a dict"):
        render_conversations(pipe.tokenizer, CONVERSATIONS, template, [("enable_thinking", False)])
    for bad in (123, "", "  "):
        with pytest.raises(TypeError, match="chat_template must be a Jinja template"):
            render_conversations(pipe.tokenizer, CONVERSATIONS, bad)
