"""Building blocks shared by the model families: norms, positions, packed sequences, attention, feed-forward."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .kv_cache import KVCache, window_mask

# --- normalisation --------------------------------------------------------------------------------


class _RMSNormFP32(torch.autograd.Function):
    """weight * x * rsqrt(mean(x^2) + eps) over the last dim of an fp32 x (..., d), with a hand-written backward.

    On a CPU, F.rms_norm is a chain of separate kernels (square, mean, add, rsqrt, multiply) and autograd
    differentiates each: a dozen passes over x per norm. Here the forward is one norm reduction and two
    multiplies, and the backward, with x^ = x * r (r = rsqrt(mean(x^2) + eps), per row) and g the output's
    gradient, is (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization"):
        dweight = sum over rows of g * x^
        dx      = r * (g * weight - x^ * mean(g * weight * x^))
    where mean(g * weight * x^) = (g * x^) @ weight / d reuses the product that dweight needs.
    """

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        d = x.shape[-1]
        ms = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(d)  # mean(x^2), (..., 1)
        r = ms.add_(eps).rsqrt_()
        normed = x * r
        ctx.save_for_backward(normed, r, weight)
        return normed * weight

    @staticmethod
    def backward(ctx, g):
        normed, r, weight = ctx.saved_tensors
        gn = g * normed  # (..., d)
        dweight = gn.reshape(-1, gn.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        dx = None
        if ctx.needs_input_grad[0]:
            m = (gn @ weight).unsqueeze(-1).div_(g.shape[-1])  # mean(g * weight * x^), (..., 1)
            dx = (g * weight).sub_(normed * m).mul_(r)
        return dx, dweight, None


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 (as Llama does) and cast back."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32 and not torch.compiler.is_compiling():
            return _RMSNormFP32.apply(x, self.weight, self.eps)
        # Other dtypes (and under torch.compile, which fuses this itself): normalise in fp32 and round to x's
        # dtype before the weight, as Llama does.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def make_norm(kind: str, dim: int, eps: float, bias: bool = True) -> nn.Module:
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    return nn.LayerNorm(dim, eps=eps, bias=bias)


# --- positions ------------------------------------------------------------------------------------


def sinusoidal_table(n_pos: int, dim: int) -> torch.Tensor:
    """The fixed sin/cos position table of "Attention Is All You Need": (n_pos, dim)."""
    pos = torch.arange(n_pos, dtype=torch.float32)[:, None]
    inv = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(n_pos, dim)
    table[:, 0::2] = torch.sin(pos * inv)
    table[:, 1::2] = torch.cos(pos * inv[: dim // 2])
    return table


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Rotary frequencies, with optional linear, NTK ("dynamic"-free static) or llama3 scaling."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv
    kind = scaling.get("type", scaling.get("rope_type", "linear"))
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
        return inv / factor
    if kind == "ntk":
        theta = theta * factor ** (head_dim / (head_dim - 2))
        return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if kind == "llama3":
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(is_mid, mid, scaled)
    raise ValueError(f"unknown rope scaling type {kind!r}")


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the position angles for positions (T,) or (B, T): shape (..., T, head_dim / 2) each.

    Computed once per forward and shared by every layer (they are small: T x head_dim / 2)."""
    freqs = positions.float()[..., None] * inv_freq.float()
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    """Rotate the pairs (x1, x2) = (x[..., i], x[..., i + head_dim/2]) by the angles: (x1 c - x2 s, x2 c + x1 s),
    or by minus the angles if inverse. Writes the halves of one new tensor: no concatenation, no negated copy.
    Queries and keys (B, H, T, head_dim) arrive as views of the QKV projection's (B, T, H, head_dim) slices; they
    are first copied dense in that (B, T, H, head_dim) order: the four products over the strided halves ran at
    half the speed of the copy plus the products (CPU, `tiny`: 1.34 vs 0.62 ms per call). Dense in the
    projection's order, not contiguous as (B, H, T, head_dim): attention's output follows the query's layout,
    and in that order the heads merge back for the output projection without a copy."""
    if x.dim() == 4 and not x.is_contiguous() and not x.transpose(1, 2).is_contiguous():
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = torch.empty_like(x, dtype=torch.result_type(x, cos))
    o1, o2 = out[..., :half], out[..., half:]
    torch.mul(x1, cos, out=o1)
    torch.mul(x2, cos, out=o2)
    o1.addcmul_(x2, sin, value=1 if inverse else -1)
    o2.addcmul_(x1, sin, value=-1 if inverse else 1)
    return out


class _Rope(torch.autograd.Function):
    """Rotary position embedding as one function: the gradient of a rotation is the inverse rotation."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        ctx.x_dtype = x.dtype
        return _rotate(x, cos, sin, inverse=False)

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        return _rotate(g, cos, sin, inverse=True).to(ctx.x_dtype), None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + head_dim/2) of x (B, H, T, head_dim) by the position angles (RoFormer, Su et al. 2021,
    in the half-split layout Llama uses). cos, sin: (T, head_dim/2), or (B, T, head_dim/2) for per-row positions."""
    if cos.dim() == 3:  # per-sequence positions (B, T, D/2) -> broadcast over heads
        cos, sin = cos[:, None], sin[:, None]
    if torch.compiler.is_compiling():  # the plain formula: the compiler fuses it (it cannot trace out= into views)
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return _Rope.apply(x, cos, sin)


# --- packed sequences -----------------------------------------------------------------------------
# Several short sequences (say, chat conversations) share one row of a batch; `segments` (B, T) numbers them,
# equal ids on consecutive tokens. Each token then sits at its position within its own sequence and attends
# only to earlier tokens of that sequence, so the row computes exactly what each sequence would alone.


def segment_positions(segments: torch.Tensor) -> torch.Tensor:
    """(B, T) position of each token within its segment (0 at the token where the segment id changes)."""
    idx = torch.arange(segments.shape[1], device=segments.device).expand_as(segments)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.where(starts, idx, 0).cummax(dim=1).values  # index of each token's segment start
    return idx - first


def segment_mask(segments: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """(B, 1, T, T) boolean attention mask, True where a query may look: causal (and windowed) within a segment."""
    pos = torch.arange(segments.shape[1], device=segments.device)
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T): block diagonal
    return (same & window_mask(pos, pos, window))[:, None]


# --- attention ------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Causal self-attention with one fused QKV projection, GQA, optional RoPE, QK-norm, window and softcap.

    Value residual (cfg.value_residual; Zhou et al. 2024, "Value Residual Learning For Alleviating Attention
    Concentration In Transformers", arXiv:2410.17897, the ResFormer): every layer after the first attends over
    values mixed with the first layer's, v_l <- lambda_l v_l + (1 - lambda_l) v_1, elementwise on
    (B, n_kv_head, T, head_dim).
    lambda_l is one learnable scalar per layer, initialised at 0.5, as in the modded-nanogpt speedrun: training
    starts from the paper's main setting (equal weights) and each layer may then learn how much of v_1 it wants,
    at the cost of one parameter per layer. The first layer has no lambda: it hands its own values on. With a
    cache, each layer stores the values it attended over (the mixed ones), so past positions are never mixed
    twice, and the new tokens' v_1 comes from the first layer in the same forward.
    """

    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.window = cfg.sliding_window
        self.softcap = cfg.attn_softcap
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=cfg.bias)
        self.proj = nn.Linear(self.n_head * self.head_dim, cfg.d_model, bias=cfg.bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.value_residual = cfg.value_residual
        self.value_lambda = nn.Parameter(torch.full((1,), 0.5)) if cfg.value_residual and layer_idx > 0 else None

    def forward(self, x, rope=None, cache: KVCache | None = None, mask: torch.Tensor | None = None, v_first=None):
        """x (B, T, d_model) -> (out (B, T, d_model), v_first). mask: (B, 1, T, T) from segment_mask for packed
        rows (no cache). v_first: the first layer's values (B, n_kv_head, T, head_dim) with value residual, which
        the first layer returns and the later ones take and return unchanged; None without value residual."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=-1
        )
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, head_dim)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv_head, T, head_dim)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.value_lambda is not None:  # lerp(v_1, v, lambda) = lambda v + (1 - lambda) v_1
            v = torch.lerp(v_first, v, self.value_lambda.to(v.dtype))
        elif self.value_residual:  # the first layer: its values are v_1 of every later layer
            v_first = v

        if cache is None:
            if mask is None:
                pos = torch.arange(T, device=x.device)
                mask = window_mask(pos, pos, self.window) if self.window else None
            keys, values, is_causal = k, v, mask is None
        else:  # mask: (T, S) or (B, 1, T, S), True where a query may look
            keys, values, mask, is_causal = cache.update(self.layer_idx, k, v)

        if not q.dtype == keys.dtype == values.dtype:  # bf16 projections (--quantize bf16) around fp32 norms/RoPE
            q, keys = q.to(values.dtype), keys.to(values.dtype)
        if keys.shape[1] != self.n_head:  # grouped-query: share each key/value head across its query group
            rep = self.n_head // self.n_kv_head
            keys, values = keys.repeat_interleave(rep, dim=1), values.repeat_interleave(rep, dim=1)

        y = self._attend(q, keys, values, mask, is_causal)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.proj(y), v_first

    def _attend(self, q, k, v, mask, is_causal: bool):
        dropout = self.dropout if self.training else 0.0
        if self.softcap is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout)
        # Softcapped logits (Gemma 2 style) need the scores explicitly.
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        scores = self.softcap * torch.tanh(scores / self.softcap)
        if is_causal:
            mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - q.shape[2])
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = F.dropout(scores.softmax(-1), dropout, self.training)
        return probs @ v


# --- feed-forward ---------------------------------------------------------------------------------


class MLP(nn.Module):
    """Position-wise feed-forward: ReLU / GELU / ReLU² (up, act, down) or gated SwiGLU / GeGLU (gate * up, down).

    `hidden` overrides the hidden size (cfg.ff_dim), e.g. for the experts of a Mixture of Experts.
    """

    def __init__(self, cfg, hidden: int | None = None):
        super().__init__()
        self.kind = cfg.mlp
        self.gated = cfg.mlp in ("swiglu", "geglu")
        hidden = hidden or cfg.ff_dim
        if self.gated:
            self.gate = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)
        self.up = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)
        self.down = nn.Linear(hidden, cfg.d_model, bias=cfg.bias)

    def forward(self, x):
        if self.kind == "swiglu":
            h = F.silu(self.gate(x)) * self.up(x)
        elif self.kind == "geglu":
            h = F.gelu(self.gate(x), approximate="tanh") * self.up(x)
        elif self.kind == "relu2":
            h = F.relu(self.up(x)).square()
        elif self.kind == "relu":
            h = F.relu(self.up(x))
        else:
            h = F.gelu(self.up(x), approximate="tanh" if self.kind == "gelu_tanh" else "none")
        return self.down(h)
