import json
import math

import numpy as np
import torch

from lmforge.config import Config, ModelConfig, TrainConfig
from lmforge.data.shards import read_shard
from lmforge.runs import load
from lmforge.train.loop import train
from lmforge.train.optim import build_optimizers, lr_at


def unigram_entropy(tokens: np.ndarray) -> float:
    counts = np.bincount(tokens)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def small_config(**train_kw) -> Config:
    model = ModelConfig(n_layer=2, n_head=2, d_model=64, block_size=64)
    kw = dict(
        batch_size=8,
        lr=3e-3,
        warmup_steps=5,
        eval_interval=1000,
        eval_batches=4,
        sample_tokens=0,
        tokenizer_vocab_size=320,
        log_interval=10,
        device="cpu",
        precision="fp32",
    )
    kw.update(train_kw)
    return Config(model=model, train=TrainConfig(**kw))


def test_learns_structured_text(tmp_path, corpus_dir):
    lines = []
    result = train(
        small_config(max_steps=150),
        tmp_path / "run",
        data=corpus_dir,
        cache_root=tmp_path / "cache",
        log=lines.append,
    )
    shard_dir = next((tmp_path / "cache").glob("data-*"))
    entropy = unigram_entropy(np.asarray(read_shard(shard_dir / "train_0000.bin"), dtype=np.int64))
    # the grammar is highly predictable: loss must fall far below what token frequencies alone give
    assert result.final["val_loss"] < 0.5 * entropy, (result.final, entropy)
    assert result.final["val_bpb"] < 1.0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["loss"] > records[-2]["loss"]
    # next-token accuracy (issue 17): far above chance (1 / 320) on this grammar, and on the eval line
    assert 0.3 < result.final["val_acc"] <= result.final["val_top5"] <= 1, result.final
    (eval_line,) = [line for line in lines if line.startswith("eval step 150")]
    assert f"top-1 {100 * result.final['val_acc']:.1f}%" in eval_line and "top-5" in eval_line


def test_resume_continues_exactly(tmp_path, corpus_dir):
    quiet = lambda *_: None  # noqa: E731
    cfg = lambda: small_config(max_steps=20, eval_interval=10, log_interval=1)  # noqa: E731
    train(cfg(), tmp_path / "full", data=corpus_dir, cache_root=tmp_path / "cache", log=quiet)
    r1 = train(cfg(), tmp_path / "part", data=corpus_dir, cache_root=tmp_path / "cache", stop_after_steps=10, log=quiet)
    assert r1.interrupted and r1.step == 10
    r2 = train(None, tmp_path / "part", resume=True, log=quiet)
    assert r2.step == 20 and not r2.interrupted

    def losses(run):
        return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    assert len(losses(tmp_path / "full")) == 20
    assert losses(tmp_path / "part") == losses(tmp_path / "full")
    m1, _ = load(tmp_path / "full")
    m2, _ = load(tmp_path / "part")
    for (k, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k


def test_schedule_warmup_and_cosine():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert math.isclose(lr_at(cfg, 0, 0.0), 0.1)
    assert math.isclose(lr_at(cfg, 9, 0.0), 1.0)
    assert math.isclose(lr_at(cfg, 100, 0.5), 0.55)
    assert math.isclose(lr_at(cfg, 100, 1.0), 0.1)


def test_schedule_warmup_stable_decay():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.25)
    assert math.isclose(lr_at(cfg, 4, 0.01), 0.5)  # warming up
    assert lr_at(cfg, 100, 0.3) == lr_at(cfg, 500, 0.75) == 1.0  # stable until the last quarter
    assert math.isclose(lr_at(cfg, 900, 0.875), 0.5)  # linear decay ...
    assert math.isclose(lr_at(cfg, 1000, 1.0), 0.0, abs_tol=1e-12)  # ... to lr * min_lr_ratio
    assert math.isclose(lr_at(TrainConfig(lr=1.0, schedule="wsd", min_lr_ratio=0.1), 1000, 1.0), 0.1)


def test_weight_decay_only_on_matrices():
    from lmforge.models import build_model

    model = build_model(ModelConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, d_model=16, tie_embeddings=False))
    (opt,) = build_optimizers(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(model.tok_emb.weight) not in decayed and id(model.pos_emb.weight) not in decayed
    assert id(model.blocks[0].attn.qkv.weight) in decayed and id(model.lm_head.weight) in decayed
    assert not any(p.dim() == 1 for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"])
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def _nan_loss_at(monkeypatch, bad_calls: set[int]):
    """Make the LM task's loss NaN on the given (0-based) training calls of lm_loss; evaluation is untouched."""
    import lmforge.train.tasks as tasks_mod

    real, calls = tasks_mod.lm_loss, [0]

    def loss(model, x, y, *args, **kw):
        out = real(model, x, y, *args, **kw)
        if torch.is_grad_enabled():
            calls[0] += 1
            if calls[0] - 1 in bad_calls:
                return out * float("nan")
        return out

    monkeypatch.setattr(tasks_mod, "lm_loss", loss)


def test_nonfinite_loss_skips_the_step_and_logs_it(tmp_path, corpus_dir, monkeypatch):
    _nan_loss_at(monkeypatch, {3, 4})  # steps 4 and 5: two in a row, below the limit
    lines = []
    result = train(
        small_config(max_steps=12, log_interval=1),
        tmp_path / "run",
        data=corpus_dir,
        cache_root=tmp_path / "cache",
        log=lines.append,
    )
    assert result.step == 12 and not result.interrupted and math.isfinite(result.final["val_loss"])
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["step"] for r in records if r.get("skipped")]
    assert skipped == [4, 5]
    assert sum("optimizer step skipped (2 in a row" in line for line in lines) == 1
    steps = [r for r in records if "loss" in r and not r.get("skipped") and "val_loss" not in r]
    assert all(r["grad_norm"] > 0 and math.isfinite(r["grad_norm"]) for r in steps)  # logged with each step
    assert all(math.isfinite(v.float().abs().sum()) for v in load(tmp_path / "run")[0].state_dict().values())


def test_nonfinite_skipped_steps_leave_the_weights_alone(tmp_path, corpus_dir, monkeypatch):
    from lmforge.train import loop

    seen = []
    real_step = loop._optimizer_step

    def spy(s, loss_sum):
        before = [p.detach().clone() for p in s.model.parameters()]
        out = real_step(s, loss_sum)
        seen.append((out[1], all(torch.equal(a, p) for a, p in zip(before, s.model.parameters()))))
        return out

    monkeypatch.setattr(loop, "_optimizer_step", spy)
    _nan_loss_at(monkeypatch, {2})
    train(small_config(max_steps=4), tmp_path / "run", data=corpus_dir, cache_root=tmp_path / "c", log=lambda *_: None)
    assert seen == [(False, False), (False, False), (True, True), (False, False)]


def test_run_stops_after_nonfinite_losses_in_a_row(tmp_path, corpus_dir, monkeypatch):
    import pytest

    from lmforge.errors import LmforgeError
    from lmforge.train.loop import NONFINITE_LIMIT

    _nan_loss_at(monkeypatch, set(range(5, 100)))
    with pytest.raises(LmforgeError, match=f"not finite for {NONFINITE_LIMIT} steps in a row"):
        train(small_config(max_steps=50), tmp_path / "run", data=corpus_dir, cache_root=tmp_path / "c", log=print)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("skipped")] == [6, 7, 8][:NONFINITE_LIMIT]
