"""Chat templates: loading a run's template, rendering messages (plain and Jinja), template errors."""

import json

import pytest

from lmforge.data.chat import ChatTemplateError, load_chat_template, render_chat
from lmforge.errors import LmforgeError

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_plain_template(small_tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "developer", "content": "x"},
    ]
    text, stop = render_chat(messages, None, small_tokenizer)
    assert text == "System: Be brief.\nUser: hi\nAssistant: hello\nSystem: x\nAssistant:"
    assert stop == ["\nUser:", "\nSystem:"]


def test_jinja_template(small_tokenizer):
    text, stop = render_chat([{"role": "user", "content": "hi"}], CHATML, small_tokenizer)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n" and stop == []
    eos = render_chat([{"role": "user", "content": "a"}], "{{ messages[0].content }}{{ eos_token }}", small_tokenizer)
    assert eos[0] == "a<|endoftext|>"


@pytest.mark.parametrize(
    "template,fragment",
    [
        ("{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system turn first') }}{% endif %}", "first"),
        ("{% for m in messages %}", "end of template"),  # does not compile
        ("{{ messages.append(1) }}", "chat template"),  # the sandbox keeps the messages immutable
    ],
)
def test_template_errors_are_lmforge_errors(small_tokenizer, template, fragment):
    with pytest.raises(ChatTemplateError) as e:
        render_chat([{"role": "user", "content": "hi"}], template, small_tokenizer)
    assert isinstance(e.value, LmforgeError) and fragment in str(e.value)


def test_load_chat_template(tmp_path):
    assert load_chat_template(None) is None and load_chat_template(tmp_path) is None
    cfg = tmp_path / "tokenizer_config.json"
    cfg.write_text(json.dumps({"chat_template": CHATML}))
    assert load_chat_template(tmp_path) == CHATML
    cfg.write_text(
        json.dumps({"chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "y"}]})
    )
    assert load_chat_template(tmp_path) == "y"
    cfg.write_text(json.dumps({"chat_template": 5}))
    assert load_chat_template(tmp_path) is None
    (tmp_path / "chat_template.jinja").write_text("{{ messages }}")  # the separate file wins
    assert load_chat_template(tmp_path) == "{{ messages }}"
    (tmp_path / "chat_template.jinja").unlink()
    cfg.write_text("{oops")
    with pytest.raises(ChatTemplateError):
        load_chat_template(tmp_path)
