"""Corpus discovery, tokenisation into shards, and the batch loader.

Shards use the llm.c layout: a header of 256 little-endian int32 (magic, version,
token count, ...), then the tokens as uint16 (version 1) or uint32 (version 2).
Documents are separated by the end-of-text token.
"""

from __future__ import annotations

import glob as globmod
import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from .errors import LmforgeError
from .io import atomic_path

SHARD_MAGIC = 20240520
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
VERSION_UINT16 = 1
VERSION_UINT32 = 2

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".js", ".ts", ".java", ".go",
                 ".rs", ".rb", ".sh", ".toml", ".yaml", ".yml", ".cfg", ".ini", ".html", ".css", ".xml", ".tex", ".csv", ".tsv", ".json"}
DEFAULT_CORPUS = "stdlib"


# --- corpus discovery -----------------------------------------------------------------------------


def stdlib_files() -> list[Path]:
    """The running interpreter's standard library sources (no tests, no site-packages)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3"}
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("test"))
        out.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py") and not f.startswith("test_"))
    return out


def discover(spec: str | os.PathLike | None) -> list[Path]:
    """Files named by a path: a file, a directory (recursive) or a glob. None/'stdlib' = the default corpus."""
    if spec is None or str(spec) == DEFAULT_CORPUS:
        return stdlib_files()
    spec = str(spec)
    p = Path(spec)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts))
    elif any(c in spec for c in "*?["):
        files = sorted(Path(f) for f in globmod.glob(spec, recursive=True) if Path(f).is_file())
    else:
        raise LmforgeError(f"data path not found: {spec}")
    if not files:
        raise LmforgeError(f"no files found in {spec}")
    return files


def corpus_key(spec, files: list[Path]) -> str:
    """A fingerprint of the corpus (paths, sizes, mtimes) to know when cached shards are stale."""
    h = hashlib.sha256(str(spec).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


@dataclass
class SkipCounter:
    files: int = 0


LARGE_FILE_BYTES = 64 << 20  # text files above this are streamed in pieces, never read whole
STREAM_BLOCK = 1 << 20


def _documents(files: list[Path], skipped: SkipCounter, include_pydoc_topics: bool) -> Iterator[Iterable[str]]:
    """Yield each document as an iterable of text pieces (one piece, or a stream of them for a huge file)."""
    for f in files:
        suffix = f.suffix.lower()
        if suffix == ".jsonl":
            yield from ([t] for t in _read_jsonl(f, skipped))
        elif suffix == ".parquet":
            yield from ([t] for t in _read_parquet(f))
        else:
            try:
                size = f.stat().st_size
                if size > LARGE_FILE_BYTES:
                    if _is_utf8_text_file(f):
                        yield _stream_text_file(f)
                    else:
                        skipped.files += 1
                    continue
                raw = f.read_bytes()
            except OSError:
                skipped.files += 1
                continue
            if b"\0" in raw[:8192]:
                skipped.files += 1
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                skipped.files += 1
                continue
            if text.strip():
                yield [text]
    if include_pydoc_topics:
        yield from ([t] for t in _pydoc_topics())


def _is_utf8_text_file(path: Path) -> bool:
    """Check a large file is UTF-8 text, streaming (no NUL bytes near the start, decodes cleanly)."""
    import codecs

    dec = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as fh:
        first = True
        while block := fh.read(STREAM_BLOCK):
            if first and b"\0" in block[:8192]:
                return False
            first = False
            try:
                dec.decode(block)
            except UnicodeDecodeError:
                return False
    try:
        dec.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _stream_text_file(path: Path) -> Iterator[str]:
    """Pieces of a large UTF-8 file, cut at line breaks, about STREAM_BLOCK characters each."""
    import codecs

    dec = codecs.getincrementaldecoder("utf-8")()
    carry = ""
    with open(path, "rb") as fh:
        while block := fh.read(STREAM_BLOCK):
            text = carry + dec.decode(block)
            cut = text.rfind("\n") + 1
            if cut == 0:
                carry = text
                continue
            carry = text[cut:]
            yield text[:cut]
    carry += dec.decode(b"", final=True)
    if carry:
        yield carry


def read_documents(files: list[Path], skipped: SkipCounter | None = None, include_pydoc_topics: bool = False) -> Iterator[str]:
    """Yield texts from files, streaming; binary / non-UTF-8 files are counted in `skipped`.

    A file too large to hold in memory comes out as several consecutive texts.
    """
    skipped = skipped if skipped is not None else SkipCounter()
    for doc in _documents(files, skipped, include_pydoc_topics):
        yield from doc


def _pydoc_topics() -> Iterator[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip it
        return
    for key in sorted(topics):
        yield topics[key]


def _read_jsonl(path: Path, skipped: SkipCounter) -> Iterator[str]:
    bad = 0
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    bad += 1
                    continue
                text = obj.get("text") if isinstance(obj, dict) else None
                if isinstance(text, str) and text:
                    yield text
    except UnicodeDecodeError:
        skipped.files += 1
    if bad:
        print(f"warning: {path}: skipped {bad} line(s) that are not JSON", file=sys.stderr)


def _read_parquet(path: Path) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LmforgeError("reading .parquet needs pyarrow: pip install pyarrow") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise LmforgeError(f"cannot read parquet file {path}: {e}") from None
    if "text" not in pf.schema_arrow.names:
        raise LmforgeError(f"parquet file {path} has no 'text' column")
    for i in range(pf.num_row_groups):
        for text in pf.read_row_group(i, columns=["text"]).column("text").to_pylist():
            if isinstance(text, str) and text:
                yield text


def corpus_documents(spec, skipped: SkipCounter | None = None) -> Iterator[str]:
    files = discover(spec)
    return read_documents(files, skipped, include_pydoc_topics=spec is None or str(spec) == DEFAULT_CORPUS)


# --- shards ---------------------------------------------------------------------------------------


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
        raise LmforgeError(f"shard {path} is truncated or corrupt: header says {count} tokens ({expected} bytes), file has {size} bytes")
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))


def shard_paths(directory: str | Path, split: str) -> list[Path]:
    return sorted(Path(directory).glob(f"{split}_*.bin"))


# --- prepare: text -> shards ----------------------------------------------------------------------


def _chunks(doc: str, chunk_chars: int) -> list[str]:
    """Split a long document at line boundaries into pieces of about chunk_chars characters."""
    if len(doc) <= chunk_chars:
        return [doc]
    out, start = [], 0
    while start < len(doc):
        end = start + chunk_chars
        if end < len(doc):
            nl = doc.rfind("\n", start + chunk_chars // 2, end)
            end = nl + 1 if nl != -1 else end
        out.append(doc[start:end])
        start = end
    return out


@dataclass
class PrepareStats:
    train_tokens: int = 0
    val_tokens: int = 0
    documents: int = 0
    bytes: int = 0
    skipped_files: int = 0


def prepare(spec, tokenizer, out_dir: str | Path, val_fraction: float = 0.01, shard_tokens: int = 100_000_000,
            batch_chars: int = 4_000_000, progress: bool = True) -> PrepareStats:
    """Tokenise a corpus into train/val shards under out_dir, streaming with bounded memory.

    Text is cut into pieces (whole small documents; long ones split at line breaks); every
    `round(1/val_fraction)`-th piece goes to validation, so the split is deterministic and
    even a single-file corpus gets a validation set. Pieces are tokenised in parallel batches.
    """
    out_dir = Path(out_dir)
    files = discover(spec)
    total_bytes = sum(f.stat().st_size for f in files)
    every = max(2, round(1 / val_fraction))
    chunk_chars = int(min(1 << 20, max(512, total_bytes / every / 8)))
    skipped = SkipCounter()
    stats = PrepareStats()
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in shard_paths(out_dir, "train") + shard_paths(out_dir, "val"):
        old.unlink()
    writers: dict[str, ShardWriter | None] = {"train": None, "val": None}
    shard_index = {"train": 0, "val": 0}
    vocab = tokenizer.vocab_size
    eos = tokenizer.eos_id

    def emit(split: str, ids: list[int]):
        w = writers[split]
        if w is None:
            w = writers[split] = ShardWriter(out_dir / f"{split}_{shard_index[split]:04d}.bin", vocab)
        w.write(ids)
        if w.count >= shard_tokens:
            w.close()
            writers[split] = None
            shard_index[split] += 1

    bar = _progress_bar(total_bytes, progress)
    piece_no = 0
    batch: list[tuple[str, str, bool]] = []  # (split, text, ends_document)
    batch_size = 0

    def flush():
        nonlocal batch, batch_size
        if not batch:
            return
        encoded = tokenizer.encode_batch([t for _, t, _ in batch])
        for (split, text, ends_doc), ids in zip(batch, encoded):
            if ends_doc:
                ids = ids + [eos]
            emit(split, ids)
            if split == "train":
                stats.train_tokens += len(ids)
            else:
                stats.val_tokens += len(ids)
        bar(sum(len(t) for _, t, _ in batch))
        batch, batch_size = [], 0

    try:
        for doc in _documents(files, skipped, include_pydoc_topics=spec is None or str(spec) == DEFAULT_CORPUS):
            stats.documents += 1
            pending = None  # hold one piece back to know which is the document's last
            for text in doc:
                stats.bytes += len(text.encode("utf-8", "surrogatepass"))
                for piece in _chunks(text, chunk_chars):
                    if pending is not None:
                        batch.append((pending[0], pending[1], False))
                        batch_size += len(pending[1])
                    pending = ("val" if piece_no % every == every // 2 else "train", piece)
                    piece_no += 1
                if batch_size >= batch_chars:
                    flush()
            if pending is not None:
                batch.append((pending[0], pending[1], True))
                batch_size += len(pending[1])
            else:
                stats.documents -= 1
            if batch_size >= batch_chars:
                flush()
        flush()
        if stats.documents == 0:
            raise LmforgeError(f"no usable text in {spec if spec is not None else 'the default corpus'}")
        for split in ("train", "val"):
            if writers[split] is None and shard_index[split] == 0:
                writers[split] = ShardWriter(out_dir / f"{split}_0000.bin", vocab)
            if writers[split] is not None:
                writers[split].close()
                writers[split] = None
    except BaseException:
        for w in writers.values():
            if w is not None:
                w.abort()
        raise
    finally:
        bar(None)
    stats.skipped_files = skipped.files
    if skipped.files:
        print(f"warning: skipped {skipped.files} file(s) that are binary or not valid UTF-8", file=sys.stderr)
    return stats


def _progress_bar(total: int, enabled: bool):
    """A tiny adapter over rich's progress bar: call with a byte count to advance, None to finish."""
    if not enabled:
        return lambda n: None
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    prog = Progress("tokenising", BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(), transient=False)
    task = prog.add_task("tok", total=total)
    prog.start()

    def advance(n):
        if n is None:
            prog.stop()
        else:
            prog.advance(task, n)

    return advance


def text_sample(spec, max_chars: int) -> Iterator[str]:
    """Documents from a corpus up to about max_chars characters in total (for tokenizer training)."""
    seen = 0
    for doc in corpus_documents(spec):
        yield doc
        seen += len(doc)
        if seen >= max_chars:
            return


# --- batches --------------------------------------------------------------------------------------


class TokenData:
    """All shards of one split, memory-mapped, sampled as random windows of seq_len + 1 tokens."""

    def __init__(self, directory: str | Path, split: str):
        paths = shard_paths(directory, split)
        if not paths:
            raise LmforgeError(f"no {split} shards in {directory} (run 'lmforge prepare' first)")
        self.shards = [read_shard(p) for p in paths]
        self.lengths = np.array([len(s) for s in self.shards], dtype=np.int64)
        self.total = int(self.lengths.sum())

    def check(self, seq_len: int, vocab_size: int | None = None) -> None:
        if max(self.lengths) < seq_len + 1:
            raise LmforgeError(f"not enough tokens: the largest shard has {max(self.lengths)}, a window needs {seq_len + 1}")
        if vocab_size is not None:
            top = max(int(s.max()) for s in self.shards if len(s))
            if top >= vocab_size:
                raise LmforgeError(f"shard token id {top} is outside the model vocabulary ({vocab_size})")

    def batch(self, batch_size: int, seq_len: int, generator: torch.Generator, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows (x, y) of shape (batch_size, seq_len); y is x shifted by one.

        Under data parallelism every rank draws the same world x batch_size window starts (same
        generator state) and reads only its own share, so the global batch equals a
        single-process batch of world x batch_size.
        """
        usable = np.maximum(self.lengths - seq_len, 0)  # number of valid start positions per shard
        cum = np.cumsum(usable)
        starts = torch.randint(0, int(cum[-1]), (batch_size * world,), generator=generator).numpy()
        starts = starts[rank * batch_size: (rank + 1) * batch_size]
        rows = []
        for s in starts:
            k = int(np.searchsorted(cum, s, side="right"))
            off = int(s - (cum[k - 1] if k else 0))
            rows.append(np.asarray(self.shards[k][off: off + seq_len + 1], dtype=np.int64))
        buf = torch.from_numpy(np.stack(rows))
        return buf[:, :-1], buf[:, 1:]
