"""Hugging Face datasets as corpora: DATA written `hf:...` (`corpus.Corpus` sends it here).

    hf:NAME[:CONFIG][:SPLIT]   a dataset on the Hub, streamed (`datasets.load_dataset(..., streaming=True)`):
                               nothing is downloaded whole; split `train` unless given (`hf:NAME::SPLIT` for a
                               split without a config)
    hf:FOLDER[:SPLIT]          a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`, read
                               memory-mapped (split: `train`, or the folder's only one)

An existing directory wins: `hf:org/name` is the Hub's org/name unless ./org/name is a directory. A path that
cannot be a Hub name (starting with `.`, `/` or `~`, or with more than one `/`) must exist.

    parse_spec    'hf:...' -> HFSpec
    HFSource      the texts of one column (`--text-field`, default `text`), a size estimate for progress, and the
                  identity a cache key needs (what was asked for and, for a folder, its files' sizes and times)
    retrying      a stream of rows that survives network errors: reopened where it stopped, with exponential
                  backoff; after `attempts` failures in a row without progress, one clear error line. A Hub
                  stream resumes by `IterableDataset.skip(n)`, which streams the first n rows again: slower
                  than its `state_dict()`, but that one was seen to lose the row being read when the error came

`datasets` is an optional dependency (`pip install 'lmforge[datasets]'`), imported only here, only when used.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import ssl
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import LmforgeError

PREFIX = "hf:"
DEFAULT_SPLIT = "train"
ROWS_PER_READ = 64  # rows read from a folder's arrow files at a time: memory stays bounded even for books
RETRIES = 5  # network failures in a row (without a row of progress) before giving up
BACKOFF = 2.0  # seconds before the first retry; doubled at each failure in a row (2, 4, 8, 16, 32: ~1 minute)


def is_hf_spec(spec) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


@dataclass(frozen=True)
class HFSpec:
    name: str  # a Hub dataset name (org/name) or a folder
    config: str | None
    split: str | None  # None: DEFAULT_SPLIT (a folder holding a single Dataset has no splits)
    local: bool
    given: str  # the spec as written, for messages

    def __str__(self) -> str:
        return self.given


def parse_spec(spec: str) -> HFSpec:
    """`hf:NAME[:CONFIG][:SPLIT]` or `hf:FOLDER[:SPLIT]` -> HFSpec. An existing directory wins over a Hub name.

    Raises LmforgeError for an empty name, too many `:` parts, or a path-like name that is not a directory."""
    rest = spec[len(PREFIX) :]
    if not rest.strip(":"):
        raise LmforgeError(
            "hf: needs a dataset: hf:NAME[:CONFIG][:SPLIT] (the Hub) or hf:FOLDER[:SPLIT] (save_to_disk)"
        )
    if Path(rest).expanduser().is_dir():
        return HFSpec(str(Path(rest).expanduser()), None, None, True, spec)
    head, _, tail = rest.rpartition(":")
    if head and Path(head).expanduser().is_dir():
        return HFSpec(str(Path(head).expanduser()), None, tail or None, True, spec)
    parts = rest.split(":")
    if len(parts) > 3:
        raise LmforgeError(f"{spec}: too many ':' parts (hf:NAME[:CONFIG][:SPLIT])")
    name, config, split = (parts + [""] * 3)[:3]
    if Path(name).is_file():
        raise LmforgeError(
            f"{spec}: {name} is a file; hf: takes a dataset folder or a Hub name (give files without hf:)"
        )
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name:
        raise LmforgeError(f"{spec}: no such folder ({name}); a Hub dataset is named NAME or ORG/NAME")
    return HFSpec(name, config or None, split or None, False, spec)


def _datasets():
    try:
        import datasets
    except ImportError:
        raise LmforgeError(
            "hf: data needs the datasets package: pip install 'lmforge[datasets]' (or pip install datasets)"
        ) from None
    return datasets


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


class HFSource:
    """The texts of one column of a Hugging Face dataset, in order, with bounded memory.

    `texts()` yields every non-empty string of the column (other values are skipped, as a `.jsonl` line without
    the field is). A missing column is one LmforgeError naming the columns there are. Hub streams go through
    `retrying`; `sleep` is what waits between attempts (a test passes its own)."""

    def __init__(self, spec: str, text_field: str = "text", sleep: Callable[[float], None] = time.sleep):
        self.spec = parse_spec(spec)
        self.text_field = text_field
        self.sleep = sleep
        self._folder_dataset = None
        self._reached_hub = False  # whether the stream was ever opened

    # --- a folder written by save_to_disk ---------------------------------------------------------

    def _folder(self):
        """The folder's Dataset for the chosen split, its text column checked (opened once; memory-mapped)."""
        if self._folder_dataset is not None:
            return self._folder_dataset
        datasets = _datasets()
        s = self.spec
        try:
            ds = datasets.load_from_disk(s.name)
        except (FileNotFoundError, datasets.exceptions.DatasetsError, ValueError) as e:
            raise LmforgeError(
                f"{s}: {s.name} is not a folder written by datasets' save_to_disk ({_first_line(e)})"
            ) from None
        if isinstance(ds, datasets.DatasetDict):
            splits = list(ds)
            split = s.split or (DEFAULT_SPLIT if DEFAULT_SPLIT in ds or len(splits) != 1 else splits[0])
            if split not in ds:
                raise LmforgeError(f"{s}: no split {split!r} in {s.name} (splits: {', '.join(splits)})")
            ds = ds[split]
        elif s.split is not None:
            raise LmforgeError(f"{s}: {s.name} holds one dataset without splits; leave out ':{s.split}'")
        self._check_columns(ds.column_names)
        feature = ds.features[self.text_field]
        if getattr(feature, "dtype", None) not in ("string", "large_string"):
            raise LmforgeError(
                f"{s}: column {self.text_field!r} holds {feature}, not text; choose one with --text-field"
            )
        self._folder_dataset = ds
        return ds

    def _check_columns(self, columns) -> None:
        if columns is not None and self.text_field not in columns:
            raise LmforgeError(
                f"{self.spec}: no column {self.text_field!r} (columns: {', '.join(columns)}); "
                "choose one with --text-field"
            )

    # --- a dataset on the Hub ---------------------------------------------------------------------

    def _open_stream(self, start: int) -> Iterator[dict]:
        """Rows of the Hub dataset from row `start` on (streamed; a retry reopens the stream and skips).

        When the Hub cannot be reached at all (the first opening fails after datasets' own retries): one
        LmforgeError line at once. A stream that breaks later is `retrying`'s to resume."""
        datasets = _datasets()
        s = self.spec
        try:
            ds = datasets.load_dataset(s.name, s.config, split=s.split or DEFAULT_SPLIT, streaming=True)
        except Exception as e:
            if is_network_error(e) and self._reached_hub:
                raise
            if is_network_error(e) or isinstance(e, (FileNotFoundError, datasets.exceptions.DatasetsError, ValueError)):
                raise LmforgeError(f"{s}: cannot open the dataset: {_first_line(e)}") from None
            raise
        self._reached_hub = True
        self._check_columns(ds.column_names)  # None when the Hub does not say: checked on the first row then
        ds = ds.select_columns([self.text_field]) if ds.column_names is not None else ds
        return iter(ds.skip(start) if start else ds)

    def _stream_texts(self) -> Iterator:
        for i, row in enumerate(retrying(self._open_stream, str(self.spec), sleep=self.sleep)):
            if i == 0:
                self._check_columns(list(row))
            yield row.get(self.text_field)

    # --- both -------------------------------------------------------------------------------------

    def texts(self) -> Iterator[str]:
        """Every non-empty text of the column, in the dataset's order."""
        if self.spec.local:
            ds = self._folder().select_columns([self.text_field])
            values = (t for batch in ds.iter(batch_size=ROWS_PER_READ) for t in batch[self.text_field])
        else:
            values = self._stream_texts()
        for text in values:
            if isinstance(text, str) and text:
                yield text

    def size_bytes(self) -> int | None:
        """About how many bytes of text there are (for the progress bar), or None when not known (a stream)."""
        if self.spec.local:
            return int(self._folder().data.column(self.text_field).nbytes)
        return None

    def identity(self) -> str:
        """What a cache key needs: the spec and text field; a folder's files (paths, sizes, mtimes) too."""
        s = self.spec
        parts = [str(s), self.text_field]
        if s.local:
            root = Path(s.name).resolve()
            parts.append(str(root))
            for f in sorted(p for p in root.rglob("*") if p.is_file()):
                st = f.stat()
                parts.append(f"{f.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}")
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


# --- network errors ---------------------------------------------------------------------------------------


def _transport_errors() -> tuple[type, ...]:
    """Exception types that mean "the network failed", from the HTTP stacks `datasets` may stream through."""
    kinds: list[type] = [ConnectionError, TimeoutError, ssl.SSLError, http.client.HTTPException]
    for module, names in (
        ("httpx", ("TransportError",)),
        ("requests", ("ConnectionError", "Timeout", "ChunkedEncodingError")),
        ("aiohttp", ("ClientConnectionError", "ClientPayloadError", "ServerTimeoutError")),
        ("urllib3.exceptions", ("ProtocolError", "TimeoutError", "NewConnectionError")),
    ):
        mod = sys.modules.get(module)  # only stacks already in use can have raised
        kinds += [getattr(mod, n) for n in names if mod is not None and isinstance(getattr(mod, n, None), type)]
    return tuple(kinds)


def is_network_error(e: BaseException) -> bool:
    """Whether e (or what caused it) is a transient network failure worth retrying: a broken or timed-out
    connection, or an HTTP response 408, 429 or 5xx. Other HTTP statuses (401, 404, ...) are not retried."""
    kinds = _transport_errors()
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        status = getattr(getattr(e, "response", None), "status_code", None)
        if isinstance(status, int):
            return status in (408, 429) or status >= 500
        if isinstance(e, kinds):
            return True
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    return False


def retrying(
    open_rows: Callable[[int], Iterator],
    what: str,
    attempts: int = RETRIES,
    backoff: float = BACKOFF,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator:
    """Rows from `open_rows(0)`; after a network error (`is_network_error`), `open_rows(n)` resumes after the n
    rows already yielded, so no row is skipped or repeated.

    Waits backoff x 2^(k-1) seconds before the k-th retry in a row, with one warning line on stderr each time;
    a row of progress resets the count. After `attempts` retries without progress: LmforgeError, one line.
    Other errors propagate unchanged."""
    done, failures = 0, 0
    while True:
        try:
            for row in open_rows(done):
                yield row
                done += 1
                failures = 0
            return
        except LmforgeError:
            raise
        except Exception as e:
            if not is_network_error(e):
                raise
            failures += 1
            if failures > attempts:
                raise LmforgeError(
                    f"{what}: network error at row {done:,}, still failing after {attempts} retries: {_first_line(e)}"
                ) from None
            wait = backoff * 2 ** (failures - 1)
            print(
                f"warning: {what}: {_first_line(e)} at row {done:,}; retry {failures}/{attempts} in {wait:g}s",
                file=sys.stderr,
            )
            sleep(wait)
