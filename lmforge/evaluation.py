"""Evaluate a model on text: loss, perplexity, bits per byte."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import data as datamod
from .errors import LmforgeError
from .models import moe


@torch.no_grad()
def evaluate_text(model, tokenizer, spec, max_tokens: int = 1_000_000, batch_size: int = 8) -> dict:
    """Score the documents of `spec` in consecutive windows of the model's context (each window predicts its tokens)."""
    ids: list[int] = []
    nbytes = 0
    for doc in datamod.corpus_documents(spec):
        doc_ids = tokenizer.encode(doc) + [tokenizer.eos_id]
        ids.extend(doc_ids)
        if len(ids) > max_tokens:
            ids = ids[: max_tokens + 1]
            break
    if len(ids) < 2:
        raise LmforgeError(f"not enough text in {spec} to evaluate")
    lengths = torch.tensor(tokenizer.token_byte_lengths())
    T = model.config.block_size
    device = next(model.parameters()).device
    tokens = torch.tensor(ids)
    n_windows = math.ceil((len(ids) - 1) / T)
    nats, count = 0.0, 0
    starts = list(range(0, n_windows * T, T))
    model.eval()
    moe.routing_stats(model, training=False)  # MoE layers: count the routing of these windows only
    for i in range(0, len(starts), batch_size):
        xs, ys = [], []
        for s in starts[i: i + batch_size]:
            x = tokens[s: s + T]
            y = tokens[s + 1: s + T + 1]
            x = x[: len(y)]
            xs.append(x)
            ys.append(y)
        width = max(len(x) for x in xs)
        X = torch.stack([F.pad(x, (0, width - len(x))) for x in xs]).to(device)
        Y = torch.stack([F.pad(y, (0, width - len(y)), value=-100) for y in ys]).to(device)
        logits = model(X).float()
        nats += F.cross_entropy(logits.view(-1, logits.size(-1)), Y.view(-1), ignore_index=-100, reduction="sum").item()
        count += int((Y != -100).sum())
    targets = tokens[1: count + 1]
    nbytes = int(lengths[targets.clamp(max=len(lengths) - 1)].sum())
    loss = nats / count
    out = {"tokens": count, "loss": loss, "perplexity": math.exp(min(loss, 50)), "bits_per_byte": nats / math.log(2) / max(1, nbytes)}
    if routing := moe.routing_stats(model, training=False):
        out["moe_routing"] = routing
    return out
