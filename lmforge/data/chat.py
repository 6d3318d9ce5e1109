"""Chat templates: a list of {"role", "content"} messages -> one prompt text.

    load_chat_template(run_dir)             the run's own template (Hugging Face conventions), or None
    render_chat(messages, template, tok)    (prompt text, extra stop strings)
    encode_chat(messages, template, tok)    (prompt token ids, extra stop strings): the template's
                                            control tokens by id, the messages' text as text
    encode_rendered(...)                    the same with the text, each token's position and where each
                                            message lies in it (what server, fine-tuning and harness share)
    template_markers(template, tok)         the control-token texts a template writes around the messages

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

Text from users is text: a message that contains "<|im_end|>" or "<|endoftext|>" must not end its turn
or its document. So `encode_rendered` tells the template's text from the messages' text: it renders the
template a second time with a unique placeholder for each message's content, and where putting the
contents back into that rendering gives the real one, it knows exactly which characters came from
the messages. Special tokens are then read from the template's characters only; the messages' are
encoded as ordinary text. (A template that changes the content, say with `| trim`, defeats the
placeholders: then a message holding special-token text is refused, since it could not be kept apart.)

The server renders chat requests here; chat fine-tuning renders its training conversations, and the
benchmark harness its chat prompts, with the same function.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..errors import LmforgeError

PLAIN_CHAT_STOP = ["\nUser:", "\nSystem:"]
PLAIN_ROLE_NAMES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
MAX_REPEAT = 1_000_000  # items a template may build with one `*` (a string of a million characters)
MAX_POWER_BITS = 100_000  # size of a number a template may build with one `**`


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
    messages: list[dict],
    template: str | None,
    tokenizer,
    timeout: float | None = None,
    add_generation_prompt: bool = True,
) -> tuple[str, list[str]]:
    """(prompt text, extra stop strings) for a list of {"role", "content"} messages.

    template: Jinja source (from load_chat_template), or None for the plain template.
    add_generation_prompt: end with the start of the assistant's turn (False: just the conversation). Raises
    ChatTemplateError when the template does not compile or fails on these messages (including
    its own `raise_exception(...)`, which templates use to refuse, say, a missing user turn), or
    when rendering takes longer than timeout seconds (None: no limit).
    """
    return _render(messages, template, tokenizer, _deadline(timeout), add_generation_prompt)


def _deadline(timeout: float | None) -> _Deadline | None:
    return None if timeout is None else _Deadline(timeout)


def _render(
    messages: list[dict], template: str | None, tokenizer, deadline: _Deadline | None, add_generation_prompt=True
):
    if template is None:
        return render_plain(messages, add_generation_prompt), list(PLAIN_CHAT_STOP)
    from jinja2 import TemplateError

    compiled = _compile(template)
    try:
        with deadline or contextlib.nullcontext():
            text = compiled.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token="",
                eos_token=tokenizer.eos_token,
            )
    except TemplateError as e:
        raise ChatTemplateError(f"chat template: {e}") from None
    except (RecursionError, MemoryError) as e:  # a macro calling itself for ever, or a huge build-up
        raise ChatTemplateError(f"chat template: {type(e).__name__} while rendering") from None
    return text, []


class _Deadline:
    """A time limit for rendering templates, checked while they run (a Jinja template is compiled Python).

    Inside `with`, a trace function on this thread looks at the clock at every function call and at
    every line of the template's own code, so even loops that call nothing are stopped in time; it
    raises ChatTemplateError into the template once the limit is past. One limit covers every render
    done with the same object.
    """

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def __enter__(self):
        self.previous = sys.gettrace()
        sys.settrace(self._on_call)

    def __exit__(self, *exc):
        sys.settrace(self.previous)

    def _on_call(self, frame, event, arg):
        self._check()
        return self._on_line if frame.f_code.co_filename == "<template>" else None

    def _on_line(self, frame, event, arg):
        self._check()
        return self._on_line

    def _check(self):
        if time.monotonic() > self.end:
            raise ChatTemplateError(f"chat template took longer than {self.seconds:g} s to render these messages")


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    """A Jinja template compiled in an immutable sandbox (templates cannot change the messages or reach Python)."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

    def raise_exception(msg):
        raise TemplateError(msg)

    class Sandbox(ImmutableSandboxedEnvironment):
        # Jinja's sandbox already caps range(); these two can also build something huge in one C call,
        # which no time limit interrupts: "x" * 10**10, 10 ** 10**8.
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_REPEAT:
                        raise SecurityError(f"the template repeats a sequence to more than {MAX_REPEAT} items")
            if operator == "**" and isinstance(left, int) and isinstance(right, int):
                if abs(left) > 1 and right * abs(left).bit_length() > MAX_POWER_BITS:
                    raise SecurityError("the template raises a number to a power too large")
            return super().call_binop(context, operator, left, right)

    env = Sandbox(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise ChatTemplateError(f"chat template: {e}") from None


def encode_chat(
    messages: list[dict], template: str | None, tokenizer, timeout: float | None = None
) -> tuple[list[int], list[str]]:
    """(prompt token ids, extra stop strings) for messages: the template's control tokens by id, message text as text.

    Raises ChatTemplateError as render_chat does (timeout: seconds for all the rendering this needs),
    and when a message holds special-token text that the template transforms (so its place in the
    rendered prompt cannot be told from the template's own).
    """
    enc = encode_rendered(messages, template, tokenizer, True, timeout)
    return enc.ids, enc.stop


@dataclass
class EncodedChat:
    """Messages rendered by a template and encoded: control tokens by id, message text as text.

    text: the rendered text. ids: its token ids; starts[k]: the character of text where token k begins.
    spans: (start, end, message index) of each place a message's content lies in text, in order (a template
    may repeat a message); None when they cannot be known (the template changes the content). stop: extra stop
    strings of the template (the plain template's)."""

    text: str
    ids: list[int]
    starts: list[int]
    spans: list[tuple[int, int, int]] | None
    stop: list[str]


def encode_rendered(
    messages: list[dict],
    template: str | None,
    tokenizer,
    add_generation_prompt: bool = True,
    timeout: float | None = None,
) -> EncodedChat:
    """Render messages with template (None: the plain template) and encode the text (see the module docstring).

    Special tokens are read from the template's own characters only (inserted by id); the messages' characters
    are ordinary text; the plain template has no control tokens. Raises ChatTemplateError as render_chat does
    (timeout: seconds for all the rendering this needs), and when a message holds special-token text that the
    template transforms (so its place in the rendered text cannot be told from the template's own)."""
    deadline = _deadline(timeout)
    text, stop = _render(messages, template, tokenizer, deadline, add_generation_prompt)
    spans = _message_spans(messages, template, tokenizer, text, deadline, add_generation_prompt)
    specials = special_tokens(tokenizer) if template is not None else {}
    if spans is None:
        held = [t for m in messages for t in specials if t in m["content"]]
        if held:
            raise ChatTemplateError(
                f"a message contains the special token text {held[0]!r} and this chat template rewrites message "
                "text, so it cannot be kept apart from the template's own control tokens"
            )
    ids, starts = _encode_outside(text, [s[:2] for s in spans or []], specials, tokenizer)
    return EncodedChat(text, ids, starts, spans, stop)


# What a control token of a chat template looks like: <|im_start|>, <|user|> (ChatML, Phi, Llama 3), <start_of_turn>,
# </s> (Gemma, Llama 2), [INST], [/INST] (Mistral). Names up to 64 characters, no spaces.
MARKER = re.compile(r"<\|[^\s<>|]{1,64}\|>|</?[A-Za-z][\w.:-]{0,63}>|\[/?[A-Z][A-Z_]{0,63}\]")
_PROBES = (  # conversations a template is rendered on to find its markers (some templates refuse a system turn)
    ("system", "user", "assistant", "user", "assistant"),
    ("user", "assistant", "user", "assistant"),
)


def template_markers(template: str, tokenizer) -> list[str]:
    """The control-token texts a chat template writes around the messages, in order of first appearance.

    The template is rendered on a few probe conversations (with and without the generation prompt) whose
    contents are placeholders, so only the template's own characters are searched; a marker is a piece of
    them shaped like MARKER (`<|name|>`, `<name>`, `</name>`, `[NAME]`, `[/NAME]`). Probes the template refuses
    are skipped. Text the template writes that has another shape (a role name, a newline) stays text."""
    found: dict[str, None] = {}
    for roles in _PROBES:
        messages = [{"role": r, "content": h} for r, h in zip(roles, _holders(len(roles)))]
        for add_generation_prompt in (True, False):
            try:
                text, _ = _render(messages, template, tokenizer, None, add_generation_prompt)
            except ChatTemplateError:
                continue
            for piece in _HOLDER.split(text)[::2]:  # the template's own text, between the placeholders
                found.update(dict.fromkeys(MARKER.findall(piece)))
    return list(found)


def special_tokens(tokenizer) -> dict[str, int]:
    """{text: id} of the tokenizer's special (control) tokens."""
    return {t.content: i for i, t in tokenizer.hf.get_added_tokens_decoder().items() if t.special and t.content}


# Placeholders for message contents while rendering: private-use characters around a per-process random tag.
_TAG = uuid.uuid4().hex
_HOLDER = re.compile(f"(\ue000{_TAG}:\\d+\ue001)")


def _holders(n: int) -> list[str]:
    return [f"\ue000{_TAG}:{i}\ue001" for i in range(n)]


def _message_spans(
    messages: list[dict],
    template: str | None,
    tokenizer,
    text: str,
    deadline: _Deadline | None,
    add_generation_prompt: bool = True,
) -> list[tuple[int, int, int]] | None:
    """(start, end, message index) of each place the messages' content lies in the rendered text, in order; None
    if it cannot be known.

    Renders again with a unique placeholder per message; putting each content back where its placeholder
    landed must give `text` exactly, which also shows the template used the content unchanged.
    """
    holders = _holders(len(messages))
    try:
        marked, _ = _render(
            [{**m, "content": h} for m, h in zip(messages, holders)],
            template,
            tokenizer,
            deadline,
            add_generation_prompt,
        )
    except ChatTemplateError:  # the template looks into the content (and refuses a placeholder)
        if deadline is not None:
            deadline._check()  # (but out of time is out of time)
        return None
    index = {h: i for i, h in enumerate(holders)}
    rebuilt, spans, pos = [], [], 0
    for piece in _HOLDER.split(marked):
        i = index.get(piece)
        if i is not None:
            piece = messages[i]["content"]
            spans.append((pos, pos + len(piece), i))
        rebuilt.append(piece)
        pos += len(piece)
    return spans if "".join(rebuilt) == text else None


def _encode_outside(
    text: str, spans: list[tuple[int, int]], specials: dict[str, int], tokenizer
) -> tuple[list[int], list[int]]:
    """(ids, start character of each id) of text, with special tokens read only outside spans (which, like all text
    between special tokens, are encoded as plain text)."""
    ids: list[int] = []
    starts: list[int] = []

    def plain(a: int, b: int) -> None:
        if a < b:
            piece_ids, piece_starts = tokenizer.encode_offsets(text[a:b])
            ids.extend(piece_ids)
            starts.extend(a + s for s in piece_starts)

    plain_from = 0  # start of the text not yet encoded
    if specials:
        pattern = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))
        bounds = [0] + [b for span in spans for b in span] + [len(text)]
        for k in range(0, len(bounds), 2):  # template pieces: bounds[k]..bounds[k+1]; messages lie between them
            for m in pattern.finditer(text, bounds[k], bounds[k + 1]):
                plain(plain_from, m.start())
                ids.append(specials[m.group()])
                starts.append(m.start())
                plain_from = m.end()
    plain(plain_from, len(text))
    return ids, starts
