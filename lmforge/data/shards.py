"""The token shard format and the batch loader.

Shards use the llm.c layout: a header of 256 little-endian int32 (magic, version,
token count, ...), then the tokens as uint16 (version 1) or uint32 (version 2).
Documents are separated by the end-of-text token. `TokenData` memory-maps every shard of a
split and samples random windows from them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import LmforgeError
from ..io import atomic_path

SHARD_MAGIC = 20240520


HEADER_INTS = 256


HEADER_BYTES = HEADER_INTS * 4


VERSION_UINT16 = 1


VERSION_UINT32 = 2


def dtype_for_vocab(vocab_size: int):
    return np.uint16 if vocab_size <= 65536 else np.uint32


class ShardWriter:
    """Append tokens to a shard file; the header's token count is written when the shard is closed."""

    def __init__(self, path: Path, vocab_size: int):
        self.path = Path(path)
        self.dtype = dtype_for_vocab(vocab_size)
        self.count = 0
        self._ctx = atomic_path(self.path)
        self._tmp = self._ctx.__enter__()
        self._fh = open(self._tmp, "wb")
        self._fh.write(b"\0" * HEADER_BYTES)

    def write(self, tokens) -> None:
        arr = np.asarray(tokens, dtype=self.dtype)
        self._fh.write(arr.tobytes())
        self.count += len(arr)

    def close(self) -> None:
        self._fh.seek(0)
        self._fh.write(_header(self.count, self.dtype).tobytes())
        self._fh.close()
        self._ctx.__exit__(None, None, None)

    def abort(self) -> None:
        self._fh.close()
        try:
            self._ctx.__exit__(KeyboardInterrupt, KeyboardInterrupt(), None)
        except KeyboardInterrupt:
            pass


def _header(count: int, dtype) -> np.ndarray:
    h = np.zeros(HEADER_INTS, dtype="<i4")
    h[0] = SHARD_MAGIC
    h[1] = VERSION_UINT16 if dtype == np.uint16 else VERSION_UINT32
    h[2] = count
    return h


def write_shard(path: str | Path, tokens, vocab_size: int) -> None:
    w = ShardWriter(Path(path), vocab_size)
    try:
        w.write(tokens)
    except BaseException:
        w.abort()
        raise
    w.close()


def read_shard(path: str | Path) -> np.ndarray:
    """Memory-map a shard's tokens (validating the header against the file size)."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"shard not found: {path}")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise LmforgeError(f"shard {path} is truncated (no complete header)")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise LmforgeError(f"{path} is not a token shard (bad magic number)")
    if header[1] not in (VERSION_UINT16, VERSION_UINT32):
        raise LmforgeError(f"shard {path} has unsupported version {header[1]}")
    dtype = np.uint16 if header[1] == VERSION_UINT16 else np.uint32
    count = int(header[2])
    expected = HEADER_BYTES + count * np.dtype(dtype).itemsize
    if size != expected:
        raise LmforgeError(
            f"shard {path} is truncated or corrupt: header says {count} tokens ({expected} bytes), "
            f"file has {size} bytes"
        )
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))


def shard_paths(directory: str | Path, split: str) -> list[Path]:
    return sorted(Path(directory).glob(f"{split}_*.bin"))


class TokenData:
    """All shards of one split, memory-mapped, sampled as random windows of seq_len + 1 tokens."""

    def __init__(self, directory: str | Path, split: str):
        self.directory, self.split = Path(directory), split
        paths = shard_paths(directory, split)
        if not paths:
            raise LmforgeError(f"no {split} shards in {directory} (run 'lmforge prepare' first)")
        self.shards = [read_shard(p) for p in paths]
        self.lengths = np.array([len(s) for s in self.shards], dtype=np.int64)
        self.total = int(self.lengths.sum())

    def check(self, seq_len: int, vocab_size: int | None = None) -> None:
        """LmforgeError unless a window of seq_len + 1 tokens fits in a shard (and every id is below vocab_size)."""
        if max(self.lengths) < seq_len + 1:
            raise LmforgeError(
                f"not enough tokens: the largest shard has {max(self.lengths)}, a window needs {seq_len + 1}"
            )
        if vocab_size is not None:
            self.check_vocab(vocab_size)

    def check_vocab(self, vocab_size: int) -> None:
        """LmforgeError (one line) when a token id of this split is not below vocab_size."""
        tops = [int(s.max()) for s in self.shards if len(s)]
        if tops and max(tops) >= vocab_size:
            raise LmforgeError(
                f"{self.split} shard token id {max(tops)} in {self.directory} is outside the model vocabulary "
                f"({vocab_size})"
            )

    def draw_starts(self, n: int, seq_len: int, generator: torch.Generator) -> np.ndarray:
        """n random window starts (n,), positions in the concatenation of the shards' valid starts.

        One draw of all n: the windows of a training step are drawn here once, then split across ranks and
        micro-steps, so which windows a step sees does not depend on how many processes share it."""
        usable = np.maximum(self.lengths - seq_len, 0)  # number of valid start positions per shard
        return torch.randint(0, int(usable.sum()), (n,), generator=generator).numpy()

    def windows(self, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The windows (x, y) at `starts` (from draw_starts), each (len(starts), seq_len); y is x shifted by one."""
        cum = np.cumsum(np.maximum(self.lengths - seq_len, 0))
        rows = []
        for s in starts:
            k = int(np.searchsorted(cum, s, side="right"))
            off = int(s - (cum[k - 1] if k else 0))
            rows.append(np.asarray(self.shards[k][off : off + seq_len + 1], dtype=np.int64))
        buf = torch.from_numpy(np.stack(rows))
        return buf[:, :-1], buf[:, 1:]

    def batch(
        self, batch_size: int, seq_len: int, generator: torch.Generator, rank: int = 0, world: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows (x, y) of shape (batch_size, seq_len); y is x shifted by one.

        Under data parallelism every rank draws the same world x batch_size window starts (same
        generator state) and reads only its own share, so the global batch equals a
        single-process batch of world x batch_size.
        """
        starts = self.draw_starts(batch_size * world, seq_len, generator)
        return self.windows(starts[rank * batch_size : (rank + 1) * batch_size], seq_len)
