"""Optimisers: AdamW (from PyTorch) and Muon, and the split of parameters between them.

Muon (MomentUm Orthogonalized by Newton-Schulz) updates a 2-D weight matrix with its momentum
made approximately orthogonal: the update keeps the momentum's singular vectors but sets every
singular value near 1, so every direction of the matrix learns at a similar rate. Embeddings,
the output head, norms and biases are not hidden matrices and stay with AdamW.
"""

from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately orthogonalise g (rows x cols, or a batch (n, rows, cols)): ~U V^T of its SVD, by iteration.

    The coefficients (a, b, c) make the iteration push singular values in (0, 1] towards ~1 fast;
    it does not converge exactly to 1 (values land roughly in [0.7, 1.2]), which works as well in
    practice and costs only matrix multiplies.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.float()
    single = x.dim() == 2
    if single:
        x = x[None]
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:  # iterate on the wide orientation: X X^T is the smaller Gram matrix
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):  # x <- a x + (b G + c G G) x with G = x x^T; the scalings ride on the matmuls
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    if transposed:
        x = x.mT
    if single:
        x = x[0]
    return x.to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters: SGD momentum (Nesterov), orthogonalised, scaled by sqrt(max(1, rows/cols)).

    Matrices of the same shape (e.g. the same projection of every layer) are orthogonalised together
    as one batch: the same arithmetic in a few large matrix multiplies instead of many small ones.
    """

    def __init__(
        self,
        params,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        ns_steps: int = 5,
    ):
        super().__init__(
            params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, ns_steps=ns_steps)
        )
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError("Muon only takes 2-D parameters")

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            by_shape: dict[tuple, list] = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault((tuple(p.shape), p.dtype, p.device), []).append(p)
            for params in by_shape.values():
                grads = [p.grad for p in params]
                bufs = []
                for p in params:
                    if "momentum_buffer" not in self.state[p]:
                        self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                    bufs.append(self.state[p]["momentum_buffer"])
                torch._foreach_mul_(bufs, group["momentum"])
                torch._foreach_add_(bufs, grads)
                updates = torch._foreach_add(grads, bufs, alpha=group["momentum"]) if group["nesterov"] else bufs
                ortho = newton_schulz(torch.stack(updates), group["ns_steps"])  # (n, rows, cols)
                scale = max(1.0, params[0].shape[0] / params[0].shape[1]) ** 0.5
                if group["weight_decay"]:
                    torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
                torch._foreach_add_(params, list(ortho.unbind(0)), alpha=-group["lr"] * scale)
        return loss


def split_parameters(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Group parameters: 'hidden' 2-D matrices inside the blocks, 'embed' embeddings (and a tied head),
    'head' an untied output head, 'other' norms and biases."""
    embed_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = getattr(model, "lm_head", None)
    head_id = id(head.weight) if head is not None else None
    groups: dict[str, list] = {"hidden": [], "embed": [], "head": [], "other": []}
    seen = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in embed_ids:
            groups["embed"].append(p)
        elif id(p) == head_id:
            groups["head"].append(p)
        elif p.dim() >= 2:
            groups["hidden"].append(p)
        else:
            groups["other"].append(p)
    return groups


def build_optimizers(model: nn.Module, cfg, device: torch.device) -> list[torch.optim.Optimizer]:
    """AdamW alone, or Muon for hidden matrices + AdamW for the rest (cfg.optimizer = 'adamw' | 'muon').

    Every param group carries 'base_lr'; the schedule multiplies it by the same warmup/cosine factor.
    AdamW decays matrix weights only (never norms, biases or embeddings). AdamW is fused on CUDA and CPU.
    """
    groups = split_parameters(model)
    # The fused AdamW kernel updates all parameters in one pass per tensor (CUDA and CPU): on a CPU the
    # unfused step is a dozen separate elementwise passes per tensor, a large share of a small model's step.
    fused = device.type in ("cuda", "cpu")
    adam_groups = [
        {"params": groups["head"], "weight_decay": cfg.weight_decay, "base_lr": cfg.lr},
        {"params": groups["embed"], "weight_decay": 0.0, "base_lr": cfg.lr},
        {"params": groups["other"], "weight_decay": 0.0, "base_lr": cfg.lr},
    ]
    if cfg.optimizer == "muon":
        muon = Muon(
            [{"params": groups["hidden"], "base_lr": cfg.muon_lr}],
            lr=cfg.muon_lr,
            momentum=cfg.muon_momentum,
            weight_decay=cfg.weight_decay,
        )
        adam_groups = [g for g in adam_groups if g["params"]]
        adam = torch.optim.AdamW(adam_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)
        return [muon, adam]
    adam_groups.insert(0, {"params": groups["hidden"], "weight_decay": cfg.weight_decay, "base_lr": cfg.lr})
    adam_groups = [g for g in adam_groups if g["params"]]
    return [torch.optim.AdamW(adam_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)]


def lr_factor(cfg, step: int, progress: float) -> float:
    """The learning-rate multiplier at optimizer step `step` with `progress` (0 -> 1) of the budget used.

    Linear warmup over warmup_steps, times the shape of cfg.schedule:
    - "cosine": from 1 down to min_lr_ratio along half a cosine over the whole run;
    - "wsd" (warmup-stable-decay, Hu et al. 2024, "MiniCPM"): 1 until the last decay_fraction of the run,
      then linear down to min_lr_ratio. The run learns at full rate for longer and anneals at the end.
    """
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    progress = min(max(progress, 0.0), 1.0)
    lo = cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        start = 1.0 - cfg.decay_fraction
        return warm * (1.0 if progress <= start else 1.0 - (1.0 - lo) * (progress - start) / cfg.decay_fraction)
    return warm * (lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * progress)))


def lr_at(cfg, step: int, progress: float) -> float:
    return cfg.lr * lr_factor(cfg, step, progress)
