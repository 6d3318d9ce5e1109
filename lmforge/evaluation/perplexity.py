"""Loss, perplexity and bits per byte: on fixed validation windows of shards (training), and on any text
(`lmforge eval`)."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from ..data import corpus
from ..data.shards import TokenData
from ..errors import LmforgeError
from ..models import moe
from ..models.loss import lm_loss


@torch.no_grad()
def evaluate(
    model,
    data: TokenData,
    batch_size: int,
    seq_len: int,
    batches: int,
    byte_lengths: torch.Tensor | None,
    device,
    autocast=contextlib.nullcontext,
) -> dict:
    """Mean loss, perplexity and bits per byte on fixed windows (same windows at every call)."""
    was_training = model.training
    model.eval()
    seq_len = min(seq_len, int(max(data.lengths)) - 1)
    gen = torch.Generator().manual_seed(1234)
    nats, count, nbytes = 0.0, 0, 0
    moe.routing_stats(model, training=False)  # MoE layers: count the routing of these batches only
    for _ in range(batches):
        x, y = data.batch(batch_size, seq_len, gen)
        x, y = x.to(device), y.to(device)
        with autocast():
            nats += lm_loss(model, x, y, reduction="sum").item()
        count += y.numel()
        if byte_lengths is not None:
            nbytes += int(byte_lengths[y.cpu()].sum())
    model.train(was_training)
    loss = nats / count
    out = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50))}
    if nbytes:
        out["val_bpb"] = nats / math.log(2) / nbytes
    if routing := moe.routing_stats(model, training=False):
        out["val_moe_routing"] = routing
    return out


@torch.no_grad()
def evaluate_text(model, tokenizer, spec, max_tokens: int = 1_000_000, batch_size: int = 8) -> dict:
    """Score the documents of `spec` in consecutive windows of the model's context (each window predicts its tokens)."""
    ids: list[int] = []
    nbytes = 0
    for doc in corpus.corpus_documents(spec):
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
        for s in starts[i : i + batch_size]:
            x = tokens[s : s + T]
            y = tokens[s + 1 : s + T + 1]
            x = x[: len(y)]
            xs.append(x)
            ys.append(y)
        width = max(len(x) for x in xs)
        X = torch.stack([F.pad(x, (0, width - len(x))) for x in xs]).to(device)
        Y = torch.stack([F.pad(y, (0, width - len(y)), value=-100) for y in ys]).to(device)
        logits = model(X).float()
        nats += F.cross_entropy(logits.view(-1, logits.size(-1)), Y.view(-1), ignore_index=-100, reduction="sum").item()
        count += int((Y != -100).sum())
    targets = tokens[1 : count + 1]
    nbytes = int(lengths[targets.clamp(max=len(lengths) - 1)].sum())
    loss = nats / count
    out = {
        "tokens": count,
        "loss": loss,
        "perplexity": math.exp(min(loss, 50)),
        "bits_per_byte": nats / math.log(2) / max(1, nbytes),
    }
    if routing := moe.routing_stats(model, training=False):
        out["moe_routing"] = routing
    return out
