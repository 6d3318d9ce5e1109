"""Paired data: reading JSONL/TSV, demo tasks, tokenising with BOS/EOS, length-bucketed batches."""

import json

import pytest
import torch

from lmforge.data import pairs
from lmforge.errors import LmforgeError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_read_jsonl_and_tsv(tmp_path):
    rows = [
        {"source": "un chat", "target": "a cat"},
        {"source": "é 🚀", "target": ""},
        {"source": "x", "target": "y", "id": 3},
    ]
    j = write_jsonl(tmp_path / "p.jsonl", rows)
    with open(j, "a") as f:
        f.write("\n   \n")  # blank lines are skipped
    assert pairs.read_pairs(j) == [("un chat", "a cat"), ("é 🚀", ""), ("x", "y")]
    t = tmp_path / "p.tsv"
    t.write_text("un chat\ta cat\n\nzwei\ttwo\n", encoding="utf-8")
    assert pairs.read_pairs(t) == [("un chat", "a cat"), ("zwei", "two")]


@pytest.mark.parametrize(
    "content, suffix, message",
    [
        ('{"source": "a", "target": "b"}\n{"source": "a", "target": \n', ".jsonl", "p.jsonl:2: not valid JSON"),
        ('{"source": "a"}\n', ".jsonl", 'p.jsonl:1: expected an object with string fields "source" and "target"'),
        ('["a", "b"]\n', ".jsonl", "p.jsonl:1: expected an object"),
        ('{"source": 1, "target": "b"}\n', ".jsonl", "p.jsonl:1: expected an object"),
        ("a\tb\nno tab here\n", ".tsv", "p.tsv:2: expected source<TAB>target, found 1"),
        ("a\tb\tc\n", ".tsv", "p.tsv:1: expected source<TAB>target, found 3"),
        ("\n\n", ".jsonl", "no pairs in"),
        ("a\tb\n", ".csv", "must be in a .jsonl or .tsv file"),
    ],
)
def test_bad_pair_files(tmp_path, content, suffix, message):
    f = tmp_path / f"p{suffix}"
    f.write_text(content, encoding="utf-8")
    with pytest.raises(LmforgeError, match=message.replace("(", r"\(")):
        pairs.read_pairs(f)


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(LmforgeError, match="data file not found"):
        pairs.read_pairs(tmp_path / "nope.jsonl")
    bad = tmp_path / "latin.tsv"
    bad.write_bytes("caf\xe9\tcoffee\n".encode("latin-1"))
    with pytest.raises(LmforgeError, match="not valid UTF-8"):
        pairs.read_pairs(bad)
    with pytest.raises(LmforgeError, match="source file not found"):
        pairs.read_sources(tmp_path / "nope.txt")


def test_split_pairs_is_deterministic_and_complete():
    data = [(str(i), str(-i)) for i in range(1000)]
    train, val = pairs.split_pairs(data, 0.05)
    assert len(val) == 50 and sorted(train + val) == sorted(data)
    assert pairs.split_pairs(data, 0.05) == (train, val)
    with pytest.raises(LmforgeError, match="too few pairs"):
        pairs.split_pairs(data[:1], 0.05)


def test_spell_number():
    cases = {
        0: "zero",
        7: "seven",
        13: "thirteen",
        20: "twenty",
        45: "forty-five",
        100: "one hundred",
        110: "one hundred ten",
        1000: "one thousand",
        20013: "twenty thousand thirteen",
        342107: "three hundred forty-two thousand one hundred seven",
        999999: "nine hundred ninety-nine thousand nine hundred ninety-nine",
    }
    for n, words in cases.items():
        assert pairs.spell_number(n) == words


@pytest.mark.parametrize("name", sorted(pairs.DEMOS))
def test_demo_splits_are_deterministic_and_disjoint(name):
    d = pairs.demo(name)
    train, val, test = d.pairs("train"), d.pairs("val"), d.pairs("test")
    assert (
        0.94 * d.size < len(train) < 0.98 * d.size
    )  # 48 of 50 hash buckets; a few frequent short sources make it vary
    assert 1000 < len(test) < 0.03 * d.size and 500 < len(val) < 0.03 * d.size
    assert len({s for s, _ in val}) == len(val) and len({s for s, _ in test}) == len(test)  # held-out sources once each
    sources = [set(s for s, _ in split) for split in (train, val, test)]
    assert not (sources[0] & sources[1]) and not (sources[0] & sources[2]) and not (sources[1] & sources[2])
    pairs._demo_splits.cache_clear()
    assert pairs.demo(name).pairs("test") == test  # regenerated from scratch: the same examples


def test_short_numbers_are_trained_as_often_as_drawn():
    train = pairs.demo("numbers").pairs("train")
    by_digits = [sum(len(t) == k for _, t in train) / len(train) for k in range(1, 7)]
    assert 0.005 < by_digits[0] < 0.02 and 0.45 < by_digits[5] < 0.55  # 1/63 and 32/63 of the draws
    assert sum(t == "7" for _, t in train) > 100 or sum(t == "8" for _, t in train) > 100  # short numbers repeat


def test_demo_examples_are_correct():
    import datetime

    for source, target in pairs.demo("numbers").pairs("val")[:200]:
        assert pairs.spell_number(int(target)) == source
    for source, target in pairs.demo("reverse").pairs("val")[:200]:
        assert target.split() == source.split()[::-1]
    for source, target in pairs.demo("sort").pairs("val")[:200]:
        assert target.split() == sorted(source.split())
    for source, target in pairs.demo("dates").pairs("val")[:200]:
        d = datetime.date.fromisoformat(target)
        assert str(d.year) in source and (str(d.day) in source)
    with pytest.raises(LmforgeError, match="unknown demo 'nope'; available: numbers"):
        pairs.demo("nope")


@pytest.fixture(scope="module")
def tok():
    return pairs.PairTokenizer.train(pairs.demo("dates").pairs("train")[:2000], 400, split_digits=True)


def test_tokenizer_specials_and_round_trip(tok, tmp_path):
    assert len({tok.bos_id, tok.eos_id, tok.pad_id}) == 3
    src = tok.encode_sources(["March 5, 2021", ""])
    assert src[0][-1] == tok.src_eos_id and src[1] == [tok.src_eos_id]  # an empty source still has a token
    tgt = tok.encode_targets(["2021-03-05"])[0]
    assert tok.decode(tgt) == "2021-03-05" and tok.bos_id not in tgt and tok.eos_id not in tgt
    assert sum(tok.target.hf.id_to_token(i).isdigit() for i in tgt) == 8  # split_digits: one token per digit
    tok.save(tmp_path)
    again = pairs.PairTokenizer.load(tmp_path, shared=True)
    assert again.encode_sources(["May 1, 1999"]) == tok.encode_sources(["May 1, 1999"])
    with pytest.raises(LmforgeError, match="not found"):
        pairs.PairTokenizer.load(tmp_path, shared=False)  # no source_tokenizer.json for a shared vocabulary


def test_separate_vocabularies():
    data = [("ein hund", "a dog"), ("zwei katzen", "two cats")] * 50
    t = pairs.PairTokenizer.train(data, 300, shared=False)
    assert not t.shared and t.source is not t.target
    assert "ein" in t.source.hf.get_vocab() and "ein" not in t.target.hf.get_vocab()


def test_collate_shifts_target_and_masks_padding(tok):
    src = tok.encode_sources(["Jan 2 1990", "December 25, 2001"])
    tgt = tok.encode_targets(["1990-01-02", "2001-12-25 x"])
    b = pairs.collate(src, tgt, tok)
    assert b.src.shape == (2, max(map(len, src))) and b.tgt_in.shape == b.labels.shape == (2, max(map(len, tgt)) + 1)
    for i in range(2):
        n = len(tgt[i])
        assert b.tgt_in[i, 0] == tok.bos_id and b.tgt_in[i, 1 : n + 1].tolist() == tgt[i]
        assert b.labels[i, :n].tolist() == tgt[i] and b.labels[i, n] == tok.eos_id
        assert (b.labels[i, n + 1 :] == pairs.IGNORE).all() and b.tgt_mask[i].sum() == n + 1
        assert b.src_mask[i].sum() == len(src[i]) and (b.src[i, len(src[i]) :] == tok.src_pad_id).all()
    assert b.target_tokens == len(tgt[0]) + len(tgt[1]) + 2


def test_encode_pairs_leaves_out_too_long(tok):
    data = [("May 1, 1999", "1999-05-01"), ("x " * 40, "y"), ("y", "z " * 40)]
    src, tgt, keep = pairs.encode_pairs(data, tok, max_len=20)
    assert keep == [0] and len(src) == len(tgt) == 1


def test_length_bucketed_batches_waste_little_padding(tok):
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 40, (3000, 2), generator=g).tolist()
    src = [[5] * a for a, _ in lengths]
    tgt = [[6] * (a // 2 + b // 4) for a, b in lengths]  # target length loosely follows the source's
    pd = pairs.PairData(src, tgt, tok, seed=0)

    def padding_fraction(b):
        return 1 - (b.src_mask.sum() + b.tgt_mask.sum()).item() / (b.src_mask.numel() + b.tgt_mask.numel())

    bucketed = [padding_fraction(pd.batch(32, g)) for _ in range(50)]
    shuffled = []
    for _ in range(50):
        idx = torch.randint(0, len(src), (32,), generator=g).tolist()
        shuffled.append(padding_fraction(pairs.collate([src[i] for i in idx], [tgt[i] for i in idx], tok)))
    assert (
        sum(shuffled) / 50 > 0.3 and sum(bucketed) / 50 < 0.15
    )  # random batches are over a third padding, bucketed ones far less
    # the batches come only from the generator: the same seed draws the same batches
    a = pd.batch(32, torch.Generator().manual_seed(5))
    b = pd.batch(32, torch.Generator().manual_seed(5))
    assert torch.equal(a.src, b.src) and torch.equal(a.labels, b.labels)
