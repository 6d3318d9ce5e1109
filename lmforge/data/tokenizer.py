"""Byte-level BPE tokenizer on the Hugging Face `tokenizers` engine.

Every string maps to tokens and back without loss: text is split GPT-2 style
(regex pre-tokenisation) and each piece is seen as bytes, so there is no unknown token.
The file format is the standard `tokenizer.json`, so `tokenizers.Tokenizer.from_file`
reads ours and we read theirs (for example a Hugging Face GPT-2 or Llama tokenizer).
"""

from __future__ import annotations

import functools
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
        hf.encode_special_tokens = True  # text from users is text: encode() splits "<|endoftext|>" like any text
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

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of text. Text is text: special-token look-alikes such as "<|endoftext|>" in it are
        encoded as ordinary characters, unless allow_special, which makes them the control tokens.
        Raises LmforgeError for text that is not valid Unicode (a lone surrogate such as "\\ud800")."""
        try:
            return self._encoder(allow_special).encode(text, add_special_tokens=False).ids
        except TypeError:  # the Rust side takes only valid Unicode
            _refuse_surrogates([text])
            raise

    def encode_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """(token ids of text, the character of text where each token starts), text as text as in encode.
        Raises LmforgeError for text that is not valid Unicode."""
        try:
            enc = self.hf.encode(text, add_special_tokens=False)
        except TypeError:
            _refuse_surrogates([text])
            raise
        return enc.ids, [start for start, _ in enc.offsets]

    def encode_batch(
        self, texts: list[str], allow_special: bool = False, continued: list[bool] | None = None
    ) -> list[list[int]]:
        """Encode many texts at once, in parallel over all cores (Rust threads); allow_special as in encode.

        continued[i]: texts[i] is a later piece of a longer text (a document cut at a line break). It is encoded
        as it would be inside that text, without what some tokenizers put before a text: a Llama-style tokenizer
        would otherwise open every piece with a `▁`, a space the document does not have.
        """
        plain = continued is None or not any(continued) or self._pieces_join_cleanly()
        inputs = texts if plain else [_ANCHOR + t if c else t for t, c in zip(texts, continued)]
        try:
            encoded = [e.ids for e in self._encoder(allow_special).encode_batch(inputs, add_special_tokens=False)]
        except TypeError:  # the Rust side takes only valid Unicode
            _refuse_surrogates(texts)
            raise
        if plain:
            return encoded
        out = []
        for text, cont, ids in zip(texts, continued, encoded):
            rest = self._drop_anchor(ids, text) if cont else ids
            out.append(rest if rest is not None else self.encode(text, allow_special))
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
        """The bytes token_id adds to decoded text: the raw byte of a byte-fallback piece (`<0xNN>`) or of each
        byte-level character, so a piece holding part of a character gives exactly that part; a `▁word` piece
        b" word"; an added or special token its text (as decode shows it); b"" for an id outside the vocabulary.

        first: the token opens the text (the first id of an `encode` call). Some decoders treat it differently:
        Llama-style ones strip the space that encoding put before the text (`Strip` after `Fuse`, `Metaspace`).
        Joining token_bytes over the ids of an encoded text (the first with first=True) gives
        decode(ids).encode("utf-8") — the text itself whenever the tokenizer round-trips it. The generation
        engine decodes new text from these bytes (a completion never opens a text: first=False).

        Modelled decoders: ByteLevel, ByteFallback, Metaspace, Replace, Strip, Fuse, Sequence of those, and none.
        Any other: what the token adds to decoded text after the end-of-text token (alone, for first).
        """
        tables = self._byte_tables()
        return tables[1 if first else 0][token_id] if 0 <= token_id < len(tables[0]) else b""

    def token_byte_lengths(self, first: bool = False) -> list[int]:
        """The UTF-8 bytes of text each token stands for, inside a text or (first=True) opening it: len of
        token_bytes, except 0 for special tokens, which stand for no text. Used for bits per byte."""
        special = {i for i, t in self.hf.get_added_tokens_decoder().items() if t.special}
        return [0 if i in special else len(b) for i, b in enumerate(self._byte_tables()[1 if first else 0])]

    def _byte_tables(self) -> tuple[list[bytes], list[bytes]]:
        """(bytes of every token inside a text, bytes of every token opening a text); computed once."""
        if self._byte_table_cache is None:
            added = self.hf.get_added_tokens_decoder()
            steps = _decoder_steps(self.hf)
            anchor = self.decode([self.eos_id])

            def one(i: int, first: bool) -> bytes:
                if i in added:  # its text, as decode shows it (special tokens count no bytes of text for bpb)
                    return added[i].content.encode("utf-8")
                piece = self.hf.id_to_token(i)
                if piece is None:
                    return b""
                if steps is not None:
                    return _piece_bytes(piece, steps, first)
                # A decoder we do not model: decoded after the end-of-text token, so that a decoder stripping the
                # first space of a text strips it from the anchor's side (decoded alone when it opens the text).
                if first:
                    return self.decode([i]).encode("utf-8")
                return self.decode([self.eos_id, i])[len(anchor) :].encode("utf-8")

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

    def _encoder(self, allow_special: bool) -> _HFTokenizer:
        """The `tokenizers` engine that reads special-token text as text (self.hf, once set so) or as control tokens."""
        if not allow_special:
            return self.hf
        parsing = self.__dict__.get("_special_parsing")
        if parsing is None:
            parsing = self.__dict__["_special_parsing"] = _HFTokenizer.from_str(self.hf.to_str())
        return parsing


def _refuse_surrogates(texts: list[str]) -> None:
    """LmforgeError naming the first lone UTF-16 surrogate in texts (valid JSON can carry one, as "\\ud800")."""
    for text in texts:
        if not isinstance(text, str):
            return
        for i, c in enumerate(text):
            if "\ud800" <= c <= "\udfff":
                raise LmforgeError(f"text is not valid Unicode: a lone surrogate U+{ord(c):04X} at character {i}")


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
    """Whether a piece may add other bytes when it opens the text: no decoder (no separating space before it),
    Strip and Metaspace (the text's first space), and any decoder we do not model (decoded alone, to be safe)."""
    return steps is None or not steps or any(step["type"] in ("Strip", "Metaspace") for step in steps)


def _piece_bytes(piece: str, steps: list[dict], first: bool) -> bytes:
    """What `piece` adds to decoded text under the decoder `steps` (see `Tokenizer.token_bytes`)."""
    if not steps:
        return piece.encode("utf-8") if first else b" " + piece.encode("utf-8")  # no decoder: pieces joined by spaces
    value: str | bytes = piece
    fused = False  # after Fuse the chain holds one string: start-of-text steps then only touch the first piece
    for step in steps:
        kind = step["type"]
        if kind == "ByteLevel":  # each character stands for one byte; a piece with any other character stays as is
            alphabet = _byte_level_alphabet()
            if isinstance(value, str) and all(c in alphabet for c in value):
                value = bytes(alphabet[c] for c in value)
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


@functools.lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet as {character: byte}: printable Latin-1 bytes stand for themselves,
    the other 68 bytes for the characters U+0100, U+0101, ... in byte order (Radford et al. 2019, encoder.py)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + k): b for k, b in enumerate(others)}
