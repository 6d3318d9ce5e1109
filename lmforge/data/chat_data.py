"""Chat fine-tuning data: conversations in, token ids with a trained-token mask out, packed into windows.

    read_conversations(path)         .jsonl ({"messages": [...]} per line) or .parquet (a `messages` column);
                                     invalid conversations are reported by line (row) number and left out
    chat_demo(name)                  a built-in generated chat task (train / val / test conversations)
    DEFAULT_TEMPLATE                 the template of runs that have none; its role markers are special tokens
    add_template_tokens(tok, tmpl)   makes a template's markers special tokens of a tokenizer
    encode_conversation(...)         (ids, trained) of one conversation: what fine-tuning learns from
    encode_prompt(...)               the ids a model is given to answer messages (what a server sends it)
    pack(examples, seq_len, pack)    Windows: conversations packed several per row, or one per row, padded

Text from users is text: conversations are rendered and encoded by `chat.encode_rendered`, the same
function the server uses, so the template's control tokens are inserted by id and a message holding
"<|user|>" gets the characters "<|user|>", never the control token.

Which tokens are trained: for the i-th message, if it is the assistant's, the text that rendering
messages[:i+1] adds to the generation prompt of messages[:i] -- its reply and the end of its turn, as
a server would see the model produce them -- or, for a template without that prefix property, the
reply's own characters. With train_on="all" every token is trained.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .chat import ChatTemplateError, encode_chat, encode_rendered, render_chat, special_tokens, template_markers
from .pairs import IGNORE

ROLES = ("system", "user", "assistant")
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

# Each turn: its role marker (a special token), a newline, the text, then the end-of-text token, which also
# ends the model's replies (generation stops there); a generation prompt is the assistant's marker and newline.
DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{% set role = 'system' if message['role'] == 'developer' else message['role'] %}"
    "{% if role not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + role) }}"
    "{% endif %}"
    "{{ '<|' + role + '|>\n' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


class ChatDataError(ChatTemplateError):
    """Chat data that cannot be used (no valid conversation, an unreadable file)."""


# --- reading ----------------------------------------------------------------------------------------


def check_conversation(obj) -> list[dict]:
    """The messages of one conversation ({"messages": [{"role", "content"}, ...]}), or ValueError saying what is wrong.

    Roles are system, user and assistant; contents are strings; at least one assistant message."""
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
        raise ValueError('expected an object with a "messages" list')
    messages = obj["messages"]
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f'message {k}: expected {{"role": system|user|assistant, "content": string}}')
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant message")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_conversations(path: str | Path, log=print) -> list[list[dict]]:
    """Conversations from a .jsonl file (one {"messages": [...]} per line; blank lines skipped) or a .parquet
    file with a `messages` column (a list of {role, content} structs, or JSON text, per row).

    Invalid conversations are left out and reported in one line (their count and first line numbers, 1-based);
    raises ChatDataError when the file is missing or unreadable or holds no valid conversation."""
    path = Path(path)
    if not path.is_file():
        raise ChatDataError(f"chat data not found: {path}")
    good, bad = [], []
    for where, obj, error in _records(path):
        try:
            if error:
                raise ValueError(error)
            good.append(check_conversation(obj))
        except ValueError as e:
            bad.append(f"{where}: {e}")
    if bad:
        log(f"warning: {path}: skipped {len(bad)} invalid conversation(s): " + "; ".join(bad[:3]))
    if not good:
        raise ChatDataError(f"{path} has no valid conversation ({len(bad)} invalid)")
    return good


def _records(path: Path):
    """(where, object, error) for each record of a chat file."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq

            column = pq.read_table(path, columns=["messages"]).column("messages").to_pylist()
        except ImportError:
            raise ChatDataError("reading .parquet needs pyarrow (pip install pyarrow)") from None
        except Exception as e:  # pyarrow raises its own error kinds for a missing column or a corrupt file
            raise ChatDataError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
        for i, messages in enumerate(column, 1):
            if isinstance(messages, str):
                try:
                    messages = json.loads(messages)
                except json.JSONDecodeError as e:
                    yield f"row {i}", None, f"invalid JSON ({e.msg})"
                    continue
            yield f"row {i}", {"messages": messages}, None
        return
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ChatDataError(f"{path} is not UTF-8 text: {e}") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield f"line {i}", json.loads(line), None
        except json.JSONDecodeError as e:
            yield f"line {i}", None, f"invalid JSON ({e.msg})"


def split_conversations(conversations: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """(train, val): a seeded shuffle, then at least one (and a val_fraction share) held out for validation."""
    order = list(conversations)
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(order) * val_fraction)) if len(order) > 1 else 0
    return order[n_val:], order[:n_val]


@dataclass
class ChatSource:
    """What `lmforge finetune` trains on: the base run, the conversations (a file or a built-in demo), the chat
    template (Jinja source from --chat-template; None = the base run's own, else DEFAULT_TEMPLATE) and its
    markers (from --chat-token; None = found in the template)."""

    base: Path
    data: Path | None = None
    demo: str | None = None
    template: str | None = None
    markers: list[str] | None = None

    def conversations(self, val_fraction: float, seed: int, log=print) -> tuple[list, list]:
        """(train, val) conversations: the demo's splits, or the file's, split by a seeded shuffle."""
        if self.demo is not None:
            return chat_demo(self.demo, "train"), chat_demo(self.demo, "val")
        return split_conversations(read_conversations(self.data, log), val_fraction, seed)


# --- a built-in demo --------------------------------------------------------------------------------

# Instructions the demo's assistant follows on a few letters; a reply is a function of the user's message.
_SKILLS = {
    "repeat": lambda s: " ".join(s),
    "reverse": lambda s: " ".join(reversed(s)),
    "first": lambda s: s[0],
    "last": lambda s: s[-1],
    "count": lambda s: str(len(s)),
}
_SYSTEM = "You are a careful assistant. Answer with the result only."


def _skill_exchange(rng: random.Random) -> tuple[str, str]:
    skill = rng.choice(sorted(_SKILLS))
    letters = [chr(ord("a") + rng.randrange(26)) for _ in range(rng.randint(3, 6))]
    return f"{skill.capitalize()}: {' '.join(letters)}", _SKILLS[skill](letters)


def _skills(rng: random.Random) -> list[dict]:
    """One to three user/assistant exchanges, sometimes after a system message."""
    messages = [{"role": "system", "content": _SYSTEM}] if rng.random() < 0.3 else []
    for _ in range(rng.choice((1, 1, 2, 3))):
        user, reply = _skill_exchange(rng)
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return messages


_COLORS = {
    "apple": "red", "banana": "yellow", "lime": "green", "plum": "purple", "orange": "orange", "cherry": "red",
    "lemon": "yellow", "grass": "green", "sky": "blue", "snow": "white", "coal": "black", "cloud": "white",
    "carrot": "orange", "ocean": "blue", "leaf": "green", "tomato": "red", "grape": "purple", "crow": "black",
}  # fmt: skip


def _colors(rng: random.Random) -> list[dict]:
    """One to three questions about the colour of things, sometimes after a system message."""
    messages = [{"role": "system", "content": "Answer in one word."}] if rng.random() < 0.3 else []
    for _ in range(rng.choice((1, 2, 3))):
        thing = rng.choice(sorted(_COLORS))
        messages += [
            {"role": "user", "content": f"What color is {thing}?"},
            {"role": "assistant", "content": _COLORS[thing]},
        ]
    return messages


# name -> (description, generator, conversations drawn, what decides a conversation's split)
CHAT_DEMOS = {
    "colors": (
        "answer the colour of 18 things (7 colours) in conversations of 1-3 questions; held-out conversations "
        "are new combinations of the same facts",
        _colors,
        6_000,
        lambda conv: json.dumps(conv),
    ),
    "skills": (
        "follow one of five instructions on a few letters (Repeat, Reverse, First, Last, Count), 1-3 turns; "
        "held-out conversations end with questions never seen in training",
        _skills,
        10_000,
        lambda conv: conv[-2]["content"],
    ),
}


def chat_demo(name: str, split: str) -> list[list[dict]]:
    """The 'train', 'val' or 'test' conversations of a demo (the same on every machine). A conversation goes to
    a split by a hash of its key (skills: the last user message, so no held-out final question was seen in
    training; colors: the whole conversation). Held-out splits hold each distinct conversation once, so a
    majority answer cannot score by repetition."""
    if name not in CHAT_DEMOS:
        raise ChatDataError(f"unknown chat demo {name!r}; available: {', '.join(CHAT_DEMOS)}")
    _, make, size, key_of = CHAT_DEMOS[name]
    rng = random.Random(f"lmforge-chat-demo-{name}")
    out, seen = [], set()
    for _ in range(size):
        conv = make(rng)
        key = key_of(conv).encode()
        bucket = int.from_bytes(hashlib.sha256(key).digest()[:4], "little") % 20
        if not {"train": bucket > 1, "val": bucket == 1, "test": bucket == 0}[split]:
            continue
        if split != "train":  # held-out splits count each conversation once (short ones are drawn many times)
            whole = json.dumps(conv)
            if whole in seen:
                continue
            seen.add(whole)
        out.append(conv)
    return out


# --- tokens -----------------------------------------------------------------------------------------


def add_template_tokens(tokenizer, template: str, markers: list[str] | None = None) -> list[str]:
    """Make a chat template's markers special tokens of tokenizer: new ids after the existing ones, in order.

    markers: the marker texts, or None to find them in the template (`chat.template_markers`: the `<|name|>`,
    `<name>`, `[NAME]`-shaped pieces of what it writes around the messages). Returns the markers that were not
    special tokens already ([] when the tokenizer has them all). Message text holding a marker's characters stays
    text (`chat.encode_rendered`)."""
    from tokenizers import AddedToken

    if markers is None:
        markers = template_markers(template, tokenizer)
    specials = special_tokens(tokenizer)
    new = [t for t in dict.fromkeys(markers) if t and t not in specials]
    if new:
        tokenizer.hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in new])
    return new


def encode_prompt(messages: list[dict], template: str | None, tokenizer) -> list[int]:
    """Token ids a model is given to reply to messages: the template with its generation prompt, control tokens
    by id, message text as text (template None: the plain template, all text). The server's encoding
    (`chat.encode_chat`); a prefix of what `encode_conversation` gives for the conversation with the reply.
    Raises ChatTemplateError when the template refuses the messages."""
    return encode_chat(messages, template, tokenizer)[0]


def encode_conversation(
    messages: list[dict], template: str, tokenizer, train_on: str = "assistant"
) -> tuple[list[int], list[bool]]:
    """(ids, trained): the whole conversation's token ids and, for each, whether training predicts it.

    train_on "assistant": the assistant's replies and the end of their turns (see the module docstring);
    "all": every token. Raises ChatTemplateError when the template refuses the messages."""
    enc = encode_rendered(messages, template, tokenizer, add_generation_prompt=False)
    if train_on == "all":
        return enc.ids, [True] * len(enc.ids)
    regions = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render_chat(messages[:i], template, tokenizer)[0] if i else ""
        upto = render_chat(messages[: i + 1], template, tokenizer, add_generation_prompt=False)[0]
        if enc.text.startswith(upto) and upto.startswith(prompt):
            regions.append((len(prompt), len(upto)))
        else:
            regions += [(a, b) for a, b, k in enc.spans or [] if k == i]
    trained = [any(a <= s < b for a, b in regions) for s in enc.starts]
    return enc.ids, trained


# --- windows ----------------------------------------------------------------------------------------


@dataclass
class Windows:
    """Training rows: inputs, labels (IGNORE where nothing is trained) and segment ids, each (N, seq_len) int64.

    `lengths` (N,): tokens used in each row (the rest is padding, in a segment of its own)."""

    x: torch.Tensor
    y: torch.Tensor
    segments: torch.Tensor
    lengths: torch.Tensor

    def __len__(self) -> int:
        return len(self.x)

    @property
    def predicted(self) -> int:
        """Number of trained (not IGNORE) label positions in all rows."""
        return int((self.y != IGNORE).sum())

    def rows(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x, y, segments) of rows `index`, cut to the longest used length among them."""
        width = int(self.lengths[index].max())
        return self.x[index, :width], self.y[index, :width], self.segments[index, :width]


def examples(conversations, template, tokenizer, train_on: str, seq_len: int) -> tuple[list, int, int]:
    """([(inputs, labels), ...], truncated, dropped): each conversation as inputs ids[:-1] and labels ids[1:]
    (IGNORE where not trained), cut to seq_len tokens. `truncated` counts conversations that were longer;
    `dropped` those left with nothing to train on (all of it past seq_len)."""
    out, truncated, dropped = [], 0, 0
    for messages in conversations:
        ids, trained = encode_conversation(messages, template, tokenizer, train_on)
        if len(ids) > seq_len + 1:
            truncated += 1
            ids, trained = ids[: seq_len + 1], trained[: seq_len + 1]
        labels = [t if ok else IGNORE for t, ok in zip(ids[1:], trained[1:])]
        if all(t == IGNORE for t in labels):
            dropped += 1
            continue
        out.append((ids[:-1], labels))
    return out, truncated, dropped


def pack(examples: list, seq_len: int, pad_id: int, pack: bool = True) -> Windows:
    """Windows of seq_len tokens. pack: consecutive examples share a row while they fit (a new row starts when
    the next does not), each in its own segment; otherwise one example per row. Rows are padded with pad_id
    (labels IGNORE)."""
    rows: list[tuple[list, list, list]] = []
    for inputs, labels in examples:
        if not rows or not pack or len(rows[-1][0]) + len(inputs) > seq_len:
            rows.append(([], [], []))
        x, y, seg = rows[-1]
        seg += [seg[-1] + 1 if seg else 0] * len(inputs)  # segment ids 0, 1, 2, ... within the row
        x += inputs
        y += labels
    n = len(rows)
    X = torch.full((n, seq_len), pad_id, dtype=torch.long)
    Y = torch.full((n, seq_len), IGNORE, dtype=torch.long)
    S = torch.full((n, seq_len), -1, dtype=torch.long)  # padding: a segment of its own
    lengths = torch.zeros(n, dtype=torch.long)
    for i, (x, y, seg) in enumerate(rows):
        X[i, : len(x)], Y[i, : len(y)], S[i, : len(seg)] = torch.tensor(x), torch.tensor(y), torch.tensor(seg)
        lengths[i] = len(x)
    return Windows(X, Y, S, lengths)
