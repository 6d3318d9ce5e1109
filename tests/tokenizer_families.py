"""Tokenizers of the families lmforge can load, built offline with the `tokenizers` library (no downloads).

llama(style)  BPE with byte_fallback (`<0xNN>` pieces) and `▁` word markers, as Llama 2 / Mistral / Mixtral ship:
              "legacy": normalizer Prepend("▁") + Replace(" ", "▁") (the tokenizer.json most published models carry);
              "metaspace": Metaspace pre-tokenizer (prepend "first"), as transformers 5 builds LlamaTokenizer.
              Both decode with Replace("▁", " ") + ByteFallback + Fuse + Strip(" ", 1, 0).
unigram()     a SentencePiece-style Unigram model with byte_fallback, decoded by the Metaspace decoder.
"""

from __future__ import annotations

import json

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

SPECIALS = ["<unk>", "<s>", "</s>"]
BYTES = [f"<0x{b:02X}>" for b in range(256)]


def _learned_pieces(texts: list[str], vocab_size: int) -> tuple[dict[str, int], list]:
    """BPE pieces and merges learned on ▁-marked text (the ids are renumbered by the caller)."""
    t = Tokenizer(models.BPE())
    t.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    t.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False))
    model = json.loads(t.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


def llama(style: str = "legacy", texts: list[str] | None = None, learned: int = 120) -> Tokenizer:
    """A Llama-2-style tokenizer: <unk> <s> </s>, the 256 byte pieces, then up to `learned` BPE pieces of texts."""
    texts = texts or ["the quick brown fox jumps over the lazy dog. " * 20, "hello world, hello there; naïve café"]
    pieces, merges = _learned_pieces(texts, learned)
    vocab = {p: i for i, p in enumerate(SPECIALS + BYTES)}
    for piece in sorted(pieces, key=pieces.get):
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    if style == "legacy":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    elif style == "metaspace":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    else:
        raise ValueError(style)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(SPECIALS)
    return tok


def unigram() -> Tokenizer:
    """A Unigram model with byte_fallback, split on ▁ by Metaspace and decoded by the Metaspace decoder."""
    words = ["▁", "▁the", "▁a", "e", "t", "a", "o", "n", "s", "th", "he", "▁ca", "fé", "▁日本"]
    vocab = [(p, 0.0) for p in SPECIALS] + [(b, -10.0) for b in BYTES] + [(w, -2.0 - len(w)) for w in words]
    tok = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Sequence(
        [decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)]
    )
    tok.add_special_tokens(SPECIALS)
    return tok
