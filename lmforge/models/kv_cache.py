"""The KV cache of decoding: preallocated keys/values for every layer, with per-row lengths and left padding,
and a ring buffer for sliding-window attention.

One forward with a cache has two halves. `KVCache.begin` runs once, on the host, before the first layer: it
decides where the T new tokens of every row go and what they may attend to, and records that as a `CachePlan`.
`KVCache.update` runs in every layer and only applies the plan to that layer's keys/values, so the per-layer work
is a write, a read and no decisions. `KVCache.advance` closes the forward by moving each row's length on by T.

There are two kinds of plan (`PlanKind`):
- APPEND: write the new keys into their slots first, then attend over slots [0, read). This covers a prompt,
  a decode step, rows of different lengths (one token each, each at its own slot), the fixed-shape decode step of
  torch.compile (read the whole buffer), and a one-token step into a ring (its slot is index % size; afterwards
  the ring holds exactly the entries the window allows).
- RING_CHUNK: several tokens into a ring. Writing first would overwrite entries the chunk's earliest queries still
  need, so the layer reads the stored past, attends over past + new, and only then keeps the last `size` new
  entries in the ring.
"""

from __future__ import annotations

import copy
import enum
from dataclasses import dataclass

import torch


def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean (Tq, Tk) mask, True where query at q_pos may attend key at k_pos (causal, windowed)."""
    diff = q_pos[:, None] - k_pos[None, :]
    allowed = diff >= 0
    if window:
        allowed &= diff < window
    return allowed


class PlanKind(enum.Enum):
    """How a layer applies a plan: see the module docstring."""

    APPEND = "append"  # write, then attend over slots [0, read)
    RING_CHUNK = "ring_chunk"  # attend over past slots + new keys, then keep the last new keys in the ring


@dataclass(frozen=True, eq=False)
class CachePlan:
    """Where the T new tokens of one forward go in the cache and what they attend over; shared by all layers.

    kind: APPEND or RING_CHUNK.
    T: new tokens per row.
    mask: None, (T, S) shared by every row, or (B, 1, T, S); True where a query may attend a key. S is the number
        of keys attended: `read` for APPEND, len(past_slots) + T for RING_CHUNK.
    causal: attend with plain causal attention (SDPA's is_causal) instead of a mask; only for a fresh, unpadded
        prompt, where the keys are exactly the new tokens.
    write (APPEND): the slots the new keys go to — a slice of slots shared by every row (rows advance together),
        or a pair (rows (B,), slots (B,)) placing one token per row at its own slot.
    read (APPEND): attend over slots [0, read) after writing; equal to the buffer size to read all of it.
    past_slots (RING_CHUNK): ring slots of the stored entries, oldest first, (P,) with P <= size.
    keep_slots (RING_CHUNK): ring slots that receive the last len(keep_slots) new keys after attending.
    """

    kind: PlanKind
    T: int
    mask: torch.Tensor | None = None
    causal: bool = False
    write: slice | tuple[torch.Tensor, torch.Tensor] | None = None
    read: int = 0
    past_slots: torch.Tensor | None = None
    keep_slots: torch.Tensor | None = None


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
        self._plan: CachePlan | None = None  # the forward in progress, set by begin(), cleared by advance()
        # Decode steps attend over the whole buffer with an explicit mask: fixed shapes for torch.compile.
        self.static = False

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
        """Plan where T new tokens per row go (see `CachePlan`); return their positions, (T,) or (B, T) when
        rows sit at different positions.

        Raises ValueError when the sequence would pass max_positions (the positions that have an embedding),
        when rows of different lengths advance by more than one token, or when a non-ring cache is full.
        """
        n, B = self.lengths, len(self.lengths)
        longest = int((n - self.start).max()) + T  # positions of the longest row after this forward
        if max_positions is not None and longest > max_positions:
            raise ValueError(f"sequence of {longest} tokens exceeds the context window ({max_positions})")
        uniform = bool((n == n[0]).all())
        if not uniform and T != 1:
            raise ValueError("rows of different lengths can only advance one token at a time")
        if not self.ring and int(n.max()) + T > self.size:
            raise ValueError(f"KV cache full: {int(n.max()) + T} positions > {self.size}")
        padded = bool(self.start.any())
        n0 = int(n[0])
        rows = torch.arange(B, device=device)
        q_idx = n.to(device)[:, None] + torch.arange(T, device=device)  # (B, T) cache index of each new token
        start = self.start.to(device)[:, None, None]  # (B, 1, 1)

        if self.ring and T == 1:
            # One token per row: write it to slot index % size, then attend over the whole ring. Slot s then holds
            # the latest index k <= q with k % size == s; slots not yet written get a negative k, which the
            # padding test hides. Every stored entry is within the window, since the ring is the window.
            slots = torch.arange(self.size, device=device)
            k_idx = q_idx - (q_idx - slots) % self.size  # (B, size) cache index held by each slot
            mask = ((k_idx >= start[:, 0]) | (k_idx == q_idx))[:, None, None, :]  # (B, 1, 1, size)
            plan = CachePlan(PlanKind.APPEND, T, mask, write=(rows, q_idx[:, 0] % self.size), read=self.size)
        elif self.ring:
            # A chunk (rows advance together): the past is the last min(n0, size) indices still in the ring.
            past = min(n0, self.size)
            k_idx = torch.arange(n0 - past, n0 + T, device=device)  # (past + T,) indices attended, oldest first
            # Of the new tokens only the last `size` can be needed later; writing more would put two of them in
            # one slot within one scatter, with no defined winner.
            keep = min(T, self.size)
            plan = CachePlan(
                PlanKind.RING_CHUNK,
                T,
                self._mask(q_idx, k_idx, start, padded),
                past_slots=k_idx[:past] % self.size,
                keep_slots=torch.arange(n0 + T - keep, n0 + T, device=device) % self.size,
            )
        elif self.static and T == 1:
            # The compiled decode step: every row writes its own slot and reads the whole buffer, so no tensor
            # shape depends on how far the rows have got; the mask hides what is not there yet.
            k_idx = torch.arange(self.size, device=device)
            mask = self._mask(q_idx, k_idx, start, True)  # (B, 1, 1, size)
            plan = CachePlan(PlanKind.APPEND, T, mask, write=(rows, q_idx[:, 0]), read=self.size)
        else:
            # The common case: append at each row's end and read the used prefix of the buffer.
            S = int(n.max()) + T
            write = slice(n0, n0 + T) if uniform else (rows, q_idx[:, 0])
            mask, causal = None, False
            if padded or not uniform or self.window is not None:
                mask = self._mask(q_idx, torch.arange(S, device=device), start, padded)
            elif S == T:
                causal = True  # a fresh prompt: plain causal attention, no mask tensor at all
            elif T > 1:
                mask = window_mask(q_idx[0], torch.arange(S, device=device), None)  # a chunk after a cached past
            # else: one token after an unpadded past may see every stored entry: no mask
            plan = CachePlan(PlanKind.APPEND, T, mask, causal, write=write, read=S)
        self._plan = plan
        # Positions count from each row's first real token; padding slots get clamped to 0 (nobody attends them).
        positions = q_idx - start[:, :, 0] if padded or not uniform or self.static else q_idx[0]
        return positions.clamp(min=0)

    def _mask(self, q_idx, k_idx, start, padded: bool) -> torch.Tensor:
        """(B, 1, T, S), or (T, S) when no row is padded or ahead: causal, windowed, padding hidden;
        every query sees itself."""
        if not padded and bool((q_idx == q_idx[:1]).all()):
            return window_mask(q_idx[0], k_idx, self.window)
        q, k = q_idx[:, :, None], k_idx[None, None, :]
        allowed = (k <= q) & (k >= start)
        if self.window:
            allowed &= q - k < self.window
        return (allowed | (k == q))[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store this layer's new keys/values (B, n_kv_head, T, head_dim) as planned by `begin`; return
        (keys, values, mask, is_causal) to attend over, keys/values (B, n_kv_head, S, head_dim)."""
        p = self._plan
        ck, cv = self.k[layer], self.v[layer]
        k, v = k.to(ck.dtype), v.to(cv.dtype)  # e.g. bf16 activations under autocast, fp32 cache
        if p.kind is PlanKind.RING_CHUNK:
            # Read the past before writing: the new keys may land in slots the chunk's first queries still read.
            keys = torch.cat((ck[:, :, p.past_slots], k), dim=2)
            values = torch.cat((cv[:, :, p.past_slots], v), dim=2)
            keep = len(p.keep_slots)
            ck[:, :, p.keep_slots] = k[:, :, p.T - keep :]
            cv[:, :, p.keep_slots] = v[:, :, p.T - keep :]
            return keys, values, p.mask, False
        if isinstance(p.write, slice):
            ck[:, :, p.write] = k
            cv[:, :, p.write] = v
        else:  # one token per row, each row at its own slot
            rows, slots = p.write
            ck[rows, :, slots] = k[:, :, 0]
            cv[rows, :, slots] = v[:, :, 0]
        return ck[:, :, : p.read], cv[:, :, : p.read], p.mask, p.causal

    @torch.compiler.disable
    def advance(self, T: int):
        """Close the forward begun by `begin`: every row now holds T more entries."""
        self.lengths += T
        self._plan = None

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (in that order), e.g. the surviving hypotheses of a beam search."""
        self.k = [k.index_select(0, index) for k in self.k]
        self.v = [v.index_select(0, index) for v in self.v]
        host = index.cpu()
        self.lengths, self.start = self.lengths.index_select(0, host), self.start.index_select(0, host)
        self._plan = None
