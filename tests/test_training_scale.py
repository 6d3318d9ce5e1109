"""Issue 4: optimisers, precision, checkpoints that survive crashes, signals, distributed equivalence, plots."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_ARGS, run_cli, torchrun

from lmforge.config import Config, ModelConfig, TrainConfig
from lmforge.models import build_model
from lmforge.train import checkpoint as ckptmod
from lmforge.train.loop import train
from lmforge.train.optim import Muon, newton_schulz

QUIET = lambda *_: None  # noqa: E731
ROOT = Path(__file__).resolve().parents[1]


def small_config(**train_kw) -> Config:
    kw = dict(
        batch_size=8,
        lr=3e-3,
        warmup_steps=3,
        eval_interval=1000,
        eval_batches=2,
        sample_tokens=0,
        tokenizer_vocab_size=320,
        log_interval=1,
        device="cpu",
        precision="fp32",
    )
    kw.update(train_kw)
    return Config(model=ModelConfig(n_layer=2, n_head=2, d_model=64, block_size=64), train=TrainConfig(**kw))


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


# --- Muon ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(64, 64), (32, 96), (96, 32)])
def test_newton_schulz_orthogonalises(shape):
    gen = torch.Generator().manual_seed(0)
    k = min(shape)
    u, _ = torch.linalg.qr(torch.randn(shape[0], k, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(shape[1], k, generator=gen))
    s_in = torch.logspace(-1, 1, k)  # condition number 100: far from orthogonal
    g = u @ torch.diag(s_in) @ v.T
    out = newton_schulz(g)
    s = torch.linalg.svdvals(out)
    assert s.min() > 0.5 and s.max() < 1.3  # every singular value pushed to ~1 (the quintic does not converge exactly)
    # and the singular vectors are kept: out is close to U V^T
    assert torch.linalg.norm(out - u @ v.T) / torch.linalg.norm(u @ v.T) < 0.35


def test_muon_step_is_orthogonal_and_reduces_loss():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(16, 32) * 0.1)
    x, target = torch.randn(256, 32), torch.randn(256, 16)
    opt = Muon([w], lr=0.02, momentum=0.0, nesterov=False)
    before = w.detach().clone()
    loss0 = ((x @ w.T - target) ** 2).mean()
    loss0.backward()
    opt.step()
    s = torch.linalg.svdvals((before - w.detach()) / 0.02)
    assert s.min() > 0.5 and s.max() < 1.3
    opt = Muon([w], lr=0.01)
    for _ in range(60):
        opt.zero_grad()
        loss = ((x @ w.T - target) ** 2).mean()
        loss.backward()
        opt.step()
    assert loss.item() < 0.8 * loss0.item()


def test_muon_batches_same_shaped_matrices_like_one_at_a_time():
    torch.manual_seed(0)
    ws = [torch.nn.Parameter(torch.randn(*shape)) for shape in [(8, 24), (8, 24), (24, 8), (8, 24)]]
    alone = [torch.nn.Parameter(w.detach().clone()) for w in ws]
    together = Muon(ws, lr=0.05, weight_decay=0.1)
    separate = [Muon([w], lr=0.05, weight_decay=0.1) for w in alone]
    for _ in range(3):
        grads = [torch.randn_like(w) for w in ws]
        for w, a, g in zip(ws, alone, grads):
            w.grad, a.grad = g.clone(), g.clone()
        together.step()
        for opt in separate:
            opt.step()
    for w, a in zip(ws, alone):
        torch.testing.assert_close(w.detach(), a.detach(), atol=1e-5, rtol=1e-5)


def test_value_residual_lambdas_go_to_adamw_not_muon():
    """Muon orthogonalises 2-D hidden matrices; the per-layer value-residual scalars are AdamW's (no decay)."""
    from lmforge.train.optim import build_optimizers, split_parameters

    cfg = small_config(optimizer="muon")
    cfg.model.value_residual = True
    model = build_model(cfg.model)
    lambdas = [b.attn.value_lambda for b in model.blocks[1:]]
    groups = split_parameters(model)
    assert all(any(p is lam for p in groups["other"]) for lam in lambdas)
    muon, adam = build_optimizers(model, cfg.train, torch.device("cpu"))
    assert not any(p is lam for g in muon.param_groups for p in g["params"] for lam in lambdas)
    (group,) = [g for g in adam.param_groups if any(p is lambdas[0] for p in g["params"])]
    assert group["weight_decay"] == 0.0
    model(torch.randint(0, 64, (2, 16))).square().mean().backward()
    before = [lam.item() for lam in lambdas]
    muon.step()
    adam.step()
    assert all(lam.item() != b for lam, b in zip(lambdas, before))


def test_training_with_muon_learns(tmp_path, corpus_dir):
    res = train(
        small_config(optimizer="muon", max_steps=60, eval_interval=1000),
        tmp_path / "r",
        data=corpus_dir,
        cache_root=tmp_path / "c",
        log=QUIET,
    )
    ls = losses(tmp_path / "r")
    assert sum(ls[-5:]) / 5 < 0.6 * sum(ls[:3]) / 3
    assert res.final["val_loss"] < 2.5


def test_default_preset_is_the_measured_modern_recipe_and_exports(tmp_path, corpus_dir, capsys):
    """`lmforge train` with no --preset: the Llama block with Muon and WSD (benchmarks/recipe_ablation.py),
    still expressible as a Hugging Face Llama (so convert --to-hf / --to-gguf keep working), and it learns."""
    from lmforge.config import preset
    from lmforge.interop.hf import export_problems

    cfg = preset("tiny")
    assert (cfg.train.optimizer, cfg.train.schedule) == ("muon", "wsd")
    assert (cfg.model.pos, cfg.model.norm, cfg.model.mlp, cfg.model.bias) == ("rope", "rmsnorm", "swiglu", False)
    assert export_problems(cfg.model) == []
    sizes = [a for a in TINY_ARGS if a not in ("--preset", "gpt2-tiny")]  # the default preset, scaled down
    run = tmp_path / "default"
    code, _, err = run_cli(capsys, "train", corpus_dir, "--out", run, "--max-steps", 40, *sizes, "--sample_tokens", 0)
    assert code == 0, err
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["optimizer"] == "muon" and saved["model"]["pos"] == "rope"
    ls = losses(run)
    assert sum(ls[-5:]) / 5 < 0.7 * sum(ls[:3]) / 3
    code, _, err = run_cli(capsys, "convert", "--to-hf", run, "--out", tmp_path / "hf")
    assert code == 0, err
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_muon_with_fsdp_is_refused_in_one_line(capsys, corpus_dir, tmp_path):
    code, out, err = run_cli(capsys, "train", corpus_dir, "--out", tmp_path / "r", "--parallel", "fsdp")
    assert code != 0 and "--optimizer muon does not work with --parallel fsdp" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


# --- precision, compile, activation checkpointing ----------------------------------------------


def test_precision_flags_on_cpu(tmp_path, corpus_dir, capsys, monkeypatch):
    res = train(
        small_config(precision="bf16", max_steps=3),
        tmp_path / "bf16",
        data=corpus_dir,
        cache_root=tmp_path / "c",
        log=QUIET,
    )
    assert res.step == 3 and res.final["val_loss"] < 10
    code, _, err = run_cli(
        capsys, "train", corpus_dir, "--out", tmp_path / "fp16", "--max-steps", 2, *TINY_ARGS, "--precision", "fp16"
    )
    assert code == 1 and "fp16 training needs a CUDA device" in err
    code, _, err = run_cli(capsys, "train", corpus_dir, "--out", tmp_path / "x", *TINY_ARGS, "--precision", "fp8")
    assert code == 1 and "unknown precision" in err
    from lmforge.train import precision as perf

    monkeypatch.setattr(perf, "cpu_has_native_bf16", lambda: False)
    assert perf.choose_precision("auto", torch.device("cpu")) == "fp32"
    monkeypatch.setattr(perf, "cpu_has_native_bf16", lambda: True)
    assert perf.choose_precision("auto", torch.device("cpu")) == "bf16"


def test_activation_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, d_model=32))
    x = torch.randint(0, 50, (2, 16))
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.activation_checkpointing = flag
        model(x).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_compile_trains(tmp_path, corpus_dir):
    res = train(
        small_config(compile=True, max_steps=3), tmp_path / "r", data=corpus_dir, cache_root=tmp_path / "c", log=QUIET
    )
    assert res.step == 3


def test_mfu_is_reported(tmp_path, corpus_dir):
    train(small_config(max_steps=3), tmp_path / "r", data=corpus_dir, cache_root=tmp_path / "c", log=QUIET)
    recs = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    mfu = [r["mfu"] for r in recs if "mfu" in r]
    assert mfu and all(0 < m < 1 for m in mfu)


# --- checkpoints ---------------------------------------------------------------------------------


def test_keeps_last_k_and_best(tmp_path, corpus_dir):
    run = tmp_path / "r"
    train(
        small_config(max_steps=12, eval_interval=2, keep_checkpoints=2),
        run,
        data=corpus_dir,
        cache_root=tmp_path / "c",
        log=QUIET,
    )
    steps = [d.name for d in ckptmod.step_dirs(run / "checkpoints")]
    assert steps == ["step_0000010", "step_0000012"]
    best = json.loads((run / "checkpoints" / "best" / "manifest.json").read_text())
    vals = [r["val_loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]
    assert best["val_loss"] == min(vals)
    assert ckptmod.verify(run / "checkpoints" / "best") is None


def test_crash_while_writing_a_checkpoint_keeps_the_previous(tmp_path, corpus_dir, monkeypatch):
    run = tmp_path / "r"
    train(
        small_config(max_steps=20, eval_interval=5),
        run,
        data=corpus_dir,
        cache_root=tmp_path / "c",
        log=QUIET,
        stop_after_steps=5,
    )
    weights_before = (run / "model.safetensors").read_bytes()

    def crash(*a, **k):
        raise OSError("disk died between the two files")

    monkeypatch.setattr(ckptmod, "save_trainer_state", crash)
    with pytest.raises(OSError):
        train(None, run, resume=True, log=QUIET, stop_after_steps=10)
    monkeypatch.undo()
    assert [d.name for d in ckptmod.step_dirs(run / "checkpoints")] == ["step_0000005"]
    assert not list((run / "checkpoints").glob(".tmp*")) or all(
        not (d / "manifest.json").exists() for d in (run / "checkpoints").glob(".tmp*")
    )
    assert (run / "model.safetensors").read_bytes() == weights_before
    res = train(None, run, resume=True, log=QUIET)
    assert res.step == 20


def test_corrupt_latest_checkpoint_falls_back(tmp_path, corpus_dir, capsys):
    run = tmp_path / "r"
    train(
        small_config(max_steps=30, eval_interval=5),
        run,
        data=corpus_dir,
        cache_root=tmp_path / "c",
        log=QUIET,
        stop_after_steps=10,
    )
    latest = run / "checkpoints" / "step_0000010" / "model.safetensors"
    latest.write_bytes(latest.read_bytes()[:-100])
    res = train(None, run, resume=True, log=QUIET, stop_after_steps=12)
    err = capsys.readouterr().err
    assert "checkpoint step_0000010 is damaged" in err
    assert res.step == 12  # resumed from step 5, ran to 12


def test_sigterm_saves_a_checkpoint_and_resume_continues(tmp_path, corpus_dir):
    run = tmp_path / "r"
    cmd = [
        sys.executable,
        "-m",
        "lmforge",
        "train",
        str(corpus_dir),
        "--out",
        str(run),
        "--max-steps",
        "100000",
        *TINY_ARGS,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + 120
    for line in proc.stdout:
        if line.startswith("step") and "| loss" in line and not line.startswith("step      1 "):
            break
        assert time.time() < deadline
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "stopping: saving a checkpoint" in err and "Traceback" not in err
    (ckpt,) = ckptmod.step_dirs(run / "checkpoints")
    assert ckptmod.verify(ckpt) is None
    stopped_at = int(ckpt.name.split("_")[1])
    assert stopped_at >= 5
    res = train(None, run, resume=True, log=QUIET, stop_after_steps=stopped_at + 3)
    assert res.step == stopped_at + 3


# --- distributed -------------------------------------------------------------------------------


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, corpus_dir, parallel):
    # prepare data once so both runs read the same shards
    base = [
        "--n_layer",
        "2",
        "--n_head",
        "2",
        "--d_model",
        "32",
        "--block_size",
        "32",
        "--tokenizer_vocab_size",
        "320",
        "--eval_interval",
        "1000",
        "--eval_batches",
        "1",
        "--sample_tokens",
        "0",
        "--log_interval",
        "1",
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--max-steps",
        "8",
        "--warmup_steps",
        "2",
        "--tokens_per_step",
        "512",
        # the default preset's Muon under DDP; FSDP shards matrices, which Muon does not take yet
        *(["--optimizer", "adamw"] if parallel == "fsdp" else []),
    ]
    one = tmp_path / "one"
    r = subprocess.run(
        [sys.executable, "-m", "lmforge", "train", str(corpus_dir), "--out", str(one), *base, "--batch_size", "8"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert r.returncode == 0, r.stderr
    two = tmp_path / "two"
    args = [str(corpus_dir), "--out", str(two), *base, "--batch_size", "4", "--parallel", parallel]
    out = torchrun(["-m", "lmforge", "train", *args])
    assert "2 processes" in out.stdout
    a, b = losses(one), losses(two)
    assert len(a) == len(b) == 8
    assert max(abs(x - y) for x, y in zip(a, b)) < 2e-3, (a, b)
    assert abs(a[0] - a[-1]) > 0.05  # the curve moved, so agreeing means something
    # accumulation: 512 tokens per step = 2 micro-steps of 8 x 32 in one process, 2 of 2 x 4 x 32 across two
    assert json.loads((two / "config.json").read_text())["train"]["parallel"] == parallel


# --- plots ---------------------------------------------------------------------------------------


def test_plot_files(tiny_run, tmp_path, capsys):
    code, out, err = run_cli(capsys, "plot", tiny_run, tiny_run, "--out", tmp_path / "plots")
    assert code == 0, err
    files = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert "loss_vs_step.png" in files and "val_loss_vs_tokens.png" in files and "lr_vs_step.png" in files
    assert all((tmp_path / "plots" / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in files)
    code, _, err = run_cli(capsys, "plot", tmp_path / "nothing")
    assert code == 1 and "no metrics.jsonl" in err
