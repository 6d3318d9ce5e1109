import json

import numpy as np
import pytest
import torch

from lmforge.data import corpus
from lmforge.data.corpus import SkipCounter, discover, read_documents
from lmforge.data.prepare import prepare
from lmforge.data.shards import SHARD_MAGIC, TokenData, read_shard, write_shard
from lmforge.errors import LmforgeError


@pytest.mark.parametrize("vocab", [300, 65536, 100_000])
def test_shard_round_trip(tmp_path, vocab):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, size=5000)
    path = tmp_path / "train_0000.bin"
    write_shard(path, tokens, vocab)
    header = np.fromfile(path, dtype="<i4", count=256)
    assert header[0] == SHARD_MAGIC and header[2] == 5000
    assert header[1] == (1 if vocab <= 65536 else 2)
    back = read_shard(path)
    assert back.dtype == (np.uint16 if vocab <= 65536 else np.uint32)
    assert np.array_equal(np.asarray(back, dtype=np.int64), tokens)


def test_shard_validation(tmp_path):
    good = tmp_path / "good.bin"
    write_shard(good, np.arange(100), 300)
    raw = good.read_bytes()
    cases = {"truncated": raw[:-10], "short": raw[:100], "magic": b"\x01\x02\x03\x04" + raw[4:]}
    for name, content in cases.items():
        p = tmp_path / f"{name}.bin"
        p.write_bytes(content)
        with pytest.raises(LmforgeError):
            read_shard(p)
    with pytest.raises(LmforgeError, match="not found"):
        read_shard(tmp_path / "missing.bin")


def test_prepare_split_and_skips(tmp_path, small_tokenizer, capsys):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    docs = [f"document number {i}: the cat sees the moon.\n" * 3 for i in range(300)]
    for i, d in enumerate(docs):
        (src / ("sub" if i % 2 else "") / f"d{i:03d}.txt").write_text(d)
    (src / "blob.bin").write_bytes(b"\x00\x01\x02binary")
    (src / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    out = tmp_path / "shards"
    stats = prepare(src, small_tokenizer, out, val_fraction=0.05, progress=False)
    assert stats.documents == 300 and stats.skipped_files == 2
    assert "skipped 2 file(s)" in capsys.readouterr().err
    train = np.asarray(read_shard(out / "train_0000.bin"))
    val = np.asarray(read_shard(out / "val_0000.bin"))
    eos = small_tokenizer.eos_id
    assert (train == eos).sum() + (val == eos).sum() == 300  # one separator per document
    assert 5 <= (val == eos).sum() <= 30
    # deterministic: preparing again gives the same bytes
    out2 = tmp_path / "shards2"
    prepare(src, small_tokenizer, out2, val_fraction=0.05, progress=False)
    assert (out / "val_0000.bin").read_bytes() == (out2 / "val_0000.bin").read_bytes()
    # all text survives: decoding both splits gives back every document's characters
    text = small_tokenizer.decode(train.tolist()) + small_tokenizer.decode(val.tolist())
    assert len(text.replace("<|endoftext|>", "")) == sum(len(d) for d in docs)


def test_single_file_gets_validation_split(tmp_path, small_tokenizer):
    f = tmp_path / "one.txt"
    f.write_text("".join(f"line {i} the dog likes the river\n" for i in range(3000)))
    out = tmp_path / "s"
    stats = prepare(f, small_tokenizer, out, val_fraction=0.02, progress=False)
    assert stats.val_tokens > 0 and stats.train_tokens > 10 * stats.val_tokens


def test_jsonl_and_parquet(tmp_path):
    j = tmp_path / "a.jsonl"
    j.write_text(
        json.dumps({"text": "hello"}) + "\n" + json.dumps({"other": 1}) + "\n" + json.dumps({"text": "world"}) + "\n"
    )
    assert list(read_documents([j])) == ["hello", "world"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "b.parquet"
    pq.write_table(pa.table({"text": ["x" * 10, "y", None], "id": [1, 2, 3]}), p, row_group_size=1)
    assert list(read_documents([p])) == ["x" * 10, "y"]
    bad = tmp_path / "c.parquet"
    pq.write_table(pa.table({"body": ["x"]}), bad)
    with pytest.raises(LmforgeError, match="no 'text' column"):
        list(read_documents([bad]))


def test_discover(tmp_path):
    with pytest.raises(LmforgeError, match="not found"):
        discover(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LmforgeError, match="no files"):
        discover(empty)
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "b.md").write_text("b")
    assert [p.name for p in discover(str(tmp_path / "*.txt"))] == ["a.txt"]
    stdlib = discover(None)
    assert any(p.name == "os.py" for p in stdlib)
    assert not any("site-packages" in p.parts or p.name.startswith("test_") for p in stdlib)


def test_batches_are_shifted_windows(tmp_path):
    write_shard(tmp_path / "train_0000.bin", np.arange(1000) % 300, 300)
    write_shard(tmp_path / "train_0001.bin", np.arange(50) % 300, 300)
    td = TokenData(tmp_path, "train")
    x, y = td.batch(16, 20, torch.Generator().manual_seed(0))
    assert x.shape == (16, 20) and torch.equal(x[:, 1:], y[:, :-1])
    assert torch.all((y - x) % 300 == 1)  # consecutive tokens of one shard, never across shards


def test_large_file_is_streamed(tmp_path, small_tokenizer, monkeypatch):
    monkeypatch.setattr(corpus, "LARGE_FILE_BYTES", 2000)
    monkeypatch.setattr(corpus, "STREAM_BLOCK", 512)
    big = tmp_path / "big.txt"
    text = "".join(f"line {i}: the robot draws a red box ✓\n" for i in range(400))
    big.write_text(text, encoding="utf-8")
    pieces = list(read_documents([big]))
    assert len(pieces) > 10 and "".join(pieces) == text  # streamed in pieces, nothing lost, characters intact
    bad = tmp_path / "bad.txt"
    bad.write_bytes(text.encode() + b"\xff\xfe tail")
    skipped = SkipCounter()
    assert list(read_documents([bad], skipped)) == [] and skipped.files == 1
    out = tmp_path / "s"
    stats = prepare(big, small_tokenizer, out, val_fraction=0.05, progress=False)
    train = np.asarray(read_shard(out / "train_0000.bin"))
    val = np.asarray(read_shard(out / "val_0000.bin"))
    assert stats.documents == 1 and (train == small_tokenizer.eos_id).sum() + (val == small_tokenizer.eos_id).sum() == 1
    assert len(small_tokenizer.decode(train.tolist()) + small_tokenizer.decode(val.tolist())) == len(text) + len(
        "<|endoftext|>"
    )


@pytest.mark.parametrize("style", ["legacy", "metaspace"])
def test_prepare_with_a_llama_tokenizer_keeps_the_text(tmp_path, style):
    """A long document is cut into pieces encoded apart; with a ▁ tokenizer no piece may open with a space the
    document does not have (each piece's tokens spell exactly its text)."""
    from tokenizer_families import llama

    from lmforge.data.tokenizer import Tokenizer

    tok = Tokenizer(llama(style))
    (tmp_path / "c").mkdir()
    doc = "".join(f"line {i}: hello world\n" + ("    indented\n" if i % 7 == 0 else "") for i in range(2500))
    (tmp_path / "c" / "a.txt").write_text(doc, encoding="utf-8")
    prepare(tmp_path / "c", tok, tmp_path / "s", val_fraction=0.1, progress=False)
    lines = []
    for split in ("train", "val"):
        ids = [int(i) for i in read_shard(tmp_path / "s" / f"{split}_0000.bin") if i != tok.eos_id]
        lines += b"".join(tok.token_bytes(i) for i in ids).decode().splitlines()  # every token as inside a text
    lines[0] = lines[0].removeprefix(" ")  # the document's first token opens it: its ▁ is the tokenizer's own
    assert sorted(lines) == sorted(doc.splitlines())
