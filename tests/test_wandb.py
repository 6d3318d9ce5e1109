"""Issue 14: optional Weights & Biases logging (`--wandb PROJECT`) beside metrics.jsonl: the same records.

One test runs the real wandb package in offline mode and reads its run file back; the others use a stand-in
module to check what is logged, resumed and refused."""

import importlib.machinery
import json
import struct
import sys
import time
import types

import pytest
from conftest import TINY_ARGS, run_cli

from lmforge.config import Config, ModelConfig, TrainConfig
from lmforge.errors import LmforgeError
from lmforge.runs import WANDB_RUN
from lmforge.train.loop import train

QUIET = lambda *_: None  # noqa: E731


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def small_config(**train) -> Config:
    tc = TrainConfig(
        batch_size=4,
        max_steps=6,
        eval_interval=3,
        eval_batches=1,
        sample_tokens=0,
        tokenizer_vocab_size=320,
        log_interval=1,
        warmup_steps=2,
        device="cpu",
        precision="fp32",
        **train,
    )
    return Config(model=ModelConfig(n_layer=1, n_head=2, d_model=32, block_size=32), train=tc)


def read_wandb_file(path) -> list:
    """The records of a W&B run file (`run-ID.wandb`): a 7-byte header, then LevelDB-log blocks of 32 KiB whose
    chunks (crc32c, length, type: 1 full, 2 first, 3 middle, 4 last) carry serialized `Record` protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw, block, pos, pending, records = path.read_bytes(), 32768, 7, b"", []
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        pending += raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            records.append(rec)
            pending = b""
    return records


def test_offline_run_holds_the_metrics(tmp_path, monkeypatch, capsys, corpus_dir):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wb").mkdir()
    run = tmp_path / "run"
    args = ["train", corpus_dir, "--out", run, "--max-steps", "6", *TINY_ARGS, "--log_interval", "1"]
    code, _, err = run_cli(capsys, *args, "--eval_interval", "3", "--wandb", "lmforge-test")
    assert code == 0, err
    import wandb

    wandb.teardown()  # the W&B service process writes the run file: let it finish (it may close the file late)
    (run_file,) = (tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb")
    records = read_wandb_file(run_file)
    for _ in range(300):  # a loaded machine: wait (at most a minute) for the run's last record, "exit"
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        time.sleep(0.2)
        records = read_wandb_file(run_file)
    history = [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    written = metrics(run)
    steps = [r for r in written if "loss" in r]
    assert len(steps) == 6 and len(history) == len(written)  # every record, steps and evaluations
    for mine, theirs in zip(written, history):
        assert {k: theirs[k] for k in mine} == mine  # the same values, exactly
    (run_record,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in run_record.config.update}
    assert config["model"]["d_model"] == 64 and config["train"]["wandb"] == "lmforge-test"
    assert run_record.display_name == "run" and run_record.project == "lmforge-test"
    assert json.loads((run / WANDB_RUN).read_text())["id"] == run_record.run_id


class FakeWandb:
    """A stand-in for the wandb module: records what lmforge asks of it."""

    def __init__(self, fail=None):
        self.inits, self.logged, self.finished, self.fail = [], [], 0, fail
        self.module = types.ModuleType("wandb")
        self.module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        self.module.init = self.init

    def init(self, **kwargs):
        if self.fail:
            raise self.fail
        self.inits.append(kwargs)
        fake = self

        class Run:
            id = kwargs.get("id") or f"run{len(fake.inits)}"

            def define_metric(self, name, step_metric=None):
                assert (name, step_metric) == ("*", "step")

            def log(self, record):
                fake.logged.append(record)

            def finish(self):
                fake.finished += 1

        return Run()


def test_logs_every_record_and_resumes_the_same_run(tmp_path, monkeypatch, corpus_dir):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake.module)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    run = tmp_path / "run"
    cache = tmp_path / "cache"
    train(small_config(wandb="proj"), run, data=corpus_dir, cache_root=cache, log=QUIET, stop_after_steps=4)
    (first,) = fake.inits
    assert (first["project"], first["name"], first["id"], first["dir"]) == ("proj", "run", None, str(run))
    assert first["config"]["train"]["max_steps"] == 6 and first["config"]["model"]["n_layer"] == 1
    assert fake.finished == 1 and json.loads((run / WANDB_RUN).read_text()) == {"project": "proj", "id": "run1"}
    train(None, run, resume=True, log=QUIET)
    assert fake.inits[1]["id"] == "run1" and fake.inits[1]["resume"] == "allow" and fake.finished == 2
    # what W&B got is metrics.jsonl: before the resume up to step 4, then from the checkpoint on
    written = metrics(run)
    assert [r["step"] for r in written if "loss" in r] == [1, 2, 3, 4, 5, 6]
    numbers = [{k: v for k, v in r.items() if isinstance(v, (int, float))} for r in written]
    assert all(rec in fake.logged for rec in numbers)
    assert [r["loss"] for r in fake.logged if "loss" in r] == [r["loss"] for r in written if "loss" in r]


def test_wandb_that_cannot_start_is_one_line(tmp_path, monkeypatch, capsys, corpus_dir):
    fake = FakeWandb(fail=RuntimeError("api_key not configured (no-tty). call wandb.login(key=[your_api_key])"))
    monkeypatch.setitem(sys.modules, "wandb", fake.module)
    args = ["train", corpus_dir, "--out", tmp_path / "r", "--max-steps", "2", *TINY_ARGS, "--wandb", "proj"]
    code, _, err = run_cli(capsys, *args)
    assert code == 1
    assert err.strip().splitlines()[-1] == (
        "error: Weights & Biases could not start (RuntimeError: api_key not configured (no-tty). "
        "call wandb.login(key=[your_api_key]))"
    )


def test_missing_wandb_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(LmforgeError, match=r"pip install 'lmforge\[wandb\]'"):
        train(small_config(wandb="proj"), tmp_path / "r", data=tmp_path / "no-such-data", log=QUIET)
    assert not (tmp_path / "r").exists()  # refused before the data was even looked at
