import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.data.tokenizer import EOT, Tokenizer
from lmforge.errors import LmforgeError


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trip_any_unicode(small_tokenizer, s):
    assert small_tokenizer.decode(small_tokenizer.encode(s)) == s


@pytest.mark.parametrize(
    "s", ["", " ", "\t\n\r\n", "  two  spaces\n\n\n", "emoji 🚀🧪 and é ñ ß 漢字", "\x00\x7f", EOT + "x" + EOT]
)
def test_round_trip_edge_cases(small_tokenizer, s):
    assert small_tokenizer.decode(small_tokenizer.encode(s)) == s


def test_no_unknown_token(small_tokenizer):
    # every byte is in the alphabet, so unseen scripts still encode to ordinary ids
    ids = small_tokenizer.encode("ᚠᛇᚻ ꙮ")
    assert ids and all(0 <= i < small_tokenizer.vocab_size for i in ids)


def test_end_of_text_is_special(small_tokenizer):
    assert small_tokenizer.encode(EOT, allow_special=True) == [small_tokenizer.eos_id]
    assert small_tokenizer.eos_id not in small_tokenizer.encode(EOT)  # text from users is text


def test_extra_specials_and_saved_file_loads_in_tokenizers(tmp_path):
    tok = Tokenizer.train(["hello world, hello tokens"] * 20, 300, special_tokens=["<|pad|>"])
    path = tmp_path / "tok.json"
    tok.save(path)
    hf = tokenizers.Tokenizer.from_file(str(path))
    assert hf.encode("hello world").ids == tok.encode("hello world")
    again = Tokenizer.from_file(path)
    assert again.encode("<|pad|>", allow_special=True) == [again.hf.token_to_id("<|pad|>")]
    assert again.eos_id == tok.eos_id


def test_vocab_too_small():
    with pytest.raises(LmforgeError, match="too small"):
        Tokenizer.train(["abc"], 200)


def test_stream_decode_never_splits_characters(small_tokenizer):
    text = "naïve 🚀 façade — 漢字"
    pieces = list(small_tokenizer.stream_decode(small_tokenizer.encode(text)))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_byte_lengths_match_text(small_tokenizer):
    text = "the cat sees a tree. é🚀"
    ids = small_tokenizer.encode(text)
    lengths = small_tokenizer.token_byte_lengths()
    assert sum(lengths[i] for i in ids) == len(text.encode("utf-8"))
    assert lengths[small_tokenizer.eos_id] == 0
