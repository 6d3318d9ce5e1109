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


def target_nats(logits: torch.Tensor, probs: torch.Tensor, targets: torch.Tensor, sync_free: bool) -> torch.Tensor:
    """-log p(target) per row (N,) in nats, from logits (N, V), their softmax probs (N, V) and targets (N,) (valid
    indices), exact also where p(target) underflows the dtype.

    Where p(target) is at least the smallest normal number, -log p(target) from probs is exact to the dtype. Below
    (fp32: beyond ~87 nats) it would lose precision or be infinite, so:
    - sync_free=False (a CPU): those rows, found with nonzero, get an exact log-softmax of their own (rare, cheap);
    - sync_free=True (an accelerator, where nonzero would wait for the device mid-forward): every row takes
      log-sum-exp - logit(target), the log-sum-exp being max(logits) - log max(probs) (the top probability is at
      least 1/V, so it never underflows), two reductions over the (N, V) buffers instead of a host sync.
    """
    if sync_free:
        lse = logits.amax(dim=-1) - torch.log(probs.amax(dim=-1))
        return lse - logits.gather(1, targets[:, None]).squeeze(1)
    p_target = probs.gather(1, targets[:, None]).squeeze(1)
    nats = -torch.log(p_target)
    tiny = (p_target < torch.finfo(probs.dtype).tiny).nonzero().squeeze(1)
    if len(tiny):
        exact = torch.log_softmax(logits[tiny], dim=-1).gather(1, targets[tiny, None]).squeeze(1)
        nats = nats.index_put((tiny,), -exact)
    return nats


class _SummedCrossEntropy(torch.autograd.Function):
    """Sum over rows of the cross-entropy of logits (N, V) against targets (N,); rows whose target is IGNORE add 0.

    Same value and gradient as F.cross_entropy(..., reduction="sum", ignore_index=IGNORE), with less memory
    traffic over the (N, V) logits, which at a small model's size is a large share of a step: forward runs one
    fused softmax (N, V) and keeps it (the logits themselves are then free to go), the loss of a row is
    -log p(target) from it, and backward turns the kept softmax in place into the gradient softmax(logits) -
    target distribution, instead of building a dense one-hot gradient for the NLL and then a second buffer for
    the log-softmax backward. Keeping the softmax rather than the log-softmax spares backward an exp over the
    whole (N, V) buffer (7 of the 600 ms of a `tiny` fp32 step; the two forward kernels cost the same). (A
    separate log-sum-exp costs four passes over the logits on a CPU: max, subtract, exp, sum.)
    A row whose target probability is below the dtype's smallest normal number (fp32: a loss above ~87 nats),
    where -log p would lose precision or be infinite, takes its loss from an exact log-softmax of that row.
    With label smoothing e the target distribution is (1 - e) one-hot + e / V (as in F.cross_entropy), and
    its cross-entropy is (1 - e) (-log p(target)) + e (-mean over the vocabulary of log p); that needs every
    log p, so smoothing keeps the log-softmax (and backward exponentiates it).
    """

    @staticmethod
    def forward(ctx, logits, targets, smoothing: float):
        keep = targets != IGNORE  # (N,)
        safe = targets.masked_fill(~keep, 0)
        if smoothing:
            logp = torch.log_softmax(logits, dim=-1)  # (N, V)
            per_token = (1 - smoothing) * -logp.gather(1, safe[:, None]).squeeze(1) - smoothing * logp.mean(dim=-1)
            kept = logp
        else:
            probs = torch.softmax(logits, dim=-1)  # (N, V)
            per_token = target_nats(logits, probs, safe, sync_free=not logits.is_cpu)
            kept = probs
        ctx.save_for_backward(kept, safe, keep)
        ctx.smoothing = smoothing
        return (per_token * keep).sum()

    @staticmethod
    def backward(ctx, grad_out):
        kept, safe, keep = ctx.saved_tensors
        # softmax (N, V), written over the saved softmax or log-softmax: no new (N, V) buffer (on a CPU a fresh
        # one costs page faults every step). A second backward through this loss then fails loudly (autograd
        # sees the saved tensor modified) instead of computing a wrong gradient; training never takes one.
        grad = kept
        if ctx.smoothing:
            grad = kept.exp_()
            grad.sub_(ctx.smoothing / kept.shape[-1])
        grad[torch.arange(len(safe), device=safe.device), safe] -= 1 - ctx.smoothing
        grad.mul_((keep * grad_out)[:, None])  # ignored rows get no gradient
        return grad, None, None


def token_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean", label_smoothing: float = 0.0
) -> torch.Tensor:
    """Cross-entropy in fp32 (fp64 stays fp64) of logits (..., V) against targets (...), IGNORE targets left out.

    reduction "mean" (per predicted token), "sum" (nats over predicted tokens) or "none" (0 at ignored ones).
    "mean" and "sum" go through _SummedCrossEntropy (see there why), "none" through F.cross_entropy."""
    flat = logits.reshape(-1, logits.size(-1))
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    targets = targets.reshape(-1)
    if reduction == "none":
        return F.cross_entropy(flat, targets, ignore_index=IGNORE, reduction="none", label_smoothing=label_smoothing)
    total = _SummedCrossEntropy.apply(flat, targets, float(label_smoothing))
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / predicted_tokens(targets)
    raise ValueError(f"unsupported reduction {reduction!r}")


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
