"""Issue 14: Hugging Face datasets as DATA (`hf:FOLDER`, `hf:NAME[:CONFIG][:SPLIT]`), offline: datasets built
and saved in the test, the Hub replaced by a local stream; network errors retried, then one line."""

import json
import sys

import datasets
import numpy as np
import pytest
from conftest import TINY_ARGS, run_cli, structured_text

from lmforge.config import TrainConfig
from lmforge.data.corpus import Corpus
from lmforge.data.hf_dataset import HFSource, is_network_error, parse_spec, retrying
from lmforge.data.prepare import ensure_data, prepare
from lmforge.data.shards import read_shard, shard_paths
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import LmforgeError

QUIET = lambda *_: None  # noqa: E731


def sample_texts() -> list[str]:
    """Documents of every kind prepare treats differently: short ones, long ones it cuts into pieces (over 512
    characters), unicode, special-token look-alikes, whitespace-only and empty (left out)."""
    texts = [structured_text(3 + i % 40, seed=i) for i in range(120)]
    texts[5] = "héllo wörld ✓ — 日本語\n" * 60  # long, multi-byte
    texts[9] = "a <|endoftext|> inside the text stays text\n"
    texts[17] = ""
    texts[23] = "x" * 3000  # long, no line break to cut at
    return texts


def save(tmp_path, texts, name="ds", field="body", **extra):
    folder = tmp_path / name
    datasets.Dataset.from_dict({field: texts, "id": list(range(len(texts))), **extra}).save_to_disk(str(folder))
    return folder


def write_jsonl(path, texts, field="body"):
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    return path


def shard_bytes(directory) -> dict:
    return {p.name: p.read_bytes() for split in ("train", "val") for p in shard_paths(directory, split)}


def test_folder_equals_jsonl_token_for_token(tmp_path):
    texts = sample_texts()
    folder = save(tmp_path, texts)
    jsonl = write_jsonl(tmp_path / "same.jsonl", texts)
    hf, js = Corpus(f"hf:{folder}", "body"), Corpus(jsonl, "body")
    assert list(hf.texts()) == list(js.texts()) == [t for t in texts if t]
    tok = Tokenizer.train(hf.texts(), 400)
    assert tok.hf.to_str() == Tokenizer.train(js.texts(), 400).hf.to_str()  # the same tokenizer from either
    a = prepare(f"hf:{folder}", tok, tmp_path / "a", progress=False, text_field="body")
    b = prepare(jsonl, tok, tmp_path / "b", progress=False, text_field="body")
    assert (a.documents, a.train_tokens, a.val_tokens) == (b.documents, b.train_tokens, b.val_tokens)
    assert a.val_tokens > 0 and a.documents == len(texts) - 1
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")  # every token, both splits
    ids = np.concatenate([np.asarray(read_shard(p)) for s in ("train", "val") for p in shard_paths(tmp_path / "a", s)])
    assert (ids == tok.eos_id).sum() == a.documents  # one end-of-text after each document: the texts are all there


def test_training_data_from_a_folder_equals_jsonl_and_keys_the_cache(tmp_path):
    """`lmforge train hf:FOLDER` (ensure_data): the same tokenizer and shards as the .jsonl, in caches of their
    own; another text field or other content is never served from a stale cache."""
    texts = sample_texts()
    folder = save(tmp_path, texts, title=[f"title {i}" for i in range(len(texts))])
    jsonl = write_jsonl(tmp_path / "same.jsonl", texts)
    tc = TrainConfig(tokenizer_vocab_size=400, text_field="body")
    cache = tmp_path / "cache"
    d1, t1 = ensure_data(f"hf:{folder}", tc, cache, QUIET)
    d2, t2 = ensure_data(str(jsonl), tc, cache, QUIET)
    assert d1 != d2 and t1.hf.to_str() == t2.hf.to_str() and shard_bytes(d1) == shard_bytes(d2)
    logs = []
    assert ensure_data(f"hf:{folder}", tc, cache, logs.append)[0] == d1 and "reusing" in logs[0]
    d3, t3 = ensure_data(f"hf:{folder}", TrainConfig(tokenizer_vocab_size=400, text_field="title"), cache, QUIET)
    titles = t3.decode(np.asarray(read_shard(d3 / "train_0000.bin")).tolist())
    assert d3 != d1 and "title 7" in titles and "sees" not in titles  # the other column, in a cache of its own
    # the folder replaced by one with other texts: another key, fresh shards
    other = [t.upper() for t in texts]
    datasets.Dataset.from_dict({"body": other, "id": list(range(len(other)))}).save_to_disk(str(tmp_path / "new"))
    folder.rename(tmp_path / "old")
    (tmp_path / "new").rename(folder)
    d4, t4 = ensure_data(f"hf:{folder}", tc, cache, QUIET)
    assert d4 not in (d1, d2, d3)
    assert "SEES" in t4.decode(np.asarray(read_shard(d4 / "train_0000.bin")).tolist())


def test_a_folder_of_splits(tmp_path):
    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"text": ["train one", "train two"]}),
        validation=datasets.Dataset.from_dict({"text": ["val one"]}),
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    assert list(Corpus(f"hf:{tmp_path / 'dd'}").texts()) == ["train one", "train two"]  # train by default
    assert list(Corpus(f"hf:{tmp_path / 'dd'}:validation").texts()) == ["val one"]
    with pytest.raises(LmforgeError, match=r"no split 'test' .*\(splits: train, validation\)"):
        Corpus(f"hf:{tmp_path / 'dd'}:test")
    datasets.DatasetDict(only=dd["validation"]).save_to_disk(str(tmp_path / "one"))
    assert list(Corpus(f"hf:{tmp_path / 'one'}").texts()) == ["val one"]  # a folder's only split


def test_user_mistakes_are_one_line(tmp_path, capsys, small_tokenizer):
    folder = save(tmp_path, ["some text", "more text"], field="content", n=[1, 2])
    tok = tmp_path / "tok.json"
    small_tokenizer.save(tok)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "a.txt").write_text("x")
    (tmp_path / "f.jsonl").write_text('{"text": "x"}\n')
    capsys.readouterr()  # save_to_disk's progress bar
    cases = [
        (f"hf:{folder}", [], "no column 'text' (columns: content, id, n); choose one with --text-field"),
        (f"hf:{folder}", ["--text-field", "n"], "column 'n' holds Value('int64'), not text"),
        (f"hf:{folder}:train", [], "holds one dataset without splits; leave out ':train'"),
        (f"hf:{tmp_path / 'plain'}", [], "is not a folder written by datasets' save_to_disk"),
        (f"hf:{tmp_path / 'f.jsonl'}", [], "is a file; hf: takes a dataset folder or a Hub name"),
        (f"hf:{tmp_path / 'missing'}", [], "no such folder"),
        ("hf:", [], "hf: needs a dataset"),
        ("hf:a:b:c:d", [], "too many ':' parts"),
        (tmp_path / "f.jsonl", ["--text-field", "body"], "no line has a 'body' field (fields: text)"),
    ]
    for data, extra, message in cases:
        code, _, err = run_cli(capsys, "prepare", data, "--tokenizer", tok, "--out", tmp_path / "o", *extra)
        assert code == 1 and message in err and err.count("\n") == 1, (data, err)
    code, _, err = run_cli(capsys, "tokenizer", "train", f"hf:{folder}", "--out", tmp_path / "t.json")
    assert code == 1 and "no column 'text'" in err
    code, out, err = run_cli(capsys, "tokenizer", "train", f"hf:{folder}", "--text-field", "content", "--out", tok)
    assert code == 0, err


def test_missing_datasets_package_is_one_line(tmp_path, monkeypatch):
    folder = save(tmp_path, ["a text"], field="text")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(LmforgeError, match=r"pip install 'lmforge\[datasets\]'"):
        Corpus(f"hf:{folder}")


def test_spec_parsing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = parse_spec("hf:org/name:cfg:validation")
    assert (s.name, s.config, s.split, s.local) == ("org/name", "cfg", "validation", False)
    s = parse_spec("hf:wikitext::test")
    assert (s.name, s.config, s.split) == ("wikitext", None, "test")
    assert parse_spec("hf:wikitext").split is None
    (tmp_path / "org" / "name").mkdir(parents=True)  # an existing directory wins over the Hub name
    assert parse_spec("hf:org/name").local and parse_spec("hf:org/name:test").split == "test"
    monkeypatch.setenv("HOME", str(tmp_path))  # the shell leaves ~ after hf: alone: we expand it
    assert parse_spec("hf:~/org/name:test").name == str(tmp_path / "org" / "name")


# --- the Hub, streamed (replaced here by a local stream) ------------------------------------------------------


class FlakyHub:
    """`datasets.load_dataset` standing in for the Hub: a local dataset as an IterableDataset, whose stream
    raises a network error after `fail_at` rows the first times it is opened."""

    def __init__(self, texts, fail_at=(), error=ConnectionError("connection reset by peer"), columns_known=True):
        self.ds = datasets.Dataset.from_dict({"text": texts, "meta": list(range(len(texts)))})
        self.fail_at, self.error, self.calls = list(fail_at), error, []
        self.column_names = self.ds.column_names if columns_known else None  # what the Hub's metadata says

    def __call__(self, name, config=None, split=None, streaming=False):
        self.calls.append((name, config, split, streaming))
        hub, fail_at, error = self, self.fail_at.pop(0) if self.fail_at else None, self.error

        class Stream:
            column_names = hub.column_names

            def __init__(self, start=0, columns=None):
                self.start, self.columns = start, columns

            def select_columns(self, columns):
                return Stream(self.start, columns)

            def skip(self, n):
                return Stream(self.start + n, self.columns)

            def __iter__(self):
                for i, row in enumerate(hub.ds.to_iterable_dataset().skip(self.start)):
                    if fail_at is not None and self.start + i >= fail_at:
                        raise error
                    yield {k: row[k] for k in self.columns} if self.columns else row

        return Stream()


def test_hub_stream_resumes_after_network_errors(monkeypatch):
    texts = [f"document {i}" for i in range(25)]
    hub = FlakyHub(texts, fail_at=[7, 7, 19])
    monkeypatch.setattr(datasets, "load_dataset", hub)
    waits = []
    source = HFSource("hf:someone/corpus:en:validation", sleep=waits.append)
    assert list(source.texts()) == texts  # every row once, in order: none skipped, none repeated
    assert hub.calls[0] == ("someone/corpus", "en", "validation", True)  # streamed
    assert len(hub.calls) == 4 and waits == [2.0, 4.0, 2.0]  # backoff doubles, and resets after progress
    # prepare reads it like any corpus: same tokens as the texts in a .jsonl
    assert list(Corpus("hf:someone/corpus").texts()) == texts and hub.calls[-1][2] == "train"


def test_hub_stream_gives_up_in_one_line(monkeypatch, capsys):
    hub = FlakyHub(["a", "b", "c"], fail_at=[1] * 10, error=TimeoutError("read timed out"))
    monkeypatch.setattr(datasets, "load_dataset", hub)
    waits = []
    with pytest.raises(LmforgeError) as e:
        list(HFSource("hf:someone/corpus", sleep=waits.append).texts())
    assert str(e.value) == (
        "hf:someone/corpus: network error at row 1, still failing after 5 retries: TimeoutError: read timed out"
    )
    assert waits == [2.0, 4.0, 8.0, 16.0, 32.0]
    assert capsys.readouterr().err.count("warning: hf:someone/corpus: TimeoutError: read timed out at row 1") == 5


def test_hub_unreachable_or_missing_is_one_line(monkeypatch):
    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/corpus' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    waits = []
    with pytest.raises(LmforgeError, match="cannot open the dataset: ConnectionError: Couldn't reach"):
        list(HFSource("hf:someone/corpus", sleep=waits.append).texts())
    assert waits == []  # datasets has retried already: no second round of waiting
    for columns_known in (True, False):  # from the Hub's metadata, or else from the first row
        monkeypatch.setattr(datasets, "load_dataset", FlakyHub(["a"], columns_known=columns_known))
        with pytest.raises(LmforgeError, match=r"no column 'body' \(columns: text, meta\); choose one"):
            list(HFSource("hf:someone/corpus", "body").texts())


def test_retrying_a_fake_iterator():
    """The retry rule alone, on an iterator that raises: resumes where it stopped; other errors pass through."""
    opened = []

    def rows(start):
        opened.append(start)
        for i in range(start, 10):
            if i == 4 and opened.count(4) < 2:
                raise ConnectionResetError("reset")
            yield i

    waits = []
    assert list(retrying(rows, "x", attempts=3, backoff=0.5, sleep=waits.append)) == list(range(10))
    assert opened == [0, 4, 4] and waits == [0.5, 1.0]

    def broken(start):
        yield 1
        raise ValueError("a bug, not the network")

    with pytest.raises(ValueError):
        list(retrying(broken, "x", sleep=waits.append))


class HTTPError(Exception):
    def __init__(self, status):
        super().__init__(f"status {status}")
        self.response = type("Response", (), {"status_code": status})()


@pytest.mark.parametrize(
    "error, retried",
    [
        (ConnectionError(), True),
        (TimeoutError(), True),
        (HTTPError(503), True),
        (HTTPError(429), True),
        (HTTPError(404), False),
        (HTTPError(401), False),
        (ValueError("bad split"), False),
        (FileNotFoundError("no such dataset"), False),
    ],
)
def test_which_errors_are_retried(error, retried):
    assert is_network_error(error) is retried
    wrapped = RuntimeError("while streaming")
    wrapped.__cause__ = error
    assert is_network_error(wrapped) is retried  # what datasets wraps counts by its cause


def test_progress_without_a_known_size(monkeypatch, small_tokenizer, tmp_path):
    """A Hub stream has no size: prepare still runs (the largest pieces, a bar without an end)."""
    monkeypatch.setattr(datasets, "load_dataset", FlakyHub([structured_text(50, seed=i) for i in range(30)]))
    assert Corpus("hf:someone/corpus").size_bytes() is None
    stats = prepare("hf:someone/corpus", small_tokenizer, tmp_path / "s", progress=True)
    assert stats.documents == 30 and stats.train_tokens > 0 and stats.val_tokens == 0  # 30 pieces: none is val


def test_train_on_a_dataset_folder(tmp_path, capsys):
    folder = save(tmp_path, [structured_text(40, seed=i) for i in range(40)])
    run = tmp_path / "run"
    args = ["train", f"hf:{folder}", "--text-field", "body", "--out", run, "--max-steps", "2", *TINY_ARGS]
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    assert f"tokenizer on hf:{folder} (a Hugging Face dataset folder)" in out
    assert json.loads((run / "config.json").read_text())["train"]["text_field"] == "body"
    assert json.loads((run / "data.json").read_text())["data"] == f"hf:{folder}"
