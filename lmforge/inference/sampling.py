"""Sampling: the settings of one sequence (`SamplingParams`), picking the next token, repetition penalties."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import LmforgeError


@dataclass
class SamplingParams:
    """How to pick tokens for one sequence, and when to stop it."""

    max_new_tokens: int = 200
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None  # keep the k most likely tokens (None or 0 = all)
    top_p: float | None = None  # keep the smallest set of tokens whose probability reaches p (None or 1 = all)
    min_p: float | None = None  # drop tokens less likely than min_p x the most likely one
    repetition_penalty: float = 1.0  # > 1 discourages every token already in the prompt or the output (CTRL / HF style)
    frequency_penalty: float = 0.0  # subtracted from a logit once per earlier occurrence in the output (OpenAI style)
    presence_penalty: float = 0.0  # subtracted from a logit if the token already occurs in the output (OpenAI style)
    seed: int | None = None  # same seed, same prompt, same settings -> same text
    stop: list[str] = field(default_factory=list)  # generation ends before the first of these strings
    logprobs: int | None = None  # None: off; n >= 0: log-probability of each chosen token and of the n most likely
    ignore_eos: bool = False  # keep going past end-of-text (benchmarks)

    def validate(self) -> SamplingParams:
        def need(cond, msg):
            if not cond:
                raise LmforgeError(msg)

        need(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "max_new_tokens must be at least 1")
        need(self.temperature >= 0, "temperature must be >= 0")
        need(self.top_k is None or self.top_k >= 0, "top_k must be >= 0")
        need(self.top_p is None or 0 < self.top_p <= 1, "top_p must be in (0, 1]")
        need(self.min_p is None or 0 <= self.min_p <= 1, "min_p must be in [0, 1]")
        need(self.repetition_penalty > 0, "repetition_penalty must be > 0")
        need(self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be between 0 and 20")
        need(all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings")
        return self

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


def _rows(value, B: int, device, dtype=torch.float32) -> torch.Tensor:
    """A per-row setting as a (B,) tensor, from a number or a tensor."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype)
    return torch.full((B,), value, device=device, dtype=dtype)


def sample_next_token(
    logits: torch.Tensor,
    temperature=1.0,
    top_k=None,
    top_p=None,
    generator: torch.Generator | None = None,
    *,
    min_p=None,
    uniform: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick the next token id for each row of logits (B, vocab).

    Each setting is one number for every row or a (B,) tensor with a value per row: temperature
    0 = greedy; top_k 0, top_p 1 and min_p 0 (or None) switch that filter off. The randomness is
    `uniform`, one number in [0, 1) per row (so each row can have its own seeded stream), or else
    drawn from `generator`. Sampling inverts the cumulative distribution at that number.
    """
    B, V = logits.shape
    if not isinstance(temperature, torch.Tensor):
        if temperature < 0:
            raise LmforgeError("temperature must be >= 0")
        if temperature == 0:
            return logits.argmax(dim=-1)
    temp = _rows(temperature, B, logits.device)
    greedy = temp == 0
    logits = logits.float() / torch.where(greedy, 1.0, temp)[:, None]
    if top_k is not None and (isinstance(top_k, torch.Tensor) or 0 < top_k < V):
        k = _rows(top_k, B, logits.device, torch.long).clamp(min=0, max=V)
        k = torch.where(k == 0, V, k)
        kmax = int(k.max()) if k.device.type == "cpu" else V  # (reading k on an accelerator would wait for it)
        kth = torch.topk(logits, kmax, dim=-1).values.gather(-1, k[:, None] - 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and (isinstance(top_p, torch.Tensor) or 0 < top_p < 1):
        p = _rows(top_p, B, logits.device)
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already reach top_p (the most likely one always stays)
        drop = (probs.cumsum(-1) - probs) >= p[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    if min_p is not None and (isinstance(min_p, torch.Tensor) or min_p > 0):
        floor = _rows(min_p, B, logits.device)[:, None] * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < floor, 0.0)
    if uniform is None:
        uniform = torch.rand(
            B, generator=generator, device=generator.device if generator is not None else logits.device
        )
    cdf = probs.cumsum(-1)
    picked = torch.searchsorted(cdf, (uniform.to(cdf.device)[:, None] * cdf[:, -1:]).contiguous(), right=True).clamp(
        max=V - 1
    )[:, 0]
    # rounding at the very top of the cdf can land on a token with no probability: take the most likely instead
    picked = torch.where(probs.gather(-1, picked[:, None])[:, 0] > 0, picked, probs.argmax(-1))
    return torch.where(greedy, logits.argmax(-1), picked)


def apply_penalties(
    logits: torch.Tensor, counts: torch.Tensor, seen: torch.Tensor, repetition, frequency, presence
) -> torch.Tensor:
    """Penalise repeats: logits (B, V); counts (B, V) occurrences in the output; seen (B, V) in prompt or output."""
    logits = logits.float()
    B = logits.shape[0]
    rep = _rows(repetition, B, logits.device)[:, None]
    logits = torch.where(seen & (rep != 1), torch.where(logits > 0, logits / rep, logits * rep), logits)
    freq = _rows(frequency, B, logits.device)[:, None]
    pres = _rows(presence, B, logits.device)[:, None]
    return logits - freq * counts - pres * (counts > 0).float()
