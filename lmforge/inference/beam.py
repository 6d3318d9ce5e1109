"""Decoding encoder–decoder models: greedy and beam search, and `translate` (batched by length).

Decoding runs the encoder once per batch of inputs, projects its output to every decoder layer's
cross-attention keys/values once (`model.new_cache`), then feeds the decoder one token per step with a
KV cache. Both decoders are batched over inputs; beam search keeps `beam_size` hypotheses per input
and scores a finished one by its summed log-probability / length ** length_penalty.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from ..data.pairs import PairTokenizer, pad
from ..errors import LmforgeError


def _max_new_tokens(model, max_new_tokens: int | None) -> int:
    """Target positions are 0 .. max_len-1 with BOS at 0, so at most max_len tokens (EOS included) can be produced."""
    limit = model.config.max_len
    return limit if max_new_tokens is None else max(1, min(max_new_tokens, limit))


@torch.inference_mode()
def greedy_decode(
    model, src: torch.Tensor, src_mask: torch.Tensor | None, bos_id: int, eos_id: int, max_new_tokens: int | None = None
) -> list[list[int]]:
    """The most likely token at every step, for each input of the batch; EOS ends an output and is not returned."""
    steps = _max_new_tokens(model, max_new_tokens)
    B = src.shape[0]
    cache = model.new_cache(model.encode(src, src_mask), src_mask, steps)
    token = torch.full((B, 1), bos_id, dtype=torch.long, device=src.device)
    done = torch.zeros(B, dtype=torch.bool, device=src.device)
    out = []
    for _ in range(steps):
        token = model.decode(token, cache=cache)[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        out.append(token)
        done |= token[:, 0] == eos_id
        if bool(done.all()):  # the one host sync per step
            break
    rows = torch.cat(out, 1).tolist()
    return [row[: row.index(eos_id)] if eos_id in row else row for row in rows]


@dataclass
class Hypothesis:
    tokens: list[int]  # without BOS and EOS
    score: float  # summed log-probability / length ** length_penalty (length counts the EOS)
    log_prob: float
    finished: bool  # ended with EOS (False: cut at the length limit)


@torch.inference_mode()
def beam_search(
    model,
    src: torch.Tensor,
    src_mask: torch.Tensor | None,
    bos_id: int,
    eos_id: int,
    beam_size: int = 4,
    length_penalty: float = 1.0,
    max_new_tokens: int | None = None,
) -> list[list[Hypothesis]]:
    """For each input, up to beam_size hypotheses, best (highest length-normalised score) first.

    Every step extends each live hypothesis by every token and keeps the beam_size best continuations
    that do not end there; a continuation ending in EOS that ranks among the beam_size best is set aside
    as finished (the beam_size best finished ones are kept). An input stops early once it has beam_size
    finished hypotheses and no live one is more probable than the least probable of them: log-probabilities
    only fall as a hypothesis grows, so no later one can be either (stopping at the first beam_size EOS
    instead loses the answer of a confident model to short junk hypotheses). With beam_size 1 this is greedy
    decoding. At the length limit, live hypotheses count as (unfinished) results.
    """
    _check_beam_size(beam_size)
    steps = _max_new_tokens(model, max_new_tokens)
    B, K, device = src.shape[0], beam_size, src.device
    memory = model.encode(src, src_mask).repeat_interleave(
        K, 0
    )  # (B*K, S, d_model): every beam of input b reads its memory
    cache = model.new_cache(memory, None if src_mask is None else src_mask.repeat_interleave(K, 0), steps)
    scores = torch.full((B, K), float("-inf"), device=device)
    scores[:, 0] = 0.0  # one live hypothesis (BOS) per input at the start
    token = torch.full((B * K, 1), bos_id, dtype=torch.long, device=device)
    history = [[[] for _ in range(K)] for _ in range(B)]  # tokens of each live hypothesis
    finished: list[list[Hypothesis]] = [[] for _ in range(B)]
    done = [False] * B
    for t in range(steps):
        log_probs = model.decode(token, cache=cache)[:, -1].float().log_softmax(-1)  # (B*K, V)
        V = log_probs.shape[-1]
        candidates = (scores[:, :, None] + log_probs.view(B, K, V)).view(B, K * V)
        top_scores, top_ids = candidates.topk(
            min(2 * K, K * V), dim=-1
        )  # 2K: at most K end in EOS, so K live ones remain
        top_scores, top_ids = top_scores.tolist(), top_ids.tolist()  # the one host sync per step
        keep_beam = [[0] * K for _ in range(B)]
        keep_token = [[eos_id] * K for _ in range(B)]
        keep_score = [[float("-inf")] * K for _ in range(B)]
        for b in range(B):
            if done[b]:
                continue
            live = 0
            for rank, (score, idx) in enumerate(zip(top_scores[b], top_ids[b])):
                beam, tok = divmod(idx, V)
                if score == float("-inf"):
                    break
                if tok == eos_id:
                    if rank < K:
                        finished[b].append(Hypothesis(history[b][beam], score / (t + 1) ** length_penalty, score, True))
                    continue
                keep_beam[b][live], keep_token[b][live], keep_score[b][live] = beam, tok, score
                live += 1
                if live == K:
                    break
            finished[b] = sorted(finished[b], key=lambda h: h.score, reverse=True)[:K]
            if len(finished[b]) == K and keep_score[b][0] <= min(h.log_prob for h in finished[b]):
                done[b] = True  # keep_score[b][0] is the best live log-probability
        if all(done):
            break
        history = [[history[b][keep_beam[b][k]] + [keep_token[b][k]] for k in range(K)] for b in range(B)]
        rows = torch.tensor([b * K + k for b in range(B) for k in keep_beam[b]], device=device)
        cache.self_attn.reorder(rows)  # cross-attention keys/values are the same for every beam of an input: they stay
        token = torch.tensor(keep_token, device=device).view(B * K, 1)
        scores = torch.tensor(keep_score, device=device)
    for b in range(B):
        if not done[b]:  # length limit: the live hypotheses are results too
            for k in range(K):
                s = float(scores[b, k])
                if s > float("-inf"):
                    finished[b].append(Hypothesis(history[b][k], s / len(history[b][k]) ** length_penalty, s, False))
    return [sorted(f, key=lambda h: h.score, reverse=True)[:K] for f in finished]


def translate(
    model,
    tokenizer: PairTokenizer,
    sources: list[str],
    beam_size: int = 4,
    length_penalty: float = 1.0,
    max_new_tokens: int | None = None,
    batch_size: int = 64,
    warn=None,
) -> list[str]:
    """The best output text for each source (beam_size 1 = greedy). Sources are batched by length."""
    _check_beam_size(beam_size)
    if not sources:
        return []
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    ids = tokenizer.encode_sources(sources)
    limit = model.config.max_len
    too_long = sum(len(s) > limit for s in ids)
    if too_long:
        (warn or _warn)(
            f"warning: {too_long} source(s) longer than the model's max_len ({limit} tokens) were cut to fit"
        )
        ids = [s if len(s) <= limit else s[: limit - 1] + [tokenizer.src_eos_id] for s in ids]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    outputs: list[str] = [""] * len(ids)
    for i in range(0, len(order), batch_size):
        chunk = order[i : i + batch_size]
        src, src_mask = pad([ids[j] for j in chunk], tokenizer.src_pad_id)
        src, src_mask = src.to(device), src_mask.to(device)
        if beam_size == 1:
            best = greedy_decode(model, src, src_mask, tokenizer.bos_id, tokenizer.eos_id, max_new_tokens)
        else:
            best = [
                h[0].tokens
                for h in beam_search(
                    model, src, src_mask, tokenizer.bos_id, tokenizer.eos_id, beam_size, length_penalty, max_new_tokens
                )
            ]
        for j, tokens in zip(chunk, best):
            outputs[j] = tokenizer.decode(tokens)
    model.train(was_training)
    return outputs


def _check_beam_size(beam_size: int) -> None:
    if beam_size < 1:
        raise LmforgeError(f"beam size must be at least 1, got {beam_size}")


def _warn(msg: str) -> None:

    print(msg, file=sys.stderr)
