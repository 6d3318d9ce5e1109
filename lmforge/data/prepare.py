"""Text to shards: `prepare` tokenises a corpus into train/val shards; `ensure_data` does what a
training run needs (train a tokenizer, prepare shards) once per corpus and caches the result."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import LmforgeError
from ..io import write_json_atomic
from .corpus import DEFAULT_TEXT_FIELD, Corpus, SkipCounter, text_sample
from .shards import ShardWriter, shard_paths
from .tokenizer import Tokenizer, vocab_shortfall

TOKENIZER = "tokenizer.json"  # the tokenizer beside a shard directory (the same name a run directory uses)


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


MAX_PIECE_CHARS = 1 << 20  # the longest piece of text tokenised at once


@dataclass
class PrepareStats:
    train_tokens: int = 0
    val_tokens: int = 0
    documents: int = 0
    bytes: int = 0
    skipped_files: int = 0


def prepare(
    spec,
    tokenizer,
    out_dir: str | Path,
    val_fraction: float = 0.01,
    shard_tokens: int = 100_000_000,
    batch_chars: int = 4_000_000,
    progress: bool = True,
    allow_special: bool = False,
    text_field: str = DEFAULT_TEXT_FIELD,
) -> PrepareStats:
    """Tokenise a corpus (DATA, or a `corpus.Corpus`) into train/val shards under out_dir, streaming with bounded
    memory.

    Text is cut into pieces (whole small documents; long ones split at line breaks); every
    `round(1/val_fraction)`-th piece goes to validation, so the split is deterministic and
    even a single-file corpus gets a validation set. Pieces are tokenised in parallel batches of about
    `batch_chars` characters. Documents are separated by one end-of-text id, which we add; text in them that
    looks like a special token ("<|endoftext|>") is encoded as ordinary text unless allow_special.
    The piece size follows the corpus size (about 8 validation pieces at least; at most 1 MiB of text, also when
    the size is not known, as for a dataset streamed from the Hub).
    Raises LmforgeError when the corpus holds no usable text.
    """
    out_dir = Path(out_dir)
    corpus = spec if isinstance(spec, Corpus) else Corpus(spec, text_field)
    total_bytes = corpus.size_bytes()
    every = max(2, round(1 / val_fraction))
    chunk_chars = int(min(MAX_PIECE_CHARS, max(512, (total_bytes if total_bytes is not None else 1 << 62) / every / 8)))
    skipped = SkipCounter()
    stats = PrepareStats()
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in shard_paths(out_dir, "train") + shard_paths(out_dir, "val"):
        old.unlink()
    writers = _SplitWriters(out_dir, tokenizer.vocab_size, shard_tokens)
    bar = _progress_bar(total_bytes, progress)
    documents = corpus.documents(skipped)
    try:
        for batch in _batches(_pieces(documents, chunk_chars, every, stats), batch_chars):
            texts, continued = [text for _, text, _, _ in batch], [not starts for _, _, starts, _ in batch]
            encoded = tokenizer.encode_batch(texts, allow_special=allow_special, continued=continued)
            for (split, _, _, ends_doc), ids in zip(batch, encoded):
                ids = ids + [tokenizer.eos_id] if ends_doc else ids
                writers.write(split, ids)
                stats.train_tokens += len(ids) if split == "train" else 0
                stats.val_tokens += len(ids) if split == "val" else 0
            bar(sum(len(text) for text in texts))
        if stats.documents == 0:
            raise LmforgeError(f"no usable text in {corpus.name}")
        writers.close()
    except BaseException:
        writers.abort()
        raise
    finally:
        bar(None)
    stats.skipped_files = skipped.files
    if skipped.files:
        print(f"warning: skipped {skipped.files} file(s) that are binary or not valid UTF-8", file=sys.stderr)
    return stats


def _pieces(documents, chunk_chars: int, every: int, stats: PrepareStats):
    """(split, text, starts_document, ends_document) for every piece of every document, in corpus order.

    Piece n goes to validation when n % every == every // 2. One piece is held back so that the last
    piece of a document is known (it gets the end-of-text token); empty documents are not counted.
    A piece that does not start its document is encoded as the continuation it is (`encode_batch`)."""
    piece_no = 0
    for doc in documents:
        pending = None  # (split, text, starts_document)
        for text in doc:
            stats.bytes += len(text.encode("utf-8", "surrogatepass"))
            for piece in _chunks(text, chunk_chars):
                if pending is not None:
                    yield *pending, False
                pending = ("val" if piece_no % every == every // 2 else "train", piece, pending is None)
                piece_no += 1
        if pending is not None:
            stats.documents += 1
            yield *pending, True


def _batches(pieces, batch_chars: int):
    """Group pieces into lists of about batch_chars characters (the unit of parallel tokenisation)."""
    batch, size = [], 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece[1])
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class _SplitWriters:
    """One rolling `ShardWriter` per split: `{split}_0000.bin`, `{split}_0001.bin`, ... of at most shard_tokens each.

    `close()` finishes the open shards (every split gets at least an empty `_0000` shard); `abort()` removes
    the shard being written, so an interrupted prepare never leaves a half-written file that looks complete."""

    def __init__(self, out_dir: Path, vocab_size: int, shard_tokens: int):
        self.out_dir, self.vocab_size, self.shard_tokens = out_dir, vocab_size, shard_tokens
        self.open: dict[str, ShardWriter | None] = {"train": None, "val": None}
        self.index = {"train": 0, "val": 0}

    def write(self, split: str, ids: list[int]) -> None:
        if self.open[split] is None:
            self.open[split] = ShardWriter(self.out_dir / f"{split}_{self.index[split]:04d}.bin", self.vocab_size)
        w = self.open[split]
        w.write(ids)
        if w.count >= self.shard_tokens:
            w.close()
            self.open[split] = None
            self.index[split] += 1

    def close(self) -> None:
        for split in ("train", "val"):
            if self.open[split] is None and self.index[split] == 0:
                self.open[split] = ShardWriter(self.out_dir / f"{split}_0000.bin", self.vocab_size)
            if self.open[split] is not None:
                self.open[split].close()
                self.open[split] = None

    def abort(self) -> None:
        for w in self.open.values():
            if w is not None:
                w.abort()


def _progress_bar(total: int | None, enabled: bool):
    """A tiny adapter over rich's progress bar: call with a byte count to advance, None to finish.

    total None (a streamed dataset of unknown size): the bar shows what was done and the speed, no ETA."""
    if not enabled:
        return lambda n: None
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    prog = Progress(
        "tokenising", BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(), transient=False
    )
    task = prog.add_task("tok", total=total)
    prog.start()

    def advance(n):
        if n is None:
            prog.stop()
        else:
            prog.advance(task, n)

    return advance


TOKENIZER_SAMPLE_CHARS = 50_000_000  # text used to learn the BPE merges (the whole default corpus fits)


def ensure_data(spec, train_cfg, cache_root: Path, log=print) -> tuple[Path, Tokenizer]:
    """Return (shard directory, tokenizer) for DATA.

    DATA may be a directory of prepared shards (with its tokenizer.json), or raw text
    (file, directory, glob, or None for the default corpus): then a tokenizer is trained and
    shards prepared under cache_root/<fingerprint>/, reused while the inputs are unchanged. The fingerprint holds
    the corpus's (`Corpus.key`: its files, or the dataset and its text field) and the tokenizer settings.
    """
    if spec is not None and Path(str(spec)).is_dir() and shard_paths(spec, "train"):
        tok_path = Path(spec) / TOKENIZER
        if not tok_path.is_file():
            raise LmforgeError(f"{spec} has shards but no {TOKENIZER} next to them")
        return Path(spec), Tokenizer.from_file(tok_path)
    corpus = Corpus(spec, train_cfg.text_field)
    # version 2: special-token text in documents is encoded as text (version 1 turned it into control tokens)
    key_parts = [corpus.key(), train_cfg.tokenizer_vocab_size, train_cfg.val_fraction, 2]
    if train_cfg.split_digits:  # only then, so that data prepared before the option existed keeps its key
        key_parts.append("split_digits")
    key = hashlib.sha256(json.dumps(key_parts).encode()).hexdigest()[:16]
    cache = cache_root / f"data-{key}"
    done = cache / "done.json"
    if done.is_file() and (cache / TOKENIZER).is_file():
        log(f"data: reusing tokenizer and shards in {cache}")
        tok = Tokenizer.from_file(cache / TOKENIZER)
        if note := vocab_shortfall(tok, train_cfg.tokenizer_vocab_size):
            log(f"warning: {note}")
        return cache, tok
    log(f"data: training a {train_cfg.tokenizer_vocab_size}-token BPE tokenizer on {corpus.name} ({corpus.describe()})")
    t0 = time.time()
    tok = Tokenizer.train(
        text_sample(corpus, TOKENIZER_SAMPLE_CHARS), train_cfg.tokenizer_vocab_size, split_digits=train_cfg.split_digits
    )
    if tok.vocab_size <= 257:
        raise LmforgeError(f"no usable text in {corpus.name}")
    cache.mkdir(parents=True, exist_ok=True)
    tok.save(cache / TOKENIZER)
    log(f"data: tokenizer ready ({tok.vocab_size} tokens, {time.time() - t0:.1f}s); writing shards")
    if note := vocab_shortfall(tok, train_cfg.tokenizer_vocab_size):
        log(f"warning: {note}")
    stats = prepare(corpus, tok, cache, val_fraction=train_cfg.val_fraction, progress=sys.stderr.isatty())
    write_json_atomic(
        done,
        {
            "train_tokens": stats.train_tokens,
            "val_tokens": stats.val_tokens,
            "documents": stats.documents,
            "bytes": stats.bytes,
        },
    )
    log(
        f"data: {stats.documents} documents, {stats.bytes / 1e6:.1f} MB -> {stats.train_tokens:,} train "
        f"+ {stats.val_tokens:,} val tokens ({time.time() - t0:.1f}s)"
    )
    return cache, tok
