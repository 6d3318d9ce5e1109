"""Training losses of the model families: next-token cross-entropy, and teacher-forced seq2seq cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.pairs import IGNORE, PairBatch


def lm_loss(model, x, y, reduction: str = "mean", label_smoothing: float = 0.0):
    logits = model(x)
    return F.cross_entropy(
        logits.float().view(-1, logits.size(-1)), y.reshape(-1), reduction=reduction, label_smoothing=label_smoothing
    )


def seq2seq_loss(model, batch: PairBatch, label_smoothing: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the labels under teacher forcing; padded positions are ignored."""
    logits = model(batch.src, batch.tgt_in, batch.src_mask, batch.tgt_mask)
    return F.cross_entropy(
        logits.float().view(-1, logits.size(-1)),
        batch.labels.view(-1),
        ignore_index=IGNORE,
        label_smoothing=label_smoothing,
        reduction=reduction,
    )
