"""Autoregressive generation with a KV cache: sampling, streaming, text in and out."""

from __future__ import annotations

import sys
from typing import Iterator

import torch

from .errors import LmforgeError


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token id for each row of logits (B, vocab). temperature 0 = greedy."""
    if temperature < 0:
        raise LmforgeError("temperature must be >= 0")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already reach top_p (the most likely one always stays)
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def context_limit(model) -> int:
    """Longest sequence (prompt + new tokens) the model was built to attend over."""
    return model.config.block_size


@torch.inference_mode()
def generate_tokens(model, prompt_ids: list[int], max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                    top_p: float | None = None, seed: int | None = None, eos_id: int | None = None) -> Iterator[int]:
    """Yield new token ids one at a time (stops at eos_id, which is not yielded)."""
    if not prompt_ids:
        raise LmforgeError("empty prompt")
    limit = context_limit(model)
    if len(prompt_ids) + max_new_tokens > limit:
        max_new_tokens = max(0, limit - len(prompt_ids))
    if max_new_tokens == 0:
        return
    device = next(model.parameters()).device
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
    cache = model.new_cache(1, len(prompt_ids) + max_new_tokens)
    logits = model(torch.tensor([prompt_ids], device=device), cache, last_only=True)
    for _ in range(max_new_tokens):
        nxt = sample_next_token(logits[:, -1], temperature, top_k, top_p, gen)
        tok = int(nxt.item())  # the one device->host transfer per token
        if eos_id is not None and tok == eos_id:
            return
        yield tok
        logits = model(nxt.view(1, 1), cache)


def truncate_prompt(ids: list[int], model, max_new_tokens: int, warn: bool = True) -> list[int]:
    """Keep the end of a prompt that would not fit the context window with room for new tokens."""
    limit = context_limit(model)
    room = max(1, limit - max(1, min(max_new_tokens, limit // 2)))
    if len(ids) > room:
        if warn:
            print(f"warning: prompt of {len(ids)} tokens is longer than the context allows; keeping its last {room} tokens", file=sys.stderr)
        ids = ids[-room:]
    return ids


def generate_stream(model, tokenizer, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8, top_k: int | None = None,
                    top_p: float | None = None, seed: int | None = None, warn: bool = True) -> Iterator[str]:
    """Yield text pieces as they are generated (never splitting a character)."""
    ids = tokenizer.encode(prompt) if prompt else []
    if not ids:
        ids = [tokenizer.eos_id]  # an empty prompt starts a fresh document
    ids = truncate_prompt(ids, model, max_new_tokens, warn)
    tokens = generate_tokens(model, ids, max_new_tokens, temperature, top_k, top_p, seed, tokenizer.eos_id)
    yield from tokenizer.stream_decode(tokens)


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = None) -> str:
    """The prompt followed by its generated continuation, as text."""
    return prompt + "".join(generate_stream(model, tokenizer, prompt, max_new_tokens, temperature, top_k, top_p, seed))
