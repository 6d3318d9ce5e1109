"""Paired data for sequence-to-sequence tasks: reading pairs, built-in demo tasks, tokenising and batching.

A pair is (source text, target text). Pairs come from a JSONL file (one `{"source": ..., "target": ...}`
object per line), a TSV file (`source<TAB>target` per line) or a built-in demo task generated in code.
Sources end with the end-of-text token; targets are fed to the decoder as BOS + target and predicted
as target + EOS. Batches group pairs of similar length (little padding); padded label positions are -100,
which the loss ignores.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from ..errors import LmforgeError
from .tokenizer import Tokenizer

Pair = tuple[str, str]

BOS = "<|bos|>"  # starts every target fed to the decoder
PAD = "<|pad|>"  # fills batches up to their longest sequence (masked out, never predicted)
SOURCE_TOKENIZER = "source_tokenizer.json"  # in a run directory, only when source and target vocabularies differ
TARGET_TOKENIZER = "tokenizer.json"  # the target (or shared) tokenizer, where every run keeps its tokenizer
IGNORE = -100  # label of padded positions (F.cross_entropy's ignore_index)


# --- reading pairs --------------------------------------------------------------------------------


def read_pairs(path: str | Path) -> list[Pair]:
    """Pairs from a .jsonl file ({"source": ..., "target": ...} per line) or a .tsv file (source TAB target)."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".tsv"):
        raise LmforgeError(f"pairs must be in a .jsonl or .tsv file, got {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise LmforgeError(f"{path} is not valid UTF-8") from None
    pairs = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if suffix == ".jsonl":
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise LmforgeError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not (
                isinstance(obj, dict) and isinstance(obj.get("source"), str) and isinstance(obj.get("target"), str)
            ):
                raise LmforgeError(f'{path}:{n}: expected an object with string fields "source" and "target"')
            pairs.append((obj["source"], obj["target"]))
        else:
            fields = line.split("\t")
            if len(fields) != 2:
                raise LmforgeError(
                    f"{path}:{n}: expected source<TAB>target, found {len(fields)} tab-separated field(s)"
                )
            pairs.append((fields[0], fields[1]))
    if not pairs:
        raise LmforgeError(f"no pairs in {path}")
    return pairs


def read_sources(path: str | Path) -> list[str]:
    """Source texts, one per line (empty lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"source file not found: {path}")
    try:
        sources = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise LmforgeError(f"{path} is not valid UTF-8") from None
    if not sources:
        raise LmforgeError(f"no sources in {path}")
    return sources


def split_pairs(pairs: list[Pair], val_fraction: float) -> tuple[list[Pair], list[Pair]]:
    """(train, val): every round(1/val_fraction)-th pair goes to validation (deterministic, like `prepare`)."""
    every = max(2, round(1 / val_fraction))
    train = [p for i, p in enumerate(pairs) if i % every != every // 2]
    val = [p for i, p in enumerate(pairs) if i % every == every // 2]
    if not train or not val:
        raise LmforgeError(f"too few pairs ({len(pairs)}) for a training and a validation split")
    return train, val


def file_fingerprint(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


# --- demo tasks -----------------------------------------------------------------------------------

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen"
).split()
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_MONTHS = "January February March April May June July August September October November December".split()


def spell_number(n: int) -> str:
    """English words for 0 <= n < 1,000,000: 342107 -> 'three hundred forty-two thousand one hundred seven'."""
    if not 0 <= n < 1_000_000:
        raise ValueError(n)
    if n == 0:
        return "zero"

    def below_thousand(k: int) -> list[str]:
        words = []
        if k >= 100:
            words += [_ONES[k // 100], "hundred"]
            k %= 100
        if k >= 20:
            words.append(_TENS[k // 10] + (f"-{_ONES[k % 10]}" if k % 10 else ""))
        elif k:
            words.append(_ONES[k])
        return words

    words = below_thousand(n // 1000) + ["thousand"] if n >= 1000 else []
    return " ".join(words + below_thousand(n % 1000))


def _random_number(rng: random.Random) -> int:
    """0 .. 999,999; each extra digit twice as likely, so long numbers dominate while every short one is still
    common."""
    digits = rng.choices(range(1, 7), weights=[1, 2, 4, 8, 16, 32])[0]
    return rng.randrange(0 if digits == 1 else 10 ** (digits - 1), 10**digits)


def _numbers(rng: random.Random) -> Pair:
    n = _random_number(rng)
    return spell_number(n), str(n)


def _spell(rng: random.Random) -> Pair:
    n = _random_number(rng)
    return str(n), spell_number(n)


def _dates(rng: random.Random) -> Pair:
    d = datetime.date(1900, 1, 1) + datetime.timedelta(days=rng.randrange(73049))  # 1900-01-01 .. 2099-12-31
    month = _MONTHS[d.month - 1]
    source = rng.choice(
        [
            f"{month} {d.day}, {d.year}",
            f"{d.day} {month} {d.year}",
            f"{month[:3]} {d.day} {d.year}",
            f"{d.month:02d}/{d.day:02d}/{d.year}",
        ]
    )
    return source, d.isoformat()


def _letters(rng: random.Random) -> list[str]:
    return [chr(ord("a") + rng.randrange(26)) for _ in range(rng.randint(3, 12))]


def _reverse(rng: random.Random) -> Pair:
    s = _letters(rng)
    return " ".join(s), " ".join(reversed(s))


def _sort(rng: random.Random) -> Pair:
    s = _letters(rng)
    return " ".join(s), " ".join(sorted(s))


@dataclass(frozen=True)
class Demo:
    """A task generated in code: `size` examples drawn with `make`, split by a hash of the source.

    The training split keeps repeated draws (so the few short numbers are seen as often as the task
    produces them); validation and test keep each source once; no source is in two splits."""

    name: str
    description: str
    make: Callable[[random.Random], Pair]
    size: int

    def pairs(self, split: str) -> list[Pair]:
        """The 'train', 'val' or 'test' pairs (the same on every machine; no source is in two splits)."""
        return _demo_splits(self.name)[split]


DEMOS = {
    d.name: d
    for d in [
        Demo("numbers", "spelled-out English numbers to digits: 'four hundred two' -> '402'", _numbers, 150_000),
        Demo("spell", "digits to spelled-out English numbers: '402' -> 'four hundred two'", _spell, 150_000),
        Demo("dates", "dates in four formats to ISO: 'March 5, 2021' -> '2021-03-05'", _dates, 60_000),
        Demo("reverse", "reverse a sequence of letters: 'k f a' -> 'a f k'", _reverse, 60_000),
        Demo("sort", "sort a sequence of letters: 'k f a' -> 'a f k'", _sort, 60_000),
    ]
}


def demo(name: str) -> Demo:
    if name not in DEMOS:
        raise LmforgeError(f"unknown demo {name!r}; available: {', '.join(DEMOS)}")
    return DEMOS[name]


@cache
def _demo_splits(name: str) -> dict[str, list[Pair]]:
    d = DEMOS[name]
    rng = random.Random(f"lmforge-demo-{name}")
    train: list[Pair] = []
    held_out: dict[str, dict[str, str]] = {"val": {}, "test": {}}
    for _ in range(d.size):
        source, target = d.make(rng)
        bucket = int.from_bytes(hashlib.sha256(source.encode()).digest()[:4], "little") % 50
        if bucket > 1:
            train.append((source, target))
        else:
            held_out["test" if bucket == 0 else "val"].setdefault(source, target)
    return {"train": train, "val": list(held_out["val"].items()), "test": list(held_out["test"].items())}


# --- tokenising -----------------------------------------------------------------------------------


class PairTokenizer:
    """The source and target tokenizers (one and the same when the vocabulary is shared) and the special ids."""

    def __init__(self, source: Tokenizer, target: Tokenizer):
        self.source, self.target = source, target
        self.shared = source is target
        self.bos_id = _special_id(target, BOS)
        self.pad_id = _special_id(target, PAD)
        self.eos_id = target.eos_id
        self.src_pad_id = _special_id(source, PAD)
        self.src_eos_id = source.eos_id

    @classmethod
    def train(
        cls, pairs: list[Pair], vocab_size: int, shared: bool = True, split_digits: bool = False
    ) -> PairTokenizer:
        """Byte-level BPE tokenizer(s) learnt from the pairs, with the BOS and PAD special tokens."""

        def learn(texts):
            return Tokenizer.train(texts, vocab_size, [BOS, PAD], split_digits)

        if shared:
            tok = learn([s for s, _ in pairs] + [t for _, t in pairs])
            return cls(tok, tok)
        return cls(learn([s for s, _ in pairs]), learn([t for _, t in pairs]))

    def save(self, run_dir: str | Path) -> None:
        self.target.save(Path(run_dir) / TARGET_TOKENIZER)
        if not self.shared:
            self.source.save(Path(run_dir) / SOURCE_TOKENIZER)

    @classmethod
    def load(cls, run_dir: str | Path, shared: bool) -> PairTokenizer:
        target = Tokenizer.from_file(Path(run_dir) / TARGET_TOKENIZER)
        return cls(target if shared else Tokenizer.from_file(Path(run_dir) / SOURCE_TOKENIZER), target)

    def encode_sources(self, texts: list[str]) -> list[list[int]]:
        """Source ids, each ending with the end-of-text token (so even an empty source has one token to attend to)."""
        return [ids + [self.src_eos_id] for ids in self.source.encode_batch(texts)]

    def encode_targets(self, texts: list[str]) -> list[list[int]]:
        """Target ids without special tokens (the batch adds BOS to the decoder input and EOS to the labels)."""
        return self.target.encode_batch(texts)

    def decode(self, ids: list[int]) -> str:
        return self.target.decode(ids)


def _special_id(tok: Tokenizer, token: str) -> int:
    i = tok.hf.token_to_id(token)
    if i is None:
        raise LmforgeError(f"tokenizer has no {token} token (a seq2seq tokenizer needs {BOS} and {PAD})")
    return i


def encode_pairs(
    pairs: list[Pair], tok: PairTokenizer, max_len: int
) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """(source ids, target ids, kept indices): pairs whose source or target (with BOS/EOS) exceeds max_len are
    left out."""
    src = tok.encode_sources([s for s, _ in pairs])
    tgt = tok.encode_targets([t for _, t in pairs])
    keep = [i for i in range(len(pairs)) if len(src[i]) <= max_len and len(tgt[i]) + 1 <= max_len]
    return [src[i] for i in keep], [tgt[i] for i in keep], keep


# --- batches --------------------------------------------------------------------------------------


@dataclass
class PairBatch:
    src: torch.Tensor  # (B, S) source ids, padded
    src_mask: torch.Tensor  # (B, S) True at real source tokens
    tgt_in: torch.Tensor  # (B, T) BOS + target, padded: the decoder input
    labels: torch.Tensor  # (B, T) target + EOS, IGNORE at padding: what each position predicts
    tgt_mask: torch.Tensor  # (B, T) True at real target positions

    @property
    def target_tokens(self) -> int:
        return int(self.tgt_mask.sum())

    def to(self, device) -> PairBatch:
        return PairBatch(
            *(
                t.to(device, non_blocking=True)
                for t in (self.src, self.src_mask, self.tgt_in, self.labels, self.tgt_mask)
            )
        )


def pad(seqs: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask): sequences right-padded with `value` to the longest, and True at their real positions."""
    lengths = torch.tensor([len(s) for s in seqs])
    ids = torch.full((len(seqs), int(lengths.max())), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return ids, torch.arange(ids.shape[1])[None, :] < lengths[:, None]


def collate(src_ids: list[list[int]], tgt_ids: list[list[int]], tok: PairTokenizer) -> PairBatch:
    """Pad examples into a batch: decoder input BOS + target, labels target + EOS."""
    src, src_mask = pad(src_ids, tok.src_pad_id)
    tgt_in, tgt_mask = pad([[tok.bos_id] + t for t in tgt_ids], tok.pad_id)
    labels, _ = pad([t + [tok.eos_id] for t in tgt_ids], IGNORE)
    return PairBatch(src, src_mask, tgt_in, labels, tgt_mask)


class PairData:
    """Tokenised pairs in length order; a training batch is batch_size neighbours in that order at a random offset,
    so its sequences have similar lengths and need little padding. Sampling uses only the generator passed in,
    so a resumed run draws the same batches."""

    def __init__(self, src_ids: list[list[int]], tgt_ids: list[list[int]], tok: PairTokenizer, seed: int = 0):
        if not src_ids:
            raise LmforgeError("no pairs to train on")
        g = torch.Generator().manual_seed(seed)
        shuffled = torch.randperm(len(src_ids), generator=g).tolist()  # random order among pairs of equal length
        order = sorted(shuffled, key=lambda i: (len(src_ids[i]), len(tgt_ids[i])))
        self.src = [src_ids[i] for i in order]
        self.tgt = [tgt_ids[i] for i in order]
        self.tok = tok
        self.target_tokens = sum(len(t) + 1 for t in self.tgt)  # with EOS

    def __len__(self) -> int:
        return len(self.src)

    def batch(self, batch_size: int, generator: torch.Generator) -> PairBatch:
        n = min(batch_size, len(self))
        start = int(torch.randint(0, len(self) - n + 1, (1,), generator=generator))
        return collate(self.src[start : start + n], self.tgt[start : start + n], self.tok)
