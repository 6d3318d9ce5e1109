"""Building blocks shared by the model families: norms, positions, attention, feed-forward, KV cache."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# --- normalisation --------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 (as Llama does) and cast back."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


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
    """cos and sin for positions (T,) or (B, T): shape (..., T, head_dim), halves repeated."""
    freqs = positions.float()[..., None] * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + head_dim/2) of x (B, H, T, head_dim) by the position angles."""
    if cos.dim() == 3:  # per-sequence positions (B, T, D) -> broadcast over heads
        cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


# --- KV cache -------------------------------------------------------------------------------------


class KVCache:
    """Preallocated keys/values for every layer: (B, n_kv_head, size, head_dim).

    Without a sliding window `size` is the longest sequence to generate and entry t holds
    position t. With a window of W, `size` is W and the buffer is a ring: position t lives in
    slot t % W, so memory stays constant however long generation runs.
    """

    def __init__(self, n_layer: int, batch: int, n_kv_head: int, head_dim: int, max_len: int,
                 window: int | None = None, device=None, dtype=torch.float32):
        self.window = window
        self.size = min(max_len, window) if window else max_len
        shape = (batch, n_kv_head, self.size, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.pos = 0  # number of positions already stored (the next token's absolute position)

    def reset(self):
        self.pos = 0

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (in that order), e.g. the surviving hypotheses of a beam search."""
        self.k = [k.index_select(0, index) for k in self.k]
        self.v = [v.index_select(0, index) for v in self.v]


# --- attention ------------------------------------------------------------------------------------


def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean (Tq, Tk) mask, True where query at q_pos may attend key at k_pos (causal, windowed)."""
    diff = q_pos[:, None] - k_pos[None, :]
    allowed = diff >= 0
    if window:
        allowed &= diff < window
    return allowed


class Attention(nn.Module):
    """Causal self-attention with one fused QKV projection, GQA, optional RoPE, QK-norm, window and softcap."""

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

    def forward(self, x, rope=None, cache: KVCache | None = None):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split([self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, head_dim)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv_head, T, head_dim)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)

        start = cache.pos if cache is not None else 0
        q_pos = torch.arange(start, start + T, device=x.device)
        if cache is None:
            keys, values, k_pos = k, v, q_pos
        else:
            keys, values, k_pos = self._use_cache(cache, k, v, start, T)

        if keys.shape[1] != self.n_head:  # grouped-query: share each key/value head across its query group
            rep = self.n_head // self.n_kv_head
            keys, values = keys.repeat_interleave(rep, dim=1), values.repeat_interleave(rep, dim=1)

        y = self._attend(q, keys, values, q_pos, k_pos, plain_causal=(start == 0 and keys.shape[2] == T))
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.proj(y)

    def _use_cache(self, cache: KVCache, k, v, start: int, T: int):
        """Store the new keys/values and return (keys, values, key positions) to attend over."""
        ck, cv = cache.k[self.layer_idx], cache.v[self.layer_idx]
        if cache.window is None:
            if start + T > cache.size:
                raise ValueError(f"KV cache full: {start + T} positions > {cache.size}")
            ck[:, :, start: start + T] = k.to(ck.dtype)
            cv[:, :, start: start + T] = v.to(cv.dtype)
            return ck[:, :, : start + T], cv[:, :, : start + T], torch.arange(start + T, device=k.device)
        # Ring buffer: attend over the stored past (at most size entries) plus the new tokens.
        size = cache.size
        past = min(start, size)
        past_pos = torch.arange(start - past, start, device=k.device)
        slots = past_pos % size
        k, v = k.to(ck.dtype), v.to(cv.dtype)
        keys = torch.cat((ck[:, :, slots], k), dim=2)
        values = torch.cat((cv[:, :, slots], v), dim=2)
        k_pos = torch.cat((past_pos, torch.arange(start, start + T, device=k.device)))
        keep = min(T, size)  # only the last `size` new positions can still be needed later
        new_pos = torch.arange(start + T - keep, start + T, device=k.device)
        ck[:, :, new_pos % size] = k[:, :, T - keep:]
        cv[:, :, new_pos % size] = v[:, :, T - keep:]
        return keys, values, k_pos

    def _attend(self, q, k, v, q_pos, k_pos, plain_causal: bool):
        dropout = self.dropout if self.training else 0.0
        if self.softcap is None:
            if plain_causal and self.window is None:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
            if q.shape[2] == 1 and self.window is None:
                return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)  # one new token sees every cached one
            mask = window_mask(q_pos, k_pos, self.window)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        # Softcapped logits (Gemma 2 style) need the scores explicitly.
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        scores = self.softcap * torch.tanh(scores / self.softcap)
        scores = scores.masked_fill(~window_mask(q_pos, k_pos, self.window), float("-inf"))
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
