"""How well a language model predicts text: loss, perplexity, bits per byte, top-1 and top-5 accuracy.

    TokenScores      running sums over predicted tokens (nats, count, top-1 / top-5 hits, bytes), filled
                     from each batch's logits in the same pass as the loss; every metric is a ratio of sums
    evaluate         fixed validation windows of shards (training's validation: val_loss, val_ppl, val_bpb,
                     val_acc, val_top5)
    evaluate_text    consecutive context-sized windows of any text (`lmforge eval`)

Positions whose target is IGNORE are left out of every metric alike.

Bits per byte = total nats / ln 2 / the UTF-8 bytes of text the predicted tokens stand for. The bytes of a token
are what it adds to the decoded text (`Tokenizer.token_bytes`), which for a document's first token can be fewer
than elsewhere (Llama-style tokenizers drop the space they put before a text): `ByteCounts` keeps both.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data import corpus
from ..data.pairs import IGNORE
from ..data.shards import TokenData
from ..errors import LmforgeError
from ..models import moe
from ..models.loss import token_cross_entropy


def token_scores(logits: torch.Tensor, targets: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, ...]:
    """(nats, predicted, top-1 hits, top-k hits) of logits (..., V) against targets (...), as scalar tensors.

    nats is the summed cross-entropy over predicted positions (targets != IGNORE); a hit is a predicted position
    whose target is the argmax (top-1) or among the k largest logits (ties broken as torch.topk breaks them).
    """
    logits = logits.float().reshape(-1, logits.size(-1))  # (N, V)
    targets = targets.reshape(-1)  # (N,)
    scored = targets != IGNORE
    nats = token_cross_entropy(logits, targets, "sum")
    top = logits.topk(min(k, logits.size(-1)), dim=-1).indices  # (N, k), most likely first
    hit = (top == targets.clamp(min=0)[:, None]) & scored[:, None]  # (N, k); IGNORE rows never hit
    return nats, scored.sum(), hit[:, 0].sum(), hit.any(-1).sum()


@dataclass
class TokenScores:
    """Sums over the predicted tokens of several batches; the metrics are ratios of these sums (never a mean of
    per-batch means). `bytes` is the UTF-8 length of the predicted tokens, for bits per byte."""

    nats: float = 0.0
    tokens: int = 0
    top1: int = 0
    top5: int = 0
    bytes: int = 0

    def add(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        byte_lengths: ByteCounts | torch.Tensor | None = None,
        inputs: torch.Tensor | None = None,
    ) -> None:
        """Score one batch: logits (B, T, V), targets (B, T) with IGNORE where nothing is predicted.

        byte_lengths: `ByteCounts` (with inputs (B, T), the ids that predicted targets: a target after `eos` opens
        a document), or a (V,) tensor of bytes per token id wherever it stands."""
        nats, n, top1, top5 = torch.stack([t.double() for t in token_scores(logits, targets)]).tolist()  # one sync
        self.nats += nats
        self.tokens, self.top1, self.top5 = self.tokens + int(n), self.top1 + int(top1), self.top5 + int(top5)
        if isinstance(byte_lengths, ByteCounts):
            self.bytes += byte_lengths.count(inputs, targets)
        elif byte_lengths is not None:
            t = targets[targets != IGNORE].cpu()
            self.bytes += int(byte_lengths[t.clamp(max=len(byte_lengths) - 1)].sum())

    def metrics(self, prefix: str = "") -> dict:
        """{loss, ppl, bpb (when bytes were counted), acc, top5}, keys prefixed (e.g. "val_")."""
        loss = self.nats / self.tokens
        out = {"loss": loss, "ppl": math.exp(min(loss, 50))}
        if self.bytes:
            out["bpb"] = self.nats / math.log(2) / self.bytes
        out.update(acc=self.top1 / self.tokens, top5=self.top5 / self.tokens)
        return {prefix + k: v for k, v in out.items()}


@dataclass
class ByteCounts:
    """The UTF-8 bytes of text each token id stands for, inside a document and as its first token.

    inside, opening: (V,) int64, indexed by token id (ids the tokenizer lacks count 0).
    eos: the id that ends a document; in a token stream (a shard: documents encoded one by one, `eos` after
    each) the token after `eos` opens the next document.
    """

    inside: torch.Tensor
    opening: torch.Tensor
    eos: int

    @classmethod
    def of(cls, tokenizer, vocab_size: int | None = None) -> ByteCounts:
        """From a `Tokenizer`; vocab_size pads the tables for a model vocabulary rounded up past the tokenizer's."""
        pad = [0] * max(0, (vocab_size or 0) - tokenizer.vocab_size)
        inside = torch.tensor(tokenizer.token_byte_lengths() + pad, dtype=torch.long)
        opening = torch.tensor(tokenizer.token_byte_lengths(first=True) + pad, dtype=torch.long)
        return cls(inside, opening, tokenizer.eos_id)

    def count(self, x: torch.Tensor, y: torch.Tensor) -> int:
        """Bytes of the targets y given the inputs x (same shape, ids on any device; IGNORE in y counts nothing):
        y[t] opens a document when x[t] is `eos`."""
        x, y = x.cpu(), y.cpu()
        real = y != IGNORE
        y = y.clamp(min=0, max=len(self.inside) - 1)
        per_token = torch.where(x == self.eos, self.opening[y], self.inside[y])
        return int(per_token[real].sum())


@torch.no_grad()
def evaluate(
    model,
    data: TokenData,
    batch_size: int,
    seq_len: int,
    batches: int,
    byte_lengths: ByteCounts | torch.Tensor | None,
    device,
    autocast=contextlib.nullcontext,
) -> dict:
    """Validation metrics on fixed windows (the same windows at every call), keys prefixed "val_": loss (nats per
    token), ppl, bpb (given byte_lengths: `ByteCounts`, or a (V,) tensor of each token's UTF-8 length wherever it
    stands), acc and top5 (next-token accuracy)."""
    was_training = model.training
    model.eval()
    seq_len = min(seq_len, int(max(data.lengths)) - 1)
    gen = torch.Generator().manual_seed(1234)
    scores = TokenScores()
    moe.routing_stats(model, training=False)  # MoE layers: count the routing of these batches only
    for _ in range(batches):
        x, y = data.batch(batch_size, seq_len, gen)
        x, y = x.to(device), y.to(device)
        with autocast():
            logits = model(x)  # (B, T, V)
        scores.add(logits, y, byte_lengths, inputs=x)
    model.train(was_training)
    out = scores.metrics("val_")
    if routing := moe.routing_stats(model, training=False):
        out["val_moe_routing"] = routing
    return out


@torch.no_grad()
def evaluate_text(
    model, tokenizer, spec, max_tokens: int = 1_000_000, batch_size: int = 8, text_field: str = "text"
) -> dict:
    """Score the documents of `spec` in consecutive windows of the model's context (each window predicts its tokens).

    Returns {tokens (predicted), loss (nats per token), perplexity, bits_per_byte (over the bytes the predicted
    tokens stand for: every byte of the text but the first token's), acc, top5 (next-token top-1 / top-5
    accuracy, fractions)}; raises LmforgeError when the text has fewer than 2 tokens. Each document is encoded on
    its own, then `eos`. `spec` is DATA as `corpus.Corpus` takes it; text_field the column to read."""
    ids: list[int] = []
    for doc in corpus.corpus_documents(spec, text_field=text_field):
        doc_ids = tokenizer.encode(doc) + [tokenizer.eos_id]
        ids.extend(doc_ids)
        if len(ids) > max_tokens:
            ids = ids[: max_tokens + 1]
            break
    if len(ids) < 2:
        raise LmforgeError(f"not enough text in {spec} to evaluate")
    byte_counts = ByteCounts.of(tokenizer)
    T = model.config.block_size
    device = next(model.parameters()).device
    tokens = torch.tensor(ids)
    n_windows = math.ceil((len(ids) - 1) / T)
    scores = TokenScores()
    starts = list(range(0, n_windows * T, T))
    model.eval()
    moe.routing_stats(model, training=False)  # MoE layers: count the routing of these windows only
    for i in range(0, len(starts), batch_size):
        xs, ys = [], []
        for s in starts[i : i + batch_size]:
            y = tokens[s + 1 : s + T + 1]
            xs.append(tokens[s : s + len(y)])
            ys.append(y)
        width = max(len(x) for x in xs)  # the last window may be short: pad it, predicting nothing there
        X = torch.stack([F.pad(x, (0, width - len(x))) for x in xs]).to(device)  # (B, T)
        Y = torch.stack([F.pad(y, (0, width - len(y)), value=IGNORE) for y in ys]).to(device)
        scores.add(model(X), Y, byte_counts, inputs=X)
    m = scores.metrics()
    out = {
        "tokens": scores.tokens,
        "loss": m["loss"],
        "perplexity": m["ppl"],
        "bits_per_byte": scores.nats / math.log(2) / max(1, scores.bytes),
        "acc": m["acc"],
        "top5": m["top5"],
    }
    if routing := moe.routing_stats(model, training=False):
        out["moe_routing"] = routing
    return out
