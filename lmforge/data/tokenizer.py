"""Byte-level BPE tokenizer on the Hugging Face `tokenizers` engine.

Every string maps to tokens and back without loss: text is split GPT-2 style
(regex pre-tokenisation) and each piece is seen as bytes, so there is no unknown token.
The file format is the standard `tokenizer.json`, so `tokenizers.Tokenizer.from_file`
reads ours and we read theirs (for example a Hugging Face GPT-2 or Llama tokenizer).
"""

from __future__ import annotations

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

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once, in parallel over all cores (Rust threads)."""
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

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
