"""The KV cache of decoding: preallocated keys/values for every layer, with per-row lengths and left padding,
and a ring buffer for sliding-window attention."""

from __future__ import annotations

import copy

import torch


def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean (Tq, Tk) mask, True where query at q_pos may attend key at k_pos (causal, windowed)."""
    diff = q_pos[:, None] - k_pos[None, :]
    allowed = diff >= 0
    if window:
        allowed &= diff < window
    return allowed


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

    def __init__(
        self,
        n_layer: int,
        batch: int,
        n_kv_head: int,
        head_dim: int,
        max_len: int,
        window: int | None = None,
        device=None,
        dtype=torch.float32,
    ):
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
        self.static = (
            False  # decode steps attend over the whole buffer with an explicit mask: fixed shapes for torch.compile
        )

    @property
    def pos(self) -> int:
        """Entries written to the longest row (the next index, when all rows advance together)."""
        return int(self.lengths.max())

    def reset(self):
        self.lengths.zero_()
        self.start.zero_()

    def rows(self, lo: int, hi: int) -> KVCache:
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
            raise ValueError(
                f"sequence of {int((n - self.start).max()) + T} tokens exceeds the context window ({max_positions})"
            )
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
            plan.update(
                write=(torch.arange(B, device=device), q_idx[:, 0] % self.size),
                read="all",
                mask=((k_idx >= start[:, 0]) | (k_idx == q_idx))[:, None, None, :],
            )
        elif self.ring:
            # Several tokens at once: attend over the stored past (at most size entries) and the new tokens.
            n0 = plan["n0"]
            past = min(n0, self.size)
            k_idx = torch.arange(n0 - past, n0 + T, device=device)
            keep = min(T, self.size)  # only the last `size` new indices can still be needed later
            plan.update(
                write="ring",
                read="ring",
                past_slots=k_idx[:past] % self.size,
                keep=keep,
                keep_slots=torch.arange(n0 + T - keep, n0 + T, device=device) % self.size,
            )
            plan["mask"] = self._mask(q_idx, k_idx, start, padded)
        elif self.static and T == 1:
            plan.update(
                write=(torch.arange(B, device=device), q_idx[:, 0]),
                read=self.size,
                mask=self._mask(q_idx, torch.arange(self.size, device=device), start, True),
            )
        else:
            S = int(n.max()) + T
            plan.update(
                write=slice(plan["n0"], plan["n0"] + T) if uniform else (torch.arange(B, device=device), q_idx[:, 0]),
                read=S,
            )
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
            ck[:, :, p["keep_slots"]] = k[:, :, T - keep :]
            cv[:, :, p["keep_slots"]] = v[:, :, T - keep :]
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
