"""Issue 11 (6): damaged run files — manifests of the wrong shape, out-of-vocabulary validation shards, corrupt
data.json, a metrics line cut short, temporaries of killed writes — end in a fallback or one line, never a traceback."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from lmforge.config import Config, ModelConfig, TrainConfig
from lmforge.data.shards import read_shard, write_shard
from lmforge.errors import LmforgeError
from lmforge.train import checkpoint as ckptmod
from lmforge.train import tasks
from lmforge.train.loop import train

QUIET = lambda *_: None  # noqa: E731


def tiny_config(**train_kw) -> Config:
    kw = dict(
        batch_size=4,
        warmup_steps=1,
        eval_interval=1000,
        eval_batches=1,
        sample_tokens=0,
        tokenizer_vocab_size=320,
        log_interval=1,
        device="cpu",
        precision="fp32",
        checkpoint_interval=2,
        max_steps=20,
    )
    kw.update(train_kw)
    return Config(model=ModelConfig(n_layer=1, n_head=2, d_model=32, block_size=32), train=TrainConfig(**kw))


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, corpus_dir) -> Path:
    """A run stopped at step 4, with checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("faults")
    run = root / "run"
    train(tiny_config(), run, data=corpus_dir, cache_root=root / "cache", log=QUIET, stop_after_steps=4)
    return run


@pytest.fixture
def run(stopped_run, tmp_path) -> Path:
    """A private copy of the stopped run (its data.json still points at the shared shards)."""
    copy = tmp_path / "run"
    shutil.copytree(stopped_run, copy)
    return copy


BAD_MANIFESTS = [
    [],
    "a string",
    {"files": ["model.safetensors", "trainer_state.pt"]},
    {"files": {"model.safetensors": {"sha256": "0" * 64}, "trainer_state.pt": {"sha256": "0" * 64}}},
    {"files": {"model.safetensors": 5, "trainer_state.pt": 5}},
    {"files": {}},
    {"step": 4},
]


@pytest.mark.parametrize("manifest", BAD_MANIFESTS, ids=lambda m: json.dumps(m)[:40])
def test_manifest_of_the_wrong_shape_is_damage(run, manifest):
    ckpt = run / "checkpoints" / "step_0000004"
    assert ckptmod.verify(ckpt) is None
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    assert ckptmod.verify(ckpt) is not None


def test_manifest_must_list_every_needed_file(run):
    ckpt = run / "checkpoints" / "step_0000004"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    del manifest["files"]["trainer_state.pt"]  # what it lists is intact, but it does not check everything
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    assert "trainer_state.pt" in ckptmod.verify(ckpt)


@pytest.mark.parametrize("manifest", [[], {"files": {}}, {"files": ["model.safetensors"]}], ids=str)
def test_resume_falls_back_past_a_manifest_of_the_wrong_shape(run, manifest, capsys):
    (run / "checkpoints" / "step_0000004" / "manifest.json").write_text(json.dumps(manifest))
    res = train(None, run, resume=True, log=QUIET, stop_after_steps=5)
    assert "checkpoint step_0000004 is damaged" in capsys.readouterr().err
    assert res.step == 5  # from step 2, one checkpoint back
    # a damaged best is replaced, not trusted
    best = run / "checkpoints" / "best"
    shutil.copytree(run / "checkpoints" / "step_0000005", best)
    (best / "manifest.json").write_text("[]")
    ckptmod._update_best(run / "checkpoints", run / "checkpoints" / "step_0000005", 9.0)
    assert ckptmod.verify(best) is None


def test_validation_shard_outside_the_vocabulary_is_refused_at_start(run, tmp_path, capsys):
    info = json.loads((run / "data.json").read_text())
    shards = tmp_path / "shards"
    shutil.copytree(info["shards"], shards)
    (val,) = sorted(shards.glob("val_*.bin"))
    tokens = np.array(read_shard(val), dtype=np.int64)
    tokens[len(tokens) // 2] = 40_000  # a valid uint16, far beyond the 320-token vocabulary
    write_shard(val, tokens, 320)
    (run / "data.json").write_text(json.dumps({**info, "shards": str(shards)}))
    code, _, err = run_cli(capsys, "train", "--resume", run)
    assert code == 1 and "Traceback" not in err
    assert "val shard token id 40000" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("text", ["{oops", "{}", "[]", '{"shards": 5}', ""], ids=repr)
def test_corrupt_data_json_is_one_line(run, text, capsys):
    (run / "data.json").write_text(text)
    code, _, err = run_cli(capsys, "train", "--resume", run)
    assert code == 1 and "Traceback" not in err
    assert err.startswith("error: cannot resume") and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("text", ["{oops", "{}", "[]", '{"demo": 3}', '{"data": null}'], ids=repr)
def test_corrupt_seq2seq_data_json_is_one_error(tmp_path, text):
    (tmp_path / "data.json").write_text(text)
    with pytest.raises(LmforgeError, match="cannot resume"):
        tasks._data_from_info(tmp_path)


def test_partial_metrics_line_is_dropped_with_a_warning(run, capsys):
    metrics = run / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 5, "tokens": 6\n[1, 2]\n{"step": 5, "lo')  # a cut line, a stray non-record, a cut end
    res = train(None, run, resume=True, log=QUIET, stop_after_steps=6)
    assert res.step == 6
    assert "dropped 3 unreadable line(s)" in capsys.readouterr().err
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert all(isinstance(r, dict) for r in records)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]


def _plant_temporaries(run: Path) -> list[Path]:
    ckpts = run / "checkpoints"
    tmp_dir = ckpts / ".tmp-step_0000006-99999"
    tmp_dir.mkdir()
    (tmp_dir / "model.safetensors").write_bytes(b"\0" * 1000)
    files = [run / ".model.safetensors.k3j4h5.tmp", ckpts / ".model.safetensors.zz1.tmp", run / ".metrics.jsonl.a.tmp"]
    for f in files:
        f.write_bytes(b"\0" * 100)
    (run / "notes.tmp").write_text("a user's file, not ours")
    return [tmp_dir, *files]


def test_temporaries_of_killed_writes_are_removed_on_resume(run):
    planted = _plant_temporaries(run)
    train(None, run, resume=True, log=QUIET, stop_after_steps=5)
    assert not any(p.exists() for p in planted)
    assert (run / "notes.tmp").exists()


def test_temporaries_of_killed_writes_are_removed_on_save(run):
    planted = _plant_temporaries(run)
    # a killed best update: best moved aside, the new copy not yet in place
    best, old = run / "checkpoints" / "best", run / "checkpoints" / ".old-best-4242"
    shutil.copytree(run / "checkpoints" / "step_0000002", old)
    from lmforge.models import build_model
    from lmforge.runs import load_config

    model = build_model(load_config(run).model)
    state = ckptmod.load_latest(run, model)
    state["step"] = 6
    ckptmod.save_checkpoint(run, model, state, keep=5)
    assert not any(p.exists() for p in planted) and not old.exists()
    assert ckptmod.verify(best) is None  # the previous best came back
    assert [d.name for d in ckptmod.step_dirs(run / "checkpoints")][-1] == "step_0000006"


def test_other_json_run_files_of_the_wrong_shape_are_one_line(tmp_path):
    from lmforge.config import load_file
    from lmforge.evaluation.plot import read_metrics
    from lmforge.interop.hf import read_hf_config

    (tmp_path / "config.json").write_text("[]")
    with pytest.raises(LmforgeError, match="not a JSON object"):
        read_hf_config(tmp_path)
    with pytest.raises(LmforgeError, match="not a table"):
        load_file(tmp_path / "config.json")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n[3]\n7\n{"step": 2, "lo')
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}]
