"""Sparse Mixture-of-Experts feed-forward layer: token-choice top-k routing (Switch, GShard, Mixtral).

    x (B, T, d_model): N = B*T tokens, E experts, each token sent to k of them (A = N*k assignments)
      router    logits = x W_router (N, E); probs = softmax(logits) in float32
      choose    the k most probable experts per token; gates = their probabilities,
                renormalised to sum to 1 over the k (Mixtral) unless moe_renormalize = false
      capacity  (training only) an expert takes at most C = ceil(capacity_factor * N * k / E)
                assignments, in priority order: earlier position first, then a token's first choice
                before its second, then batch row. Whether an assignment is dropped thus depends only
                on tokens at the same or earlier positions, so dropping leaks nothing from the future.
                A dropped assignment adds nothing: the token's residual stream passes unchanged for it.
      dispatch  assignments sorted by expert; each expert runs once on exactly its tokens
      combine   out[token] += gate * expert(x[token])   (+ shared_expert(x) for every token, if any)

Auxiliary losses of the last forward (the training loop adds them with their coefficients):
    balance = E * sum_e f_e * P_e   f_e: share of the A assignments routed to e (before capacity),
                                    P_e: mean router probability of e. 1.0 when balanced (Switch Transformer).
    z       = mean over tokens of logsumexp(logits)^2                        (ST-MoE router z-loss)

At inference (eval mode) nothing is dropped, so a KV-cached decode sees exactly what a full forward sees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .layers import MLP


def choose_experts(logits: torch.Tensor, k: int, renormalize: bool = True):
    """Softmax router: (probs (..., E) float32, gates (..., k) float32, experts (..., k) int64), best first."""
    probs = logits.float().softmax(dim=-1)
    gates, experts = probs.topk(k, dim=-1)
    if renormalize:
        gates = gates / gates.sum(dim=-1, keepdim=True)
    return probs, gates, experts


@dataclass
class Dispatch:
    """Which token each expert processes, grouped by expert.

    Assignments are numbered in priority order: token (b, t)'s j-th choice is a = (t * k + j) * B + b.
    """

    order: torch.Tensor  # (kept,) assignment numbers, grouped by expert, in priority order within each expert
    sizes: torch.Tensor  # (E,) kept assignments per expert (sum = kept)
    wanted: torch.Tensor  # (E,) assignments the router sent to each expert, before capacity
    dropped: torch.Tensor  # (dropped,) assignment numbers dropped by the capacity limit

    @staticmethod
    def tokens(a: torch.Tensor, B: int, T: int, k: int) -> torch.Tensor:
        """Flat token index b*T + t of assignment numbers a."""
        return (a % B) * T + a // (k * B)


def plan_dispatch(experts: torch.Tensor, n_experts: int, capacity: int | None) -> Dispatch:
    """Group the assignments of experts (B, T, k) by expert, keeping at most `capacity` per expert."""
    flat = experts.permute(1, 2, 0).reshape(-1)  # (A,) expert of each assignment, in priority order
    order = torch.argsort(flat, stable=True)  # grouped by expert; stable keeps priority order inside a group
    wanted = torch.bincount(flat, minlength=n_experts)
    if capacity is None:
        return Dispatch(order, wanted, wanted, order[:0])
    first = wanted.cumsum(0) - wanted  # where each expert's group starts in `order`
    rank = torch.arange(order.numel(), device=order.device) - first[flat[order]]  # place in the expert's queue
    keep = rank < capacity
    return Dispatch(order[keep], wanted.clamp(max=capacity), wanted, order[~keep])


class MoE(nn.Module):
    """Drop-in replacement for MLP: (B, T, d_model) -> (B, T, d_model) through routed experts."""

    def __init__(self, cfg):
        super().__init__()
        self.n_experts, self.top_k = cfg.moe_experts, cfg.moe_top_k
        self.capacity_factor = cfg.moe_capacity_factor
        self.renormalize = cfg.moe_renormalize
        self.jitter = cfg.moe_jitter
        self.aux_loss_coef, self.z_loss_coef = cfg.moe_aux_loss_coef, cfg.moe_z_loss_coef
        self.router = nn.Linear(cfg.d_model, cfg.moe_experts, bias=False)
        self.experts = nn.ModuleList(MLP(cfg, cfg.expert_dim) for _ in range(cfg.moe_experts))
        self.shared_expert = MLP(cfg, cfg.expert_dim) if cfg.moe_shared_expert else None
        self._last = None  # (logits, probs, wanted) of the last forward, for the auxiliary losses
        self._stats = {
            True: None,
            False: None,
        }  # per mode (training?): (E assignment counts, over capacity) since take_stats

    def capacity(self, n_tokens: int) -> int | None:
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts)

    def forward(self, x):
        B, T, D = x.shape
        router_in = x
        if self.training and self.jitter > 0:
            router_in = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        logits = self.router(router_in)  # (B, T, E)
        probs, gates, experts = choose_experts(logits, self.top_k, self.renormalize)  # (B, T, E), (B, T, k), (B, T, k)
        capacity = self.capacity(B * T)
        plan = plan_dispatch(experts, self.n_experts, capacity if self.training else None)

        x_flat = x.reshape(B * T, D)
        tokens = Dispatch.tokens(plan.order, B, T, self.top_k)  # (kept,)
        g = gates.permute(1, 2, 0).reshape(-1)[plan.order]  # (kept,) gate of each kept assignment
        sizes = plan.sizes.tolist()  # the one host sync: the loop over experts needs each expert's token count
        chunks = x_flat[tokens].split(sizes)  # expert e's tokens, contiguous
        y = torch.cat([expert(chunk) for expert, chunk in zip(self.experts, chunks)])  # (kept, D)
        # Put each result back in its assignment's slot (dropped slots stay zero), then add a token's k slots.
        slots = x_flat.new_zeros(B * T * self.top_k, D).index_copy_(0, plan.order, (y * g[:, None]).to(x.dtype))
        out = slots.view(T, self.top_k, B, D).sum(dim=1).transpose(0, 1)  # (B, T, D)
        if self.shared_expert is not None:
            out = out + self.shared_expert(x)

        self._last = (logits.reshape(B * T, -1), probs.reshape(B * T, -1), plan.wanted)
        over = (plan.wanted - capacity).clamp(min=0).sum() if capacity is not None else plan.wanted.new_zeros(())
        counts = torch.cat((plan.wanted, over[None])).detach()
        prev = self._stats[self.training]
        self._stats[self.training] = counts if prev is None else prev + counts
        return out

    # --- what the last forward(s) measured ---------------------------------------------------------

    def balance_loss(self) -> torch.Tensor:
        logits, probs, wanted = self._last
        f = wanted.float() / wanted.sum()  # share of assignments per expert (no gradient: a count)
        return self.n_experts * (f * probs.mean(dim=0)).sum()

    def z_loss(self) -> torch.Tensor:
        logits, _, _ = self._last
        return torch.logsumexp(logits.float(), dim=-1).square().mean()

    def take_stats(self, training: bool) -> dict | None:
        """Share of routed assignments per expert and share beyond capacity, over the forwards in training
        (or eval) mode since the last call; then reset. Training drops the over-capacity assignments; inference
        only counts them (what training would drop on batches of that size).
        """
        if self._stats[training] is None:
            return None
        counts = self._stats[training].tolist()
        self._stats[training] = None
        total = sum(counts[:-1])
        return {"load": [c / total for c in counts[:-1]], "drop_rate": counts[-1] / total, "assignments": int(total)}

    def inactive_params(self) -> int:
        """Parameters a token does not use: the experts it is not routed to."""
        per_expert = sum(p.numel() for p in self.experts[0].parameters())
        return (self.n_experts - self.top_k) * per_expert


# --- over a whole model (any family, also inside DDP / torch.compile wrappers) -----------------------


def moe_layers(model: nn.Module) -> dict[str, MoE]:
    """{name: layer} of the MoE layers of a model, named by their block ("blocks.3")."""
    return {
        name.removesuffix(".mlp").removeprefix("module.").removeprefix("_orig_mod."): m
        for name, m in model.named_modules()
        if isinstance(m, MoE)
    }


def aux_losses(model: nn.Module) -> dict[str, tuple[float, torch.Tensor]]:
    """Auxiliary losses of the last forward, averaged over MoE layers: {name: (coefficient, value)}; {} for dense
    models.

    The training objective is lm_loss + sum(coefficient * value).
    """
    layers = [m for m in moe_layers(model).values() if m._last is not None]
    if not layers:
        return {}
    return {
        "moe_balance": (layers[0].aux_loss_coef, torch.stack([m.balance_loss() for m in layers]).mean()),
        "moe_z": (layers[0].z_loss_coef, torch.stack([m.z_loss() for m in layers]).mean()),
    }


def routing_stats(model: nn.Module, training: bool) -> dict[str, dict]:
    """{layer: {"load": [share per expert], "drop_rate": share over capacity, "assignments": n}} of the forwards
    in training (or eval) mode since the last call; {} for dense models."""
    out = {}
    for name, m in moe_layers(model).items():
        s = m.take_stats(training)
        if s is not None:
            out[name] = s
    return out


def num_inactive_params(model: nn.Module) -> int:
    """Parameters a token does not use (experts it is not routed to): total - this = active parameters."""
    return sum(m.inactive_params() for m in moe_layers(model).values())


# --- reporting --------------------------------------------------------------------------------------


def training_metrics(model, aux_sums: dict) -> dict:
    """Metrics for a training log record: the mean router losses of the step and the routing since the last log."""
    out = {k: float(v) for k, v in aux_sums.items()}
    routing = routing_stats(model, training=True)
    if routing:
        out["moe_routing"] = routing
    return out


def describe(metrics: dict) -> str:
    """' | balance 1.02 | z 3.41 | dropped 0.8% | busiest expert 19%' (empty for a dense model)."""
    parts = [
        f"{name} {metrics[key]:.3g}" for key, name in (("moe_balance", "balance"), ("moe_z", "z")) if key in metrics
    ]
    routing = metrics.get("moe_routing")
    if routing:
        drop = sum(r["drop_rate"] for r in routing.values()) / len(routing)
        busiest = max(max(r["load"]) for r in routing.values())
        parts += [f"dropped {100 * drop:.1f}%", f"busiest expert {100 * busiest:.0f}%"]
    return "".join(" | " + p for p in parts)


def routing_table(routing: dict[str, dict], capacity_factor: float | None) -> list[str]:
    """One line per MoE layer: each expert's share of the routed assignments and the share beyond capacity."""
    lines = []
    for name, r in routing.items():
        load = " ".join(f"{100 * x:4.1f}" for x in r["load"])
        cap = (
            f"beyond capacity {100 * r['drop_rate']:.2f}% (factor {capacity_factor})"
            if capacity_factor
            else "no capacity limit"
        )
        lines.append(f"{name}: expert load % [{load}] | {cap}")
    return lines
