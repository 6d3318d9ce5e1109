"""Building blocks shared by the model families: norms, positions, attention, feed-forward, KV cache."""

from __future__ import annotations

import copy
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

    Each row b holds one sequence: `lengths[b]` entries have been written to it, and the first
    `start[b]` of them are left padding (prompts of different lengths batched together), which no
    query attends to; the token at index i therefore has position i - start[b]. Rows usually advance
    together; a one-token decode step may also continue rows of different lengths.

    Without a sliding window `size` is the longest sequence to generate and index i lives in slot i.
    With a window W shorter than that, `size` is W and the buffer is a ring: index i lives in slot
    i % W, so memory stays constant however long generation runs.
    """

    def __init__(self, n_layer: int, batch: int, n_kv_head: int, head_dim: int, max_len: int,
                 window: int | None = None, device=None, dtype=torch.float32):
        self.window = window
        self.size = min(max_len, window) if window else max_len
        self.ring = self.size < max_len
        shape = (batch, n_kv_head, self.size, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        # Bookkeeping stays on the host, so reading it never waits for the device.
        self.lengths = torch.zeros(batch, dtype=torch.long)  # entries written per row
        self.start = torch.zeros(batch, dtype=torch.long)  # left padding per row
        self._plan = None  # where the tokens of the forward in progress go, shared by all layers
        self.static = False  # decode steps attend over the whole buffer with an explicit mask: fixed shapes for torch.compile

    @property
    def pos(self) -> int:
        """Entries written to the longest row (the next index, when all rows advance together)."""
        return int(self.lengths.max())

    def reset(self):
        self.lengths.zero_()
        self.start.zero_()

    def rows(self, lo: int, hi: int) -> "KVCache":
        """Rows lo..hi-1 as a cache of their own, sharing storage and bookkeeping with this one."""
        view = copy.copy(self)
        view.k, view.v = [t[lo:hi] for t in self.k], [t[lo:hi] for t in self.v]
        view.lengths, view.start = self.lengths[lo:hi], self.start[lo:hi]
        view._plan = None
        return view

    def move_row(self, src: int, dst: int):
        """Copy row src (its entries and bookkeeping) into row dst."""
        n = self.size if self.ring else int(self.lengths[src])
        for t in self.k + self.v:
            t[dst, :, :n] = t[src, :, :n]
        self.lengths[dst], self.start[dst] = self.lengths[src], self.start[src]

    @torch.compiler.disable  # host-side bookkeeping: runs eagerly even inside a compiled model
    def begin(self, T: int, device, max_positions: int | None = None) -> torch.Tensor:
        """Plan where T new tokens per row go; return their positions, (T,) or (B, T) when rows differ."""
        n, B = self.lengths, len(self.lengths)
        if max_positions is not None and int((n - self.start).max()) + T > max_positions:
            raise ValueError(f"sequence of {int((n - self.start).max()) + T} tokens exceeds the context window ({max_positions})")
        uniform = bool((n == n[0]).all())
        if not uniform and T != 1:
            raise ValueError("rows of different lengths can only advance one token at a time")
        if not self.ring and int(n.max()) + T > self.size:
            raise ValueError(f"KV cache full: {int(n.max()) + T} positions > {self.size}")
        padded = bool(self.start.any())
        steps = torch.arange(T, device=device)
        q_idx = n.to(device)[:, None] + steps  # (B, T) cache index of each new token
        start = self.start.to(device)[:, None, None]  # (B, 1, 1)
        plan = {"n0": int(n[0]), "T": T, "mask": None, "causal": False}
        if self.ring and T == 1:
            # Write first, then attend over the whole ring: slot s holds the latest index <= q with index % size == s.
            slots = torch.arange(self.size, device=device)
            k_idx = q_idx - (q_idx - slots) % self.size  # (B, size)
            plan.update(write=(torch.arange(B, device=device), q_idx[:, 0] % self.size), read="all",
                        mask=((k_idx >= start[:, 0]) | (k_idx == q_idx))[:, None, None, :])
        elif self.ring:
            # Several tokens at once: attend over the stored past (at most size entries) and the new tokens.
            n0 = plan["n0"]
            past = min(n0, self.size)
            k_idx = torch.arange(n0 - past, n0 + T, device=device)
            keep = min(T, self.size)  # only the last `size` new indices can still be needed later
            plan.update(write="ring", read="ring", past_slots=k_idx[:past] % self.size, keep=keep,
                        keep_slots=torch.arange(n0 + T - keep, n0 + T, device=device) % self.size)
            plan["mask"] = self._mask(q_idx, k_idx, start, padded)
        elif self.static and T == 1:
            plan.update(write=(torch.arange(B, device=device), q_idx[:, 0]), read=self.size,
                        mask=self._mask(q_idx, torch.arange(self.size, device=device), start, True))
        else:
            S = int(n.max()) + T
            plan.update(write=slice(plan["n0"], plan["n0"] + T) if uniform else (torch.arange(B, device=device), q_idx[:, 0]), read=S)
            if not padded and uniform and self.window is None:
                if S == T:
                    plan["causal"] = True  # a fresh prompt: plain causal attention
                elif T > 1:
                    plan["mask"] = window_mask(q_idx[0], torch.arange(S, device=device), None)
            else:
                plan["mask"] = self._mask(q_idx, torch.arange(S, device=device), start, padded)
        self._plan = plan
        positions = q_idx - start[:, :, 0] if padded or not uniform or self.static else q_idx[0]
        return positions.clamp(min=0)

    def _mask(self, q_idx, k_idx, start, padded: bool) -> torch.Tensor:
        """(B, 1, T, S), or (T, S) when no row is padded or ahead: causal, windowed, padding hidden; every query sees itself."""
        if not padded and bool((q_idx == q_idx[:1]).all()):
            return window_mask(q_idx[0], k_idx, self.window)
        q, k = q_idx[:, :, None], k_idx[None, None, :]
        allowed = (k <= q) & (k >= start)
        if self.window:
            allowed &= q - k < self.window
        return (allowed | (k == q))[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store this layer's new keys/values; return (keys, values, mask, is_causal) to attend over."""
        p = self._plan
        ck, cv = self.k[layer], self.v[layer]
        k, v = k.to(ck.dtype), v.to(cv.dtype)  # e.g. bf16 activations under autocast, fp32 cache
        if p["read"] == "ring":
            keys = torch.cat((ck[:, :, p["past_slots"]], k), dim=2)
            values = torch.cat((cv[:, :, p["past_slots"]], v), dim=2)
            T, keep = p["T"], p["keep"]
            ck[:, :, p["keep_slots"]] = k[:, :, T - keep:]
            cv[:, :, p["keep_slots"]] = v[:, :, T - keep:]
            return keys, values, p["mask"], False
        if isinstance(p["write"], slice):
            ck[:, :, p["write"]] = k
            cv[:, :, p["write"]] = v
        else:  # one token per row, each row at its own index
            rows, idx = p["write"]
            ck[rows, :, idx] = k[:, :, 0]
            cv[rows, :, idx] = v[:, :, 0]
        if p["read"] == "all":
            return ck, cv, p["mask"], False
        return ck[:, :, : p["read"]], cv[:, :, : p["read"]], p["mask"], p["causal"]

    @torch.compiler.disable
    def advance(self, T: int):
        self.lengths += T
        self._plan = None

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (in that order), e.g. the surviving hypotheses of a beam search."""
        self.k = [k.index_select(0, index) for k in self.k]
        self.v = [v.index_select(0, index) for v in self.v]
        host = index.cpu()
        self.lengths, self.start = self.lengths.index_select(0, host), self.start.index_select(0, host)
        self._plan = None


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

        if cache is None:
            pos = torch.arange(T, device=x.device)
            mask = window_mask(pos, pos, self.window) if self.window else None
            keys, values, is_causal = k, v, mask is None
        else:  # mask: (T, S) or (B, 1, T, S), True where a query may look
            keys, values, mask, is_causal = cache.update(self.layer_idx, k, v)

        if keys.shape[1] != self.n_head:  # grouped-query: share each key/value head across its query group
            rep = self.n_head // self.n_kv_head
            keys, values = keys.repeat_interleave(rep, dim=1), values.repeat_interleave(rep, dim=1)

        y = self._attend(q, keys, values, mask, is_causal)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.proj(y)

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
