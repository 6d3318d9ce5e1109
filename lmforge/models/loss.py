"""Training losses of the model families: next-token cross-entropy, and teacher-forced seq2seq cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.pairs import IGNORE, PairBatch


class _CrossEntropy(torch.autograd.Function):
    """Cross-entropy of logits (N, V) against targets (N,), summed and multiplied by `scale`.

    Same value and gradient as F.cross_entropy, but with less memory traffic over the (N, V) logits,
    which at a small model's size is a large share of a step: forward keeps the logits and their
    log-sum-exp (N,) instead of a log-softmax copy, and backward writes the gradient
    softmax(logits) - target distribution straight into one buffer, instead of building a dense
    one-hot gradient for the NLL and then a second buffer for the log-softmax backward.
    With label smoothing e the target distribution is (1 - e) one-hot + e / V (as in F.cross_entropy).
    """

    @staticmethod
    def forward(ctx, logits, targets, smoothing: float, scale: float):
        lse = torch.logsumexp(logits, dim=-1)  # (N,)
        per_token = lse - logits.gather(1, targets[:, None]).squeeze(1)  # -log p(target)
        if smoothing:
            per_token = (1 - smoothing) * per_token + smoothing * (lse - logits.mean(dim=-1))
        ctx.save_for_backward(logits, targets, lse)
        ctx.smoothing, ctx.scale = smoothing, scale
        return per_token.sum() * scale

    @staticmethod
    def backward(ctx, grad_out):
        logits, targets, lse = ctx.saved_tensors
        grad = torch.sub(logits, lse[:, None]).exp_()  # softmax (N, V), the one buffer we write
        if ctx.smoothing:
            grad.sub_(ctx.smoothing / logits.shape[-1])
        rows = torch.arange(len(targets), device=targets.device)
        grad[rows, targets] -= 1 - ctx.smoothing
        grad.mul_(grad_out * ctx.scale)
        return grad, None, None, None


def cross_entropy(logits, targets, reduction: str = "mean", label_smoothing: float = 0.0) -> torch.Tensor:
    """F.cross_entropy for logits (N, V) (half precision is computed in float32) and targets (N,) without ignored ids.

    reduction "mean" (over the N tokens) or "sum". See _CrossEntropy for why this is not F.cross_entropy.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"unsupported reduction {reduction!r}")
    scale = 1.0 / targets.numel() if reduction == "mean" else 1.0
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    return _CrossEntropy.apply(logits, targets, float(label_smoothing), scale)


def lm_loss(model, x, y, reduction: str = "mean", label_smoothing: float = 0.0):
    """Next-token cross-entropy of model(x) (B, T, V) against y (B, T), in nats (mean or sum over tokens)."""
    logits = model(x)
    return cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1), reduction, label_smoothing)


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
