"""Training losses of the model families: next-token cross-entropy, and teacher-forced seq2seq cross-entropy.

Both ignore targets equal to IGNORE (-100: padding, or positions a task does not train on). Training averages
over the predicted tokens of a whole optimizer step, so tasks ask for reduction="sum" and count the predicted
tokens with `predicted_tokens`; the mean of a batch is the sum over the count (label smoothing included:
PyTorch's smoothing term covers the same non-ignored positions).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.pairs import IGNORE, PairBatch


def token_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean", label_smoothing: float = 0.0
) -> torch.Tensor:
    """Cross-entropy in fp32 of logits (..., V) against targets (...), IGNORE targets left out.

    reduction "mean" (per predicted token), "sum" (nats over predicted tokens) or "none" (0 at ignored ones)."""
    return F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),
        targets.reshape(-1),
        ignore_index=IGNORE,
        reduction=reduction,
        label_smoothing=label_smoothing,
    )


def predicted_tokens(targets: torch.Tensor) -> torch.Tensor:
    """Number of positions of targets that are predicted (not IGNORE): a scalar tensor on targets' device."""
    return (targets != IGNORE).sum()


def lm_loss(model, x, y, reduction: str = "mean", label_smoothing: float = 0.0):
    """Next-token cross-entropy of model on x (B, T) against y (B, T) (x shifted by one; IGNORE = not scored)."""
    return token_cross_entropy(model(x), y, reduction, label_smoothing)


def seq2seq_loss(model, batch: PairBatch, label_smoothing: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the labels under teacher forcing; padded positions are ignored."""
    logits = model(batch.src, batch.tgt_in, batch.src_mask, batch.tgt_mask)
    return token_cross_entropy(logits, batch.labels, reduction, label_smoothing)
