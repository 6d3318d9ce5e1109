"""Bits per byte counts the bytes of text the predicted tokens stand for, for every tokenizer family lmforge loads."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizer_families import llama, unigram

from lmforge.data.tokenizer import Tokenizer
from lmforge.evaluation.perplexity import ByteCounts, evaluate_text

# Each family with the texts it gives back unchanged. The ▁ families map a literal "▁" to a space, and those whose
# encoder prepends ▁ only to text that does not already start with one ("metaspace", the Unigram) drop a leading
# space: the tokenizers themselves lose those characters, so no byte count can give them back.
FAMILIES = {
    "byte-level BPE (lmforge)": (lambda tmp: _lmforge_bpe(), lambda text: True),
    "GPT-2 vocab.json + merges.txt": (lambda tmp: _gpt2_files(tmp), lambda text: True),
    "Llama BPE, legacy normalizer": (lambda tmp: Tokenizer(llama("legacy")), lambda text: "▁" not in text),
    "Llama BPE, Metaspace pre-tokenizer": (
        lambda tmp: Tokenizer(llama("metaspace")),
        lambda text: "▁" not in text and not text.startswith(" "),
    ),
    "Unigram, Metaspace decoder": (
        lambda tmp: Tokenizer(unigram()),
        lambda text: "▁" not in text and not text.startswith(" "),
    ),
}


def _lmforge_bpe() -> Tokenizer:
    return Tokenizer.train(["the cat sees a tree. naïve café 日本語 😊 " * 20], 300)


def _gpt2_files(tmp) -> Tokenizer:
    from lmforge.interop.hf import read_hf_tokenizer

    _lmforge_bpe().hf.model.save(str(tmp))  # vocab.json + merges.txt, the files GPT-2 folders carry
    return read_hf_tokenizer(tmp)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    make, keeps = FAMILIES[request.param]
    return make(tmp_path_factory.mktemp("tok")), keeps


def _bytes_of(tok: Tokenizer, ids: list[int]) -> list[bytes]:
    return [tok.token_bytes(i, first=(n == 0)) for n, i in enumerate(ids)]


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=40))
def test_token_bytes_rebuild_the_text(family, text):
    """Per-token bytes join to the decoded text, and their lengths sum to the text's UTF-8 length (arbitrary
    Unicode; for the ▁ families, the texts they give back unchanged)."""
    tok, keeps = family
    ids = tok.encode(text)
    parts = _bytes_of(tok, ids)
    assert b"".join(parts) == tok.decode(ids).encode("utf-8")
    if keeps(text):
        assert tok.decode(ids) == text
        assert sum(len(p) for p in parts) == len(text.encode("utf-8"))
        lengths, first = tok.token_byte_lengths(), tok.token_byte_lengths(first=True)
        assert sum(first[i] if n == 0 else lengths[i] for n, i in enumerate(ids)) == len(text.encode("utf-8"))


def test_pieces_that_fooled_decoding_alone():
    """A byte piece is one byte (not U+FFFD's three), a ▁ piece carries its space, except opening the text."""
    tok = Tokenizer(llama("legacy"))
    assert tok.token_bytes(tok.hf.token_to_id("<0xE6>")) == b"\xe6"
    assert tok.token_bytes(tok.hf.token_to_id("▁")) == b" "
    assert tok.token_bytes(tok.hf.token_to_id("▁")) != tok.decode([tok.hf.token_to_id("▁")]).encode()
    assert tok.token_bytes(tok.hf.token_to_id("▁"), first=True) == b""
    assert tok.token_bytes(tok.eos_id) == b"</s>" and tok.token_byte_lengths()[tok.eos_id] == 0  # no text for bpb
    bpe = _lmforge_bpe()
    (first, second) = bpe.encode("😊")[:2]  # a byte-level piece holding part of a character
    assert len(bpe.token_bytes(first)) + len(bpe.token_bytes(second)) <= 4 and bpe.decode([first]) == "\ufffd"


def test_byte_counts_of_a_stream_of_documents():
    """In a token stream (documents encoded one by one, EOS after each) the token after EOS opens a document."""
    tok = Tokenizer(llama("legacy"))
    docs = ["ça va très bien 😊", " two spaces  here", "naïve café 日本語\n"]
    stream = [i for d in docs for i in tok.encode(d) + [tok.eos_id]]
    x, y = torch.tensor(stream[:-1]), torch.tensor(stream[1:])
    counts = ByteCounts.of(tok, vocab_size=tok.vocab_size + 61)
    assert len(counts.inside) == tok.vocab_size + 61
    text_bytes = sum(len(d.encode()) for d in docs)
    assert counts.count(x, y) == text_bytes - len(tok.token_bytes(stream[0], first=True))
    assert counts.count(x[None], y[None]) == counts.count(x, y)  # (B, T) windows too
    y_masked = y.clone()
    y_masked[:5] = -100  # ignored targets count nothing
    assert counts.count(x, y_masked) == counts.count(x[5:], y[5:])


CASE_TEXT = "ça va très bien 😊 merci\nnaïve café 日本語 🙂 ok\n" * 4  # issue 11's case: 240 bytes of UTF-8


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    """A one-layer Llama folder (vocabulary 320) with a Llama-2-style tokenizer, converted with `convert --from-hf`."""
    transformers = pytest.importorskip("transformers")
    from conftest import main

    root = tmp_path_factory.mktemp("llama")
    # Merges learned on digits only: the case text is then one token per byte, as in the issue's case.
    hf_tok = llama("legacy", texts=["0123456789 " * 50, "31 41 59 26 53 58 97 93"], learned=61)
    assert 300 < hf_tok.get_vocab_size() <= 320
    cfg = transformers.LlamaConfig(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.02,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(root / "hf")
    hf_tok.save(str(root / "hf" / "tokenizer.json"))
    assert main(["convert", "--from-hf", str(root / "hf"), "--out", str(root / "run")]) == 0
    (root / "text.txt").write_text(CASE_TEXT, encoding="utf-8")
    return root


def test_issue_case_bits_per_byte(llama_run, capsys):
    """`lmforge eval` on the issue's text: 241 predicted tokens holding 240 bytes, so bits/byte = loss x 241 / ln 2
    / 240 (8.35 for a near-uniform model over 320 tokens; decoding each token alone gave 4.96)."""
    from conftest import run_cli

    from lmforge.runs import load

    assert len(CASE_TEXT.encode()) == 240
    code, out, err = run_cli(capsys, "eval", llama_run / "run", "--data", llama_run / "text.txt")
    assert code == 0, err
    fields = dict(f.strip().rsplit(" ", 1) for f in out.strip().split("|"))
    tokens, loss, bpb = int(fields["tokens"].replace(",", "")), float(fields["loss"]), float(fields["bits/byte"])
    assert tokens == 241
    assert bpb == pytest.approx(loss * 241 / math.log(2) / 240, abs=2e-4)  # printed values are rounded
    assert bpb == pytest.approx(8.35, abs=0.05)  # loss ~ ln 320 = 5.768: a random model is near uniform

    model, tok = load(llama_run / "run")
    res = evaluate_text(model, tok, llama_run / "text.txt")
    assert res["bits_per_byte"] == pytest.approx(res["loss"] * res["tokens"] / math.log(2) / 240, rel=1e-12)
    old_bytes = sum(len(tok.decode([i]).encode()) for i in tok.encode(CASE_TEXT)[1:])  # the old count
    assert old_bytes != 240


@settings(max_examples=200, deadline=None)
@given(head=st.text(max_size=20), tail=st.text(max_size=20))
def test_later_pieces_of_a_document_add_no_space(family, head, tail):
    """prepare cuts long documents after a line break and encodes the pieces apart: the pieces' tokens must spell
    the document, with no ▁ opening each piece."""
    tok, keeps = family
    doc = head + "\n" + tail
    ids = tok.encode(head + "\n") + tok.encode_batch([tail], continued=[True])[0]
    if keeps(doc):
        assert b"".join(_bytes_of(tok, ids)) == doc.encode("utf-8")
