"""Issue 14: sharded checkpoints under FSDP (torch.distributed.checkpoint), resumed on another number of
processes with the same data and tokens per step; a crash in the middle of a sharded save falls back; saves in
the background (async_checkpoint) give the same checkpoints."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli, torchrun
from torch.distributed.checkpoint import FileSystemReader

from lmforge.config import Config, ModelConfig, TrainConfig
from lmforge.models import build_model
from lmforge.runs import load_config, load_weights
from lmforge.train import checkpoint as ckptmod
from lmforge.train.loop import train
from lmforge.train.optim import build_optimizers
from lmforge.train.tasks import _windows_per_step

QUIET = lambda *_: None  # noqa: E731
ROOT = Path(__file__).resolve().parents[1]
STEPS = 8


def dcp_config() -> Config:
    """512 tokens per step = 16 windows of 32: 4 micro-steps of 4 in one process, 2 of 4 on each of two."""
    train_cfg = TrainConfig(
        batch_size=4,
        tokens_per_step=512,
        lr=3e-3,
        warmup_steps=2,
        max_steps=STEPS,
        eval_interval=1000,
        eval_batches=1,
        checkpoint_interval=2,
        sample_tokens=0,
        tokenizer_vocab_size=320,
        log_interval=1,
        device="cpu",
        precision="fp32",
        parallel="fsdp",
    )
    return Config(model=ModelConfig(n_layer=2, n_head=2, d_model=32, block_size=32), train=train_cfg)


def async_config() -> Config:
    """dcp_config, its sharded checkpoints written in the background; the last 2 kept."""
    cfg = dcp_config()
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, async_checkpoint=True, keep_checkpoints=2))


def step_records(run: Path) -> list[dict]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if "loss" in r]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus_dir) -> tuple[Path, list[dict]]:
    """The uninterrupted run, in one process; and the cache its data was prepared in."""
    root = tmp_path_factory.mktemp("dcp")
    train(dcp_config(), root / "ref", data=corpus_dir, cache_root=root / "cache", log=QUIET)
    return root, step_records(root / "ref")


def _assert_tracks(run: Path, ref: list[dict]) -> None:
    got = step_records(run)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [r["tokens"] for r in got] == [512 * s for s in range(1, STEPS + 1)]  # tokens per step unchanged
    for a, b in zip(got, ref):
        assert abs(a["loss"] - b["loss"]) <= 0.01 * b["loss"], (a, b)
    assert abs(ref[0]["loss"] - ref[-1]["loss"]) > 0.1  # the curve moved, so tracking it means something


def test_two_processes_shard_crash_then_resume_on_one(reference, corpus_dir, tmp_path, capsys):
    root, ref = reference
    run = tmp_path / "two"
    torchrun([str(ROOT / "tests" / "dist_ckpt_worker.py"), str(run), str(corpus_dir), str(root / "cache")])
    ckpts = run / "checkpoints"
    # step 2: a DCP checkpoint, one shard file per rank, written without gathering the full state (the worker checks)
    (done,) = ckptmod.step_dirs(ckpts)
    assert done.name == "step_0000002" and ckptmod.verify(done) is None
    assert sorted(p.name for p in done.iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
        "manifest.json",
        "trainer_state.pt",
    ]
    assert json.loads((done / "manifest.json").read_text())["format"] == "dcp"
    stored = FileSystemReader(done).read_metadata().state_dict_metadata
    assert "model.tok_emb.weight" in stored and "model.lm_head.weight" not in stored  # a tied head is stored once
    assert not (run / "model.safetensors").exists()  # not at every sharded checkpoint
    # step 4 died after the shards were written: a temporary directory without a manifest is all that is left
    (dead,) = ckpts.glob(".tmp-step_0000004*")
    assert (dead / "__1_0.distcp").is_file() and not (dead / "manifest.json").exists()

    # an explicit consolidation gives the weights of step 2
    code, out, err = run_cli(capsys, "convert", "--consolidate", run)
    assert code == 0, err
    consolidated = build_model(load_config(run).model)
    load_weights(run / "model.safetensors", consolidated)
    resharded = build_model(load_config(run).model)
    opts = build_optimizers(resharded, load_config(run).train, torch.device("cpu"))
    ckptmod.load_sharded(done, resharded, opts)  # 2 shards -> one process, optimizer state too
    opt = opts[0]
    for (k, a), b in zip(consolidated.state_dict().items(), resharded.state_dict().values()):
        assert torch.equal(a, b), k
    assert opt.state and all(s["exp_avg"].shape == p.shape for p, s in opt.state.items())
    (run / "model.safetensors").unlink()

    # resume in one process: falls back to step 2, cleans up, and trains on as the uninterrupted run did
    res = train(None, run, resume=True, log=QUIET)
    assert res.step == STEPS and not list(ckpts.glob(".tmp-*"))
    _assert_tracks(run, ref)
    assert (run / "model.safetensors").is_file()  # the one-process checkpoints refresh it again
    assert not ckptmod.is_sharded(ckptmod.latest_checkpoint(run))


def test_one_process_then_two_sharded(reference, corpus_dir, tmp_path):
    root, ref = reference
    run = tmp_path / "one"
    train(dcp_config(), run, data=corpus_dir, cache_root=root / "cache", log=QUIET, stop_after_steps=4)
    out = torchrun(["-m", "lmforge", "train", "--resume", str(run)])
    assert "2 processes (fsdp)" in out.stdout and "512 tokens per step" in out.stdout
    _assert_tracks(run, ref)
    latest = ckptmod.latest_checkpoint(run)
    assert latest.name == "step_0000008" and ckptmod.is_sharded(latest)
    # consolidated at the end of training: the final checkpoint's weights, readable by one process
    final = build_model(load_config(run).model)
    load_weights(run / "model.safetensors", final)
    resharded = build_model(load_config(run).model)
    ckptmod.load_sharded(latest, resharded, build_optimizers(resharded, load_config(run).train, torch.device("cpu")))
    for a, b in zip(final.state_dict().values(), resharded.state_dict().values()):
        assert torch.equal(a, b)


def test_windows_per_step_do_not_depend_on_the_world_size():
    # a resumed run's config holds tokens_per_step = windows x seq_len: the same windows on 1, 2, 4, 8 ranks
    assert {_windows_per_step(512, 32, 4, w) for w in (1, 2, 4, 8, 16)} == {16}
    assert _windows_per_step(None, 32, 4, 2) == 8  # one micro-step of batch_size per rank
    assert _windows_per_step(600, 32, 4, 2) == 24  # an uneven request rounds up to whole micro-steps


def test_step_windows_are_the_same_split_any_way(tmp_path, corpus_dir, reference):
    """The windows of a step, all ranks and micro-steps together, are the same for every world size."""
    from lmforge.train.tasks import LMTask

    root, _ = reference
    cfg = dcp_config()
    seen = {}
    for world in (1, 2, 4):
        rows = []
        for rank in range(world):
            task = LMTask(cfg, tmp_path / f"r{world}", corpus_dir, False, root / "cache", QUIET)
            task.rank, task.world = rank, world  # (a real DistInfo would need a process group)
            accum = -(-task.windows_per_step // (cfg.train.batch_size * world))
            micro = task.step_batches(torch.Generator().manual_seed(7), torch.device("cpu"), accum)
            assert all(x.shape[0] <= cfg.train.batch_size for (x, _), _ in micro)
            rows += [x for (x, _), _ in micro]
        seen[world] = torch.cat(rows)
    assert seen[1].shape == (16, 32)
    assert torch.equal(seen[1], seen[2]) and torch.equal(seen[1], seen[4])


# --- saves in the background (async_checkpoint) -----------------------------------------------------


def _dcp_state(ckpt: Path, cfg: Config) -> dict:
    """{"model", "optimizers"}: a sharded checkpoint's whole state, read back in this one process."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = build_model(cfg.model)
    model_sd, optim_sd = get_state_dict(model, build_optimizers(model, cfg.train, torch.device("cpu")))
    sd = {"model": ckptmod.without_tied_aliases(model_sd, model), "optimizers": optim_sd}
    ckptmod._dcp_load(sd, ckpt, alone=True)
    return {**sd, "model": model_sd}  # the tied head under both names again


def _tensors(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _tensors(v, f"{prefix}.{k}")
    elif isinstance(tree, torch.Tensor):
        yield prefix, tree


def test_async_saves_crash_in_flight_then_resume(reference, corpus_dir, tmp_path):
    root, ref = reference
    run = tmp_path / "async"
    torchrun([str(ROOT / "tests" / "dist_async_worker.py"), str(run), str(corpus_dir), str(root / "cache")])
    ckpts, cfg = run / "checkpoints", load_config(run)
    assert cfg.train.async_checkpoint
    # steps 2 and 4 count; the save of step 6 was in flight at the crash: its shards, but no manifest
    assert [d.name for d in ckptmod.step_dirs(ckpts)] == ["step_0000002", "step_0000004"]
    assert all(ckptmod.verify(d) is None and ckptmod.is_sharded(d) for d in ckptmod.step_dirs(ckpts))
    (dead,) = ckpts.glob(".tmp-step_0000006*")
    assert (dead / "__0_0.distcp").is_file() and not (dead / "manifest.json").exists()
    assert ckptmod.latest_checkpoint(run).name == "step_0000004"

    # step 2 was written in the background after step 3 had changed the weights: it holds what a synchronous
    # save held at step 2, model and optimizer, bit for bit
    written = dict(_tensors(_dcp_state(ckpts / "step_0000002", cfg)))
    synchronous = dict(_tensors(_dcp_state(Path(f"{run}-reference"), cfg)))
    assert written.keys() == synchronous.keys() and any(".exp_avg_sq" in k for k in written)
    for k, t in written.items():
        assert torch.equal(t, synchronous[k]), k
    later = dict(_tensors(_dcp_state(ckpts / "step_0000004", cfg)))
    assert not torch.equal(later[".model.blocks.0.attn.qkv.weight"], written[".model.blocks.0.attn.qkv.weight"])

    # resumed on 2 processes, in the background again: from step 4, as the uninterrupted run
    out = torchrun(["-m", "lmforge", "train", "--resume", str(run)])
    assert "resuming" in out.stdout and "unavailable" not in out.stdout + out.stderr
    _assert_tracks(run, ref)
    assert [d.name for d in ckptmod.step_dirs(ckpts)] == ["step_0000006", "step_0000008"]  # keep_checkpoints 2
    assert not list(ckpts.glob(".tmp-*"))
    final_eval = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in r][-1]
    best = json.loads((ckpts / "best" / "manifest.json").read_text())
    assert best["step"] == STEPS and best["val_loss"] == final_eval["val_loss"]
    assert ckptmod.verify(ckpts / "best") is None
    # the last background save was complete before the end: consolidated from it
    consolidated = build_model(cfg.model)
    load_weights(run / "model.safetensors", consolidated)
    last = _dcp_state(ckpts / "step_0000008", cfg)["model"]
    for k, t in consolidated.state_dict().items():
        assert torch.equal(t, last[k]), k


def test_async_checkpoint_outside_fsdp_saves_synchronously(tmp_path, corpus_dir):
    lines = []
    cfg = dataclasses.replace(dcp_config(), train=dataclasses.replace(dcp_config().train, async_checkpoint=True))
    train(cfg, tmp_path / "r", data=corpus_dir, cache_root=tmp_path / "c", log=lines.append, stop_after_steps=2)
    said = [line for line in lines if line.startswith("async")]
    assert said == [
        "async checkpoints unavailable (a one-process run's checkpoints are one full file written by rank 0; "
        "only sharded (FSDP) saves run in the background); saving synchronously"
    ]
    assert [d.name for d in ckptmod.step_dirs(tmp_path / "r" / "checkpoints")] == ["step_0000002"]
    assert ckptmod.verify(ckptmod.latest_checkpoint(tmp_path / "r")) is None
