"""Issue 14: `lmforge train --dry-run` sizes a run (parameters, memory per rank, tokens per step, checkpoints)
without building, reading or writing anything; its activation formula against what real forward passes save."""

import dataclasses

import pytest
import torch
from conftest import run_cli

from lmforge.config import Config, ModelConfig, TrainConfig, preset
from lmforge.models import build_model
from lmforge.models.loss import lm_loss
from lmforge.train import sizing
from lmforge.train.optim import build_optimizers
from lmforge.train.sizing import DistEnv, activation_bytes, autocast_copy_bytes, dist_env, size_run

CPU = torch.device("cpu")
LLAMA = dict(norm="rmsnorm", pos="rope", mlp="swiglu", bias=False, tie_embeddings=False, n_kv_head=2)


def _cfg(model: dict | None = None, **train) -> Config:
    mc = ModelConfig(vocab_size=320, block_size=64, n_layer=2, n_head=4, d_model=64, **(model or {}))
    return Config(model=mc, train=TrainConfig(batch_size=4, **train))


@pytest.mark.parametrize(("name", "family"), [("tiny", "decoder"), ("llama-tiny", "decoder"), ("moe-tiny", "decoder")])
def test_parameters_are_the_real_models(name, family):
    cfg = preset(name, family)
    model = build_model(cfg.model)
    s = size_run(cfg, DistEnv(), CPU, "fp32")
    assert s.params == model.num_params() and s.active_params == model.num_active_params()
    assert (s.active_params < s.params) == (cfg.model.moe_experts > 0)
    assert s.weights == s.params * 4 == s.gradients  # fp32, one process: every parameter, 4 bytes each


def test_seq2seq_parameters():
    cfg = preset("seq2seq-tiny", "seq2seq")
    s = size_run(cfg, DistEnv(), CPU, "fp32")
    assert s.params == build_model(cfg.model).num_params() and s.activations is None and s.tokens_per_step is None


def test_optimizer_state_adamw_and_muon():
    cfg = _cfg()
    model = build_model(cfg.model)
    for name in ("adamw", "muon"):
        c = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, optimizer=name))
        real = 0
        for opt in build_optimizers(model, c.train, CPU):  # one step fills the state in
            model.zero_grad()
            model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
            opt.step()
            real += sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if t.dim())
        assert size_run(c, DistEnv(), CPU, "fp32").optimizer_state == real, name


def test_fsdp_divides_the_sharded_parts_and_ddp_keeps_them_whole():
    cfg = _cfg(parallel="fsdp", tokens_per_step=4 * 64 * 8)  # every dim 0 divides by 8: no padding
    one = size_run(cfg, DistEnv(), CPU, "bf16")
    eight = size_run(cfg, DistEnv(8, 0, 8, "gloo"), CPU, "bf16")
    for part in ("weights", "gradients", "optimizer_state"):
        assert getattr(eight, part) * 8 == getattr(one, part), part
    assert eight.autocast_copies == one.autocast_copies  # casts of the gathered weights: whole on every rank
    assert eight.activations == one.activations  # same micro-batch per rank
    assert (one.accum, eight.accum, one.tokens_per_step, eight.tokens_per_step) == (8, 1, 2048, 2048)
    assert eight.fsdp_buffers > 0 and one.fsdp_buffers == 0
    assert eight.checkpoint_shard * 8 == eight.checkpoint_sharded
    assert eight.checkpoint_sharded == one.checkpoint_full  # the same tensors, a tied head once in both
    # uneven dim 0: rank 0 holds ceil(rows / world) rows of each parameter
    three = size_run(cfg, DistEnv(3, 0, 3, "gloo"), CPU, "fp32")
    model = build_model(cfg.model)
    assert three.weights == 4 * sum(-(-p.shape[0] // 3) * p[0].numel() for p in model.parameters())
    ddp = size_run(
        dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, parallel="ddp")), eight.env, CPU, "bf16"
    )
    assert ddp.weights == one.weights and ddp.gradients == 2 * one.gradients  # plus DDP's buckets


def _saved_bytes(mc: ModelConfig, batch: int, precision: str, checkpointing: bool = False) -> int:
    """Bytes of the distinct storages a real forward (and loss) saves for the backward, parameters left out."""
    torch.manual_seed(0)
    model = build_model(mc)
    model.activation_checkpointing = checkpointing
    x = torch.randint(0, mc.vocab_size, (batch, mc.block_size))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    autocast = torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        lm_loss(model, x, x, "sum")
    return sum(saved.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize(
    "arch",
    [
        {},
        LLAMA,
        dict(LLAMA, n_kv_head=None),
        dict(mlp="geglu"),
        dict(value_residual=True),
        dict(LLAMA, value_residual=True),
    ],
    ids=str,
)
def test_activation_formula_counts_what_the_forward_saves(arch, precision):
    mc = ModelConfig(vocab_size=320, block_size=32, n_layer=3, n_head=4, d_model=48, **arch)
    estimate = activation_bytes(mc, 2, 32, precision, peak=False) + autocast_copy_bytes(build_model(mc), precision)
    measured = _saved_bytes(mc, 2, precision)
    assert abs(estimate - measured) <= 0.002 * measured, (estimate, measured)


def test_activation_formula_with_checkpointing_and_moe():
    mc = ModelConfig(vocab_size=320, block_size=32, n_layer=3, n_head=4, d_model=48)
    assert abs(activation_bytes(mc, 2, 32, "fp32", True, peak=False) - _saved_bytes(mc, 2, "fp32", True)) <= 512
    vres = dataclasses.replace(mc, value_residual=True)  # v_1 is an input of every later checkpointed layer
    assert abs(activation_bytes(vres, 2, 32, "fp32", True, peak=False) - _saved_bytes(vres, 2, "fp32", True)) <= 512
    moe = dataclasses.replace(mc, moe_experts=4, moe_top_k=2)  # dispatch buffers: an estimate
    assert abs(activation_bytes(moe, 2, 32, "fp32", peak=False) / _saved_bytes(moe, 2, "fp32") - 1) < 0.06
    # the peak adds the logits' gradient under autocast (in fp32 it overwrites the saved softmax: nothing new)
    # (and one recomputed layer under checkpointing)
    assert activation_bytes(mc, 2, 32, "fp32") == activation_bytes(mc, 2, 32, "fp32", peak=False)
    assert activation_bytes(mc, 2, 32, "bf16") - activation_bytes(mc, 2, 32, "bf16", peak=False) == 2 * 32 * 2 * 320


def test_checkpoint_size_matches_a_real_checkpoint(tmp_path, corpus_dir):
    from lmforge.runs import load_config
    from lmforge.train import checkpoint as ckptmod
    from lmforge.train.loop import train

    cfg = _cfg(max_steps=1, eval_interval=1000, eval_batches=1, sample_tokens=0, device="cpu", precision="fp32")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, tokenizer_vocab_size=320))
    train(cfg, tmp_path / "r", data=corpus_dir, cache_root=tmp_path / "c", log=lambda *_: None)
    ckpt = ckptmod.latest_checkpoint(tmp_path / "r")
    on_disk = sum(f.stat().st_size for f in ckpt.iterdir() if f.name != "manifest.json")
    estimate = size_run(load_config(tmp_path / "r"), DistEnv(), CPU, "fp32").checkpoint_full
    assert estimate <= on_disk <= estimate * 1.03 + 20_000  # + headers, RNG states and the run state


def test_dist_env_from_torchrun_or_asked():
    assert dist_env("cpu", environ={}) == DistEnv()
    env = dist_env("cuda", environ={"WORLD_SIZE": "16", "RANK": "9", "LOCAL_WORLD_SIZE": "8"})
    assert (env.world, env.rank, env.local_world, env.nodes, env.backend) == (16, 9, 8, 2, "nccl")
    asked = dist_env("cpu", 8, environ={})
    assert (asked.world, asked.local_world, asked.nodes, asked.backend) == (8, 8, 1, "gloo")
    assert "not launched" in asked.source
    with pytest.raises(sizing.LmforgeError, match="at least 1"):
        dist_env("cpu", 0, environ={})


def test_dry_run_cli_builds_reads_and_writes_nothing(tmp_path, corpus_dir, capsys, monkeypatch):
    import lmforge.data.prepare as prepare
    import lmforge.train.tasks as tasks

    def forbidden(*a, **k):
        raise AssertionError("a dry run read the data")

    monkeypatch.setattr(prepare, "ensure_data", forbidden)
    monkeypatch.setattr(tasks, "TokenData", forbidden)
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    args = ["train", corpus_dir, "--preset", "gpt2", "--parallel", "fsdp", "--precision", "bf16", "--dry-run"]
    code, out, err = run_cli(capsys, *args, "--world-size", "8")
    assert code == 0, err
    assert sorted(tmp_path.rglob("*")) == before  # no runs/, no cache
    assert "124,475,904 parameters" in out and "8 (asked for with --world-size 8" in out
    assert "524,288 tokens = up to 8 x 1024 tokens x 8 ranks x 8 accumulation" in out
    assert "1/8 shard" in out and "8 shard files of" in out
    # plain python: one process; under torchrun only rank 0 prints
    code, out, _ = run_cli(capsys, *args)
    assert code == 0 and "processes   1 (one process" in out and "x 64 accumulation" in out
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    code, out, _ = run_cli(capsys, *args)
    assert code == 0 and out == ""
    # --world-size is a question for --dry-run
    code, _, err = run_cli(capsys, "train", corpus_dir, "--world-size", "8")
    assert code == 1 and "--world-size goes with --dry-run" in err


def test_dry_run_of_a_run_to_resume(tiny_run, capsys):
    files = {p: p.stat().st_mtime_ns for p in tiny_run.rglob("*")}
    code, out, err = run_cli(capsys, "train", "--resume", tiny_run, "--dry-run", "--world-size", "2")
    assert code == 0, err
    assert "processes   2" in out and "note" not in out  # the run's config holds its vocabulary
    assert {p: p.stat().st_mtime_ns for p in tiny_run.rglob("*")} == files
