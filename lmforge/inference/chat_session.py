"""Chatting with a run: its template turns messages into prompt ids, the engine writes the assistant's reply.

    chat_stop(template, tokenizer)     stop strings that end a reply: the template's control tokens
    replies(model, tok, template, conversations)   greedy replies to many conversations at once
    ChatSession                        a conversation with history (`lmforge generate RUN --chat`)

Prompts are built by `data.chat_data.encode_prompt`, the same rendering fine-tuning trains on and the
server uses, so the model sees at inference exactly the token layout it learned.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from ..data.chat import PLAIN_CHAT_STOP, special_tokens
from ..data.chat_data import encode_prompt
from .engine import Engine, Request, context_limit, generate_batch, truncate_prompt
from .sampling import SamplingParams


def chat_stop(template: str | None, tokenizer) -> list[str]:
    """The special tokens that appear in template (besides end-of-text, where the engine stops anyway): a
    reply ends before any of them (such as ChatML's "<|im_end|>" or the next turn's role marker). The plain
    template (None) has its own stop strings ("\nUser:", ...)."""
    if not template:
        return list(PLAIN_CHAT_STOP)
    return [t for t in special_tokens(tokenizer) if t in template and t != tokenizer.eos_token]


def replies(
    model, tokenizer, template: str | None, conversations: list[list[dict]], max_new_tokens: int = 64
) -> list[str]:
    """The model's greedy reply to each list of messages (each ending with the user's turn)."""
    prompts = [encode_prompt(messages, template, tokenizer) for messages in conversations]
    limit = context_limit(model)
    prompts = [p[-(limit - max_new_tokens) :] for p in prompts]
    params = SamplingParams(max_new_tokens, temperature=0.0, stop=chat_stop(template, tokenizer))
    return [c.text for c in generate_batch(model, tokenizer, prompts, params)]


class ChatSession:
    """One conversation: `say(text)` adds the user's message and yields the assistant's reply as it is written;
    the reply joins the history, so the next turn sees the whole conversation (its oldest tokens are dropped
    when it no longer fits the context)."""

    def __init__(self, model, tokenizer, template: str | None, params: SamplingParams, system: str | None = None):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.params = dataclasses.replace(params, stop=list(params.stop) + chat_stop(template, tokenizer))
        self.messages = [{"role": "system", "content": system}] if system else []

    def say(self, text: str) -> Iterator[str]:
        self.messages.append({"role": "user", "content": text})
        ids = encode_prompt(self.messages, self.template, self.tokenizer)
        ids = truncate_prompt(ids, self.model, self.params.max_new_tokens)
        room = context_limit(self.model) - len(ids)
        params = dataclasses.replace(self.params, max_new_tokens=min(self.params.max_new_tokens, room))
        engine = Engine(self.model, self.tokenizer, max_batch=1, max_len=len(ids) + params.max_new_tokens)
        reply = ""
        for out in engine.run([Request(ids, params)]):
            if out.text:
                reply += out.text
                yield out.text
        self.messages.append({"role": "assistant", "content": reply})
