"""Where text comes from: corpus discovery (file, directory, glob, the default standard-library corpus)
and reading documents from text, JSONL and Parquet files, streaming large files with bounded memory."""

from __future__ import annotations

import glob as globmod
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import LmforgeError

TEXT_SUFFIXES = {
    ".txt",
    ".md",
    ".rst",
    ".py",
    ".pyi",
    ".c",
    ".h",
    ".cc",
    ".cpp",
    ".hpp",
    ".js",
    ".ts",
    ".java",
    ".go",
    ".rs",
    ".rb",
    ".sh",
    ".toml",
    ".yaml",
    ".yml",
    ".cfg",
    ".ini",
    ".html",
    ".css",
    ".xml",
    ".tex",
    ".csv",
    ".tsv",
    ".json",
}


DEFAULT_CORPUS = "stdlib"


LARGE_FILE_BYTES = 64 << 20  # text files above this are streamed in pieces, never read whole


STREAM_BLOCK = 1 << 20


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
        files = sorted(
            f for f in p.rglob("*") if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
        )
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


def read_documents(
    files: list[Path], skipped: SkipCounter | None = None, include_pydoc_topics: bool = False
) -> Iterator[str]:
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


def text_sample(spec, max_chars: int) -> Iterator[str]:
    """Documents from a corpus up to about max_chars characters in total (for tokenizer training)."""
    seen = 0
    for doc in corpus_documents(spec):
        yield doc
        seen += len(doc)
        if seen >= max_chars:
            return
