"""Chat templates: a list of {"role", "content"} messages -> one prompt text.

    load_chat_template(run_dir)             the run's own template (Hugging Face conventions), or None
    render_chat(messages, template, tok)    (prompt text, extra stop strings)

A run directory with a Hugging Face `tokenizer_config.json` holding a `chat_template` (or a
`chat_template.jinja` file) uses that Jinja template, rendered in a sandbox as transformers does
(`messages`, `add_generation_prompt=True`, `bos_token`, `eos_token`, `raise_exception`). Without
one, base models get the plain template below, with "\\nUser:" and "\\nSystem:" as stop strings so
the model's answer ends where it would start the user's next turn:

    System: {system message}
    User: {user message}
    Assistant: {assistant message}
    ...
    Assistant:

The server renders chat requests here; chat fine-tuning renders its training conversations the same way.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from ..errors import LmforgeError

PLAIN_CHAT_STOP = ["\nUser:", "\nSystem:"]
PLAIN_ROLE_NAMES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}


class ChatTemplateError(LmforgeError):
    """A chat template that cannot be read, or that refuses (or fails) to render these messages."""


def load_chat_template(run_dir: str | Path | None) -> str | None:
    """The run's own chat template (Hugging Face conventions), or None for the plain one.

    Looks for `chat_template.jinja`, then the `chat_template` field of `tokenizer_config.json` (a
    string, or a list of {"name", "template"} from which "default" is taken). Raises
    ChatTemplateError if tokenizer_config.json is not readable JSON.
    """
    if run_dir is None:
        return None
    run_dir = Path(run_dir)
    jinja = run_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    cfg = run_dir / "tokenizer_config.json"
    if cfg.is_file():
        try:
            template = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise ChatTemplateError(f"cannot read {cfg}: {e}") from None
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next(
                (t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None
            )
        return template if isinstance(template, str) else None
    return None


def render_plain(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The plain template for base models: "Role: content" lines, ending with "Assistant:"."""
    text = "\n".join(f"{PLAIN_ROLE_NAMES[m['role']]}: {m['content']}" for m in messages)
    return text + "\nAssistant:" if add_generation_prompt else text


def render_chat(
    messages: list[dict], template: str | None, tokenizer, add_generation_prompt: bool = True
) -> tuple[str, list[str]]:
    """(prompt text, extra stop strings) for a list of {"role", "content"} messages.

    template: Jinja source (from load_chat_template), or None for the plain template.
    add_generation_prompt: end with the start of the assistant's turn (False: just the conversation). Raises
    ChatTemplateError when the template does not compile or fails on these messages (including
    its own `raise_exception(...)`, which templates use to refuse, say, a missing user turn).
    """
    if template is None:
        return render_plain(messages, add_generation_prompt), list(PLAIN_CHAT_STOP)
    from jinja2 import TemplateError

    try:
        text = _compile(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token="", eos_token=tokenizer.eos_token
        )
    except TemplateError as e:
        raise ChatTemplateError(f"chat template: {e}") from None
    return text, []


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    """A Jinja template compiled in an immutable sandbox (templates cannot change the messages or reach Python)."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise TemplateError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise ChatTemplateError(f"chat template: {e}") from None
