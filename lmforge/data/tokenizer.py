"""Byte-level BPE tokenizer on the Hugging Face `tokenizers` engine.

Every string maps to tokens and back without loss: text is split GPT-2 style
(regex pre-tokenisation) and each piece is seen as bytes, so there is no unknown token.
The file format is the standard `tokenizer.json`, so `tokenizers.Tokenizer.from_file`
reads ours and we read theirs (for example a Hugging Face GPT-2 or Llama tokenizer).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from ..errors import LmforgeError
from ..io import atomic_path

EOT = "<|endoftext|>"
# Names other tokenizers give their end-of-document token, tried in order when loading a foreign file.
_EOS_CANDIDATES = (EOT, "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "<|im_end|>")
# Put before a later piece of a document, so that it is encoded as text that follows a line (documents are cut at
# line breaks), then dropped with its tokens.
_ANCHOR = "\n"


class Tokenizer:
    """encode(str) -> list[int], decode(list[int]) -> str, plus the end-of-text id."""

    def __init__(self, hf: _HFTokenizer, eos_token: str | None = None):
        self.hf = hf
        vocab = hf.get_vocab(with_added_tokens=True)
        if eos_token is None:
            eos_token = next((t for t in _EOS_CANDIDATES if t in vocab), None)
        if eos_token is None or eos_token not in vocab:
            raise LmforgeError("tokenizer has no end-of-text token (looked for " + ", ".join(_EOS_CANDIDATES) + ")")
        self.eos_token = eos_token
        self.eos_id = vocab[eos_token]
        self._byte_table_cache: tuple[list[bytes], list[bytes]] | None = None  # see _byte_tables
        self._joins_cleanly: bool | None = None  # see _pieces_join_cleanly

    # --- construction -----------------------------------------------------------------------------

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int, special_tokens: list[str] | None = None, split_digits: bool = False
    ) -> Tokenizer:
        """Learn BPE merges from texts. split_digits: every digit is a token of its own (as Llama does), so
        numbers are spelt digit by digit instead of in irregular multi-digit chunks."""
        specials = [EOT] + [t for t in (special_tokens or []) if t != EOT]
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        minimum = len(alphabet) + len(specials)
        if vocab_size < minimum:
            raise LmforgeError(
                f"vocab size {vocab_size} is too small: the byte alphabet ({len(alphabet)}) "
                f"plus {len(specials)} special token(s) need at least {minimum}"
            )
        tok = _HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if split_digits:
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), tok.pre_tokenizer]
            )
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok, EOT)

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise LmforgeError(f"tokenizer file not found: {path}")
        try:
            hf = _HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a plain Exception for any parse error
            raise LmforgeError(
                f"cannot read tokenizer {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            ) from None
        return cls(hf)

    def save(self, path: str | Path) -> None:
        with atomic_path(path) as tmp:
            self.hf.save(str(tmp))

    # --- use --------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], continued: list[bool] | None = None) -> list[list[int]]:
        """Encode many texts at once, in parallel over all cores (Rust threads).

        continued[i]: texts[i] is a later piece of a longer text (a document cut at a line break). It is encoded
        as it would be inside that text, without what some tokenizers put before a text: a Llama-style tokenizer
        would otherwise open every piece with a `▁`, a space the document does not have.
        """
        if continued is None or not any(continued) or self._pieces_join_cleanly():
            return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]
        anchored = [_ANCHOR + t if c else t for t, c in zip(texts, continued)]
        encoded = [e.ids for e in self.hf.encode_batch(anchored, add_special_tokens=False)]
        out = []
        for text, cont, ids in zip(texts, continued, encoded):
            rest = self._drop_anchor(ids, text) if cont else ids
            out.append(rest if rest is not None else self.encode(text))
        return out

    def _pieces_join_cleanly(self) -> bool:
        """Whether texts encoded apart decode to their concatenation (true of byte-level BPE, not of ▁ tokenizers)."""
        if self._joins_cleanly is None:
            probe = ("a b\n", "c d\n", " e")
            self._joins_cleanly = self.decode([i for t in probe for i in self.encode(t)]) == "".join(probe)
        return self._joins_cleanly

    def _drop_anchor(self, ids: list[int], text: str) -> list[int] | None:
        """ids encode _ANCHOR + text: the ids of text alone, or None if the anchor does not end on a token
        boundary or the rest does not spell text exactly."""
        want, got = _ANCHOR.encode("utf-8"), b""
        for k, i in enumerate(ids):
            got += self.token_bytes(i, first=(k == 0))
            if len(got) >= len(want):
                if got != want:
                    return None
                rest = ids[k + 1 :]
                return rest if b"".join(self.token_bytes(i) for i in rest) == text.encode("utf-8") else None
        return None

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self, token_id: int, first: bool = False) -> bytes:
        """The bytes token `token_id` contributes to decoded text: b"" for a special token, the literal text of
        another added token; the raw byte of a byte-fallback piece (`<0xNN>`) or of each byte-level character,
        so a piece holding part of a character gives exactly that part; a `▁` word marker as the space it
        decodes to.

        first: the token opens the text (the first id of an `encode` call). Some decoders treat it differently:
        Llama-style ones strip the space that encoding put before the text (`Strip` after `Fuse`, `Metaspace`).
        Joining token_bytes over the ids of an encoded text (the first with first=True) gives
        decode(ids).encode("utf-8") — which is the text itself whenever the tokenizer round-trips it.

        Modelled decoders: ByteLevel, ByteFallback, Metaspace, Replace, Strip, Fuse, Sequence of those, and none.
        For any other decoder the bytes of the token decoded alone are returned (exact for context-free pieces).
        """
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")
        table = self._byte_tables()[1 if first else 0]
        return table[token_id]

    def token_byte_lengths(self, first: bool = False) -> list[int]:
        """len(token_bytes(i, first)) for every id: the UTF-8 bytes of text each token stands for (0 for special
        tokens), in the middle of a text or (first=True) as its first token. Used for bits per byte."""
        return [len(b) for b in self._byte_tables()[1 if first else 0]]

    def _byte_tables(self) -> tuple[list[bytes], list[bytes]]:
        """(bytes of every token inside a text, bytes of every token opening a text); computed once."""
        if self._byte_table_cache is None:
            added = self.hf.get_added_tokens_decoder()
            steps = _decoder_steps(self.hf)

            def one(i: int, first: bool) -> bytes:
                if i in added:  # special tokens are not text; other added tokens stand for their literal text
                    return b"" if added[i].special else added[i].content.encode("utf-8")
                piece = self.hf.id_to_token(i)
                if piece is None:
                    return b""
                if steps is None:  # a decoder we do not model: the token decoded on its own
                    return self.decode([i]).encode("utf-8")
                return _piece_bytes(piece, steps, first)

            inside = [one(i, False) for i in range(self.vocab_size)]
            opening = [one(i, True) for i in range(self.vocab_size)] if _depends_on_position(steps) else inside
            self._byte_table_cache = (inside, opening)
        return self._byte_table_cache

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    def stream_decode(self, ids: Iterable[int]) -> Iterator[str]:
        """Yield text pieces as ids arrive, never splitting a multi-byte character."""
        decoder = self.stream_decoder()
        for i in ids:
            piece = decoder.push(i)
            if piece:
                yield piece
        piece = decoder.flush()
        if piece:
            yield piece


def vocab_shortfall(tokenizer: Tokenizer, requested: int) -> str | None:
    """A warning when a trained tokenizer is much smaller (under 90%) than the vocabulary asked for: BPE ran out
    of pairs to merge, which a small corpus does long before 8,000 tokens. None when it is about the size asked."""
    if tokenizer.vocab_size >= 0.9 * requested:
        return None
    return (
        f"asked for a {requested:,}-token vocabulary, got {tokenizer.vocab_size:,}: "
        "the text has nothing more for BPE to merge (more text gives a larger vocabulary)"
    )


# --- the bytes a token contributes to decoded text ----------------------------------------------------------------
# `tokenizers` decodes a list of pieces by running its decoder chain over them. To know what one piece adds to the
# text, without the U+FFFD that decoding a partial character alone produces, `_piece_bytes` replays the chain on
# that piece, keeping raw bytes where the real decoder would produce bytes (ByteLevel, ByteFallback).

_MODELLED_DECODERS = {"ByteLevel", "ByteFallback", "Metaspace", "Replace", "Strip", "Fuse"}


def _byte_level_chars() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable Latin-1 bytes stand for themselves, every other byte b for the
    character 256 + (its rank among those others); character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


_BYTE_LEVEL = _byte_level_chars()


def _decoder_steps(hf: _HFTokenizer) -> list[dict] | None:
    """The decoder chain as a flat list of JSON configs; [] without a decoder; None if a step is not modelled."""
    if hf.decoder is None:
        return []
    config = json.loads(hf.decoder.__getstate__())
    steps = config["decoders"] if config["type"] == "Sequence" else [config]
    if any(step.get("type") not in _MODELLED_DECODERS for step in steps):
        return None
    return steps


def _depends_on_position(steps: list[dict] | None) -> bool:
    """Whether a piece adds other bytes when it opens the text (no decoder: no separating space before it)."""
    return steps is not None and (not steps or any(step["type"] in ("Strip", "Metaspace") for step in steps))


def _piece_bytes(piece: str, steps: list[dict], first: bool) -> bytes:
    """What `piece` adds to decoded text under the decoder `steps` (see `Tokenizer.token_bytes`)."""
    if not steps:
        return piece.encode("utf-8") if first else b" " + piece.encode("utf-8")  # no decoder: pieces joined by spaces
    value: str | bytes = piece
    fused = False  # after Fuse the chain holds one string: start-of-text steps then only touch the first piece
    for step in steps:
        kind = step["type"]
        if kind == "ByteLevel":  # each character stands for one byte; a piece with any other character stays as is
            if isinstance(value, str) and all(c in _BYTE_LEVEL for c in value):
                value = bytes(_BYTE_LEVEL[c] for c in value)
        elif kind == "ByteFallback":  # `<0xNN>` is the byte NN
            if isinstance(value, str) and len(value) == 6 and value.startswith("<0x") and value.endswith(">"):
                try:
                    value = bytes([int(value[3:5], 16)])
                except ValueError:
                    pass
        elif kind == "Replace":
            pattern, content = step["pattern"], step["content"]
            if "String" in pattern:
                value = _replace(value, pattern["String"], content)
            else:
                value = _regex_replace(value, pattern["Regex"], content)
        elif kind == "Strip":  # strip up to `start` leading / `stop` trailing copies of `content`
            if first or not fused:
                value = _strip(value, step["content"], step["start"], 0)
            if not fused:  # after Fuse a trailing strip touches the end of the text only, which no piece knows
                value = _strip(value, step["content"], 0, step["stop"])
        elif kind == "Fuse":
            fused = True
        elif kind == "Metaspace":  # the marker is a space, dropped altogether in the first piece of the text
            scheme = step.get("prepend_scheme", "always" if step.get("add_prefix_space", True) else "never")
            drop = first and scheme != "never"
            value = _replace(value, step["replacement"], "" if drop else " ")
    return value if isinstance(value, bytes) else value.encode("utf-8")


def _replace(value: str | bytes, old: str, new: str) -> str | bytes:
    if isinstance(value, bytes):
        return value.replace(old.encode("utf-8"), new.encode("utf-8"))
    return value.replace(old, new)


def _regex_replace(value: str | bytes, pattern: str, new: str) -> str | bytes:
    if isinstance(value, bytes):
        return re.sub(pattern.encode("utf-8"), new.encode("utf-8"), value)
    return re.sub(pattern, new, value)


def _strip(value: str | bytes, char: str, start: int, stop: int) -> str | bytes:
    c = char.encode("utf-8") if isinstance(value, bytes) else char
    lo, hi = 0, len(value)
    while lo < min(start, hi) and value[lo : lo + len(c)] == c:
        lo += len(c)
    while stop and hi - len(c) >= lo and value[hi - len(c) : hi] == c and (len(value) - hi) // len(c) < stop:
        hi -= len(c)
    return value[lo:hi]


class StreamDecoder:
    """Token ids in, one at a time; text out, holding back the bytes of an unfinished character.

    Each new piece is the difference between decoding the recent ids with and without the newest
    ones, so tokenizers that drop a leading space when a token is decoded alone still join
    correctly, and the cost per id stays constant however long the text grows.
    """

    MAX_PENDING = 8  # ids held back at most; more than any one character needs, so a lone invalid byte still comes out

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] were already turned into text; they give the next piece its context
        self.read = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        text = self.tokenizer.decode(self.ids[self.prefix :])
        if len(text) > len(before) and (not text.endswith("\ufffd") or len(self.ids) - self.read >= self.MAX_PENDING):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character comes out as U+FFFD)."""
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        text = self.tokenizer.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return text[len(before) :]
