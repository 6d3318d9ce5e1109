"""Byte-level BPE tokenizer on the Hugging Face `tokenizers` engine.

Every string maps to tokens and back without loss: text is split GPT-2 style
(regex pre-tokenisation) and each piece is seen as bytes, so there is no unknown token.
The file format is the standard `tokenizer.json`, so `tokenizers.Tokenizer.from_file`
reads ours and we read theirs (for example a Hugging Face GPT-2 or Llama tokenizer).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from ..errors import LmforgeError
from ..io import atomic_path

EOT = "<|endoftext|>"
# Names other tokenizers give their end-of-document token, tried in order when loading a foreign file.
_EOS_CANDIDATES = (EOT, "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "<|im_end|>")


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

    def encode_batch(self, texts: list[str], allow_special: bool = False) -> list[list[int]]:
        """Encode many texts at once, in parallel over all cores (Rust threads); allow_special as in encode."""
        try:
            return [e.ids for e in self._encoder(allow_special).encode_batch(texts, add_special_tokens=False)]
        except TypeError:  # the Rust side takes only valid Unicode
            _refuse_surrogates(texts)
            raise

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def token_byte_lengths(self) -> list[int]:
        """Number of UTF-8 bytes of text each token stands for (0 for special tokens); used for bits per byte."""
        n = self.vocab_size
        special = {t.content for t in self.hf.get_added_tokens_decoder().values() if t.special}
        byte_level = isinstance(self.hf.pre_tokenizer, pre_tokenizers.ByteLevel) or "ByteLevel" in str(self.hf.decoder)
        lengths = [0] * n
        for i in range(n):
            piece = self.hf.id_to_token(i)
            if piece is None or piece in special:
                continue
            if byte_level:
                lengths[i] = len(piece)  # byte-level pieces use one character per byte
            else:
                lengths[i] = len(self.decode([i]).encode("utf-8"))
        return lengths

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

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes token_id adds to decoded text (anywhere but at the very start of a text).

        Byte-level BPE: its raw bytes (possibly part of a character); byte_fallback `<0xNN>`: that
        one byte; a SentencePiece-style `▁word` piece: b" word"; an added or special token: its text.
        The generation engine decodes new text from these bytes, so joined over the tokens of a
        completion they are its text's UTF-8. (A decoder that drops the first space of a whole text,
        as Llama's does, makes decode(ids) one space shorter than the joined bytes.)
        """
        cache = self.__dict__.setdefault("_token_bytes_cache", {})
        b = cache.get(token_id)
        if b is None:
            b = cache[token_id] = self._token_bytes(token_id)
        return b

    def _token_bytes(self, token_id: int) -> bytes:
        piece = self.hf.id_to_token(token_id)
        if piece is None:
            return b""
        added = self.hf.get_added_tokens_decoder().get(token_id)
        if added is not None:
            return added.content.encode("utf-8")
        if "ByteLevel" in str(self.hf.decoder):  # one character per byte (GPT-2's printable byte alphabet)
            alphabet = _byte_level_alphabet()
            if all(c in alphabet for c in piece):
                return bytes(alphabet[c] for c in piece)
        if (
            len(piece) == 6
            and piece.startswith("<0x")
            and piece.endswith(">")
            and getattr(self.hf.model, "byte_fallback", False)
        ):
            return bytes([int(piece[3:5], 16)])
        # Anything else: what the token adds after an anchor (the end-of-text token), so a decoder
        # that strips the first space of a text strips it from the anchor's side, not this token's.
        anchor = self.decode([self.eos_id])
        return self.decode([self.eos_id, token_id])[len(anchor) :].encode("utf-8")

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
