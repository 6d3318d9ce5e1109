"""Mixture of Experts: routing, capacity, auxiliary losses, gradients, dispatch cost, training, CLI."""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_ARGS, run_cli
from test_training import unigram_entropy

from lmforge import config as C
from lmforge.config import Config, ModelConfig, TrainConfig, preset
from lmforge.data.shards import read_shard
from lmforge.errors import LmforgeError
from lmforge.models import build_model, moe
from lmforge.models.moe import MoE, plan_dispatch
from lmforge.train.loop import train


def moe_layer(d=3, experts=3, k=2, **kw) -> MoE:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=16,
        block_size=16,
        n_layer=1,
        n_head=1,
        d_model=d,
        mlp="swiglu",
        bias=False,
        moe_experts=experts,
        moe_top_k=k,
        moe_d_ff=8,
        **kw,
    )
    return MoE(cfg)


def set_router(layer: MoE, weight):
    with torch.no_grad():
        layer.router.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))


def expert_out(layer: MoE, e: int, x: torch.Tensor) -> torch.Tensor:
    return layer.experts[e](x[None])[0]


# --- routing ----------------------------------------------------------------------------------------


def test_hand_set_router_sends_tokens_to_expected_experts_with_expected_gates():
    layer = moe_layer().eval()
    set_router(layer, torch.eye(3))  # logits = the token itself
    ln = math.log
    x = torch.tensor(
        [
            [
                [ln(5), ln(3), ln(2)],  # probs 0.5 0.3 0.2 -> experts 0, 1; gates 0.5/0.8, 0.3/0.8
                [ln(1), ln(6), ln(3)],  # probs 0.1 0.6 0.3 -> experts 1, 2; gates 0.6/0.9, 0.3/0.9
                [ln(7), ln(1), ln(2)],
            ]
        ]
    )  # probs 0.7 0.1 0.2 -> experts 0, 2; gates 0.7/0.9, 0.2/0.9
    expected = [((0, 0.5 / 0.8), (1, 0.3 / 0.8)), ((1, 0.6 / 0.9), (2, 0.3 / 0.9)), ((0, 0.7 / 0.9), (2, 0.2 / 0.9))]
    with torch.no_grad():
        out = layer(x)
        for t, choices in enumerate(expected):
            want = sum(g * expert_out(layer, e, x[0, t]) for e, g in choices)
            torch.testing.assert_close(out[0, t], want, atol=1e-6, rtol=1e-5)

    # without renormalisation the gates are the raw softmax probabilities
    layer.renormalize = False
    raw = [((0, 0.5), (1, 0.3)), ((1, 0.6), (2, 0.3)), ((0, 0.7), (2, 0.2))]
    with torch.no_grad():
        out = layer(x)
        for t, choices in enumerate(raw):
            want = sum(g * expert_out(layer, e, x[0, t]) for e, g in choices)
            torch.testing.assert_close(out[0, t], want, atol=1e-6, rtol=1e-5)


def test_capacity_drops_the_hand_computed_assignments():
    # experts chosen by each (batch row b, position t), best first; E = 3, k = 2, capacity 2 per expert.
    experts = torch.tensor([[[0, 1], [0, 2], [1, 0]], [[0, 2], [2, 1], [0, 1]]])
    # Priority: earlier position, then first choice before second, then batch row:
    #   t0: (b0,j0) e0 keep, (b1,j0) e0 keep, (b0,j1) e1 keep, (b1,j1) e2 keep
    #   t1: (b0,j0) e0 DROP (e0 full), (b1,j0) e2 keep, (b0,j1) e2 DROP, (b1,j1) e1 keep
    #   t2: every assignment goes to a full expert (e1, e0, e0, e1): DROP
    want_dropped = {(0, 1, 0), (0, 1, 1), (0, 2, 0), (1, 2, 0), (0, 2, 1), (1, 2, 1)}
    plan = plan_dispatch(experts, 3, capacity=2)
    B, T, k = experts.shape

    def btj(a):
        return {(int(x % B), int(x // (k * B)), int((x // B) % k)) for x in a}

    assert btj(plan.dropped) == want_dropped
    assert plan.sizes.tolist() == [2, 2, 2] and plan.wanted.tolist() == [5, 4, 3]
    # kept assignments are grouped by expert and point at the right tokens
    kept = btj(plan.order)
    assert len(kept) == 6 and not kept & want_dropped
    assert experts.permute(1, 2, 0).reshape(-1)[plan.order].tolist() == [0, 0, 1, 1, 2, 2]  # grouped by expert
    tokens = moe.Dispatch.tokens(plan.order, B, T, k)
    assert sorted(tokens.tolist()) == sorted(b * T + t for b, t, _ in kept)

    nolimit = plan_dispatch(experts, 3, capacity=None)
    assert nolimit.dropped.numel() == 0 and nolimit.order.numel() == 12 and nolimit.sizes.tolist() == [5, 4, 3]


def test_dropped_assignment_leaves_the_residual_unchanged():
    layer = moe_layer(k=1, moe_capacity_factor=1.5)  # capacity ceil(1.5 * 4 * 1 / 3) = 2 per expert
    set_router(layer, 5 * torch.eye(3))
    x = torch.tensor([[[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0.9, 0, 0.1]]])  # experts 0, 0, 1, 0
    layer.train()
    out = layer(x)
    # k = 1 with renormalisation: gate 1. Token 3 is expert 0's third assignment: dropped, adds exactly nothing.
    assert torch.equal(out[0, 3], torch.zeros(3))
    for t, e in ((0, 0), (1, 0), (2, 1)):
        torch.testing.assert_close(out[0, t], expert_out(layer, e, x[0, t]))
    stats = layer.take_stats(training=True)
    assert stats["drop_rate"] == 0.25 and stats["load"] == [0.75, 0.25, 0.0]
    # at inference nothing is dropped (cached decoding must equal a full forward), but the overflow is still counted
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x)[0, 3], expert_out(layer, 0, x[0, 3]))
    assert layer.take_stats(training=False)["drop_rate"] == 0.25
    # no capacity factor: nothing dropped in training either
    layer.capacity_factor = None
    layer.train()
    torch.testing.assert_close(layer(x)[0, 3], expert_out(layer, 0, x[0, 3]))
    assert layer.take_stats(training=True)["drop_rate"] == 0.0


def test_each_expert_runs_once_on_exactly_its_tokens():
    layer = moe_layer(d=16, experts=8, k=2).eval()
    calls = []
    for e, expert in enumerate(layer.experts):
        expert.register_forward_hook(lambda mod, inp, out, e=e: calls.append((e, inp[0].shape[0])))
    x = torch.randn(4, 25, 16)
    with torch.no_grad():
        probs = layer.router(x).softmax(-1)
        layer(x)
    chosen = probs.topk(2, dim=-1).indices.flatten()
    assert [e for e, _ in calls] == list(range(8))  # one call per expert
    assert [n for _, n in calls] == torch.bincount(chosen, minlength=8).tolist()  # on exactly its tokens
    assert sum(n for _, n in calls) == 4 * 25 * 2  # k per token, not E per token


# --- auxiliary losses and gradients -------------------------------------------------------------------


def test_load_balancing_and_z_loss_match_hand_computation():
    layer = moe_layer().train()
    set_router(layer, torch.eye(3))
    ln = math.log
    x = torch.tensor([[[ln(5), ln(3), ln(2)], [ln(1), ln(6), ln(3)]]])  # probs (.5 .3 .2), (.1 .6 .3)
    layer(x)
    # assignments: token 0 -> experts 0, 1; token 1 -> experts 1, 2: f = (1/4, 2/4, 1/4); mean probs P = (.3, .45, .25)
    balance = 3 * (0.25 * 0.3 + 0.5 * 0.45 + 0.25 * 0.25)
    z = ((ln(10) ** 2) + (ln(10) ** 2)) / 2  # logsumexp of each token's logits is ln(5 + 3 + 2) = ln(1 + 6 + 3) = ln 10
    assert math.isclose(layer.balance_loss().item(), balance, rel_tol=1e-6)
    assert math.isclose(layer.z_loss().item(), z, rel_tol=1e-6)
    # uniform router probabilities score exactly 1 (E * sum_e f_e / E), whichever experts the ties pick
    set_router(layer, torch.zeros(3, 3))
    layer(torch.randn(1, 6, 3))
    assert math.isclose(layer.balance_loss().item(), 1.0, rel_tol=1e-6)


def test_model_aux_losses_average_layers_with_their_coefficients():
    cfg = ModelConfig(
        vocab_size=32,
        block_size=16,
        n_layer=4,
        n_head=2,
        d_model=16,
        moe_experts=4,
        moe_every=2,
        moe_aux_loss_coef=0.03,
        moe_z_loss_coef=0.002,
    )
    model = build_model(cfg)
    assert list(moe.moe_layers(model)) == ["blocks.1", "blocks.3"]
    assert moe.aux_losses(model) == {}  # nothing before a forward
    model(torch.randint(0, 32, (2, 8)))
    aux = moe.aux_losses(model)
    layers = list(moe.moe_layers(model).values())
    assert aux["moe_balance"][0] == 0.03 and aux["moe_z"][0] == 0.002
    torch.testing.assert_close(aux["moe_balance"][1], (layers[0].balance_loss() + layers[1].balance_loss()) / 2)
    torch.testing.assert_close(aux["moe_z"][1], (layers[0].z_loss() + layers[1].z_loss()) / 2)
    assert moe.aux_losses(build_model(ModelConfig(vocab_size=32, block_size=16, n_layer=1, n_head=2, d_model=16))) == {}


def test_gradients_reach_the_router_and_every_used_expert():
    layer = moe_layer(d=8, experts=4, k=2)
    router = torch.zeros(4, 8)
    router[0, 0] = router[1, 1] = router[2, 2] = 3.0  # experts 0-2 follow input dims 0-2 ...
    router[3] = -100.0  # ... and expert 3 is never chosen for positive inputs
    set_router(layer, router)
    x = torch.rand(2, 10, 8) + 0.1
    layer.train()
    out = layer(x)
    wanted = layer.take_stats(training=True)["load"]
    assert wanted[3] == 0 and min(wanted[:3]) > 0  # experts 0-2 used, expert 3 not
    out.square().sum().backward()  # the task loss alone: the router learns through the gates
    assert layer.router.weight.grad.abs().sum() > 0
    for e in range(3):
        for name, p in layer.experts[e].named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (e, name)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in layer.experts[3].parameters())
    # the auxiliary losses alone also train the router
    layer.zero_grad()
    layer(x)
    (layer.balance_loss() + layer.z_loss()).backward()
    assert layer.router.weight.grad.abs().sum() > 0


def test_jitter_only_in_training():
    layer = moe_layer(d=8, experts=4, k=2, moe_jitter=0.5)
    x = torch.randn(1, 64, 8)
    layer.eval()
    with torch.no_grad():
        assert torch.equal(layer(x), layer(x))
    layer.train()
    with torch.no_grad():
        outs = [layer(x) for _ in range(3)]
    assert not all(torch.equal(outs[0], o) for o in outs[1:])  # the noise changes the router's gates
    layer.jitter = 0.0
    with torch.no_grad():
        assert torch.equal(layer(x), layer(x))


def test_shared_expert_is_always_on():
    layer = moe_layer(d=8, experts=4, k=1, moe_shared_expert=True, moe_capacity_factor=0.01).train()
    x = torch.randn(1, 12, 8)
    out = layer(x)
    shared, layer.shared_expert = layer.shared_expert, None
    routed = layer(x)  # the same layer without its shared expert
    torch.testing.assert_close(out, routed + shared(x))
    assert torch.count_nonzero(routed.abs().sum(-1)) <= 4  # capacity 1 per expert: at most 4 tokens routed


# --- configuration, parameter counts, presets ------------------------------------------------------


def test_dense_models_unchanged_and_param_counts():
    dense = ModelConfig(
        vocab_size=64, block_size=16, n_layer=2, n_head=2, d_model=16, mlp="swiglu", d_ff=32, bias=False
    )
    assert not any("router" in k or "experts" in k for k in build_model(dense).state_dict())
    cfg = ModelConfig(
        vocab_size=64,
        block_size=16,
        n_layer=2,
        n_head=2,
        d_model=16,
        mlp="swiglu",
        d_ff=32,
        bias=False,
        moe_experts=4,
        moe_top_k=2,
        moe_d_ff=24,
        moe_every=2,
    )
    model = build_model(cfg)
    expert = 3 * 16 * 24
    assert isinstance(model.blocks[1].mlp, MoE) and not isinstance(model.blocks[0].mlp, MoE)
    d_model = build_model(dense)
    # layer 1's dense MLP (3*16*32) becomes a router (4*16) and 4 experts; active = 2 of them
    assert model.num_params() == d_model.num_params() - 3 * 16 * 32 + 4 * 16 + 4 * expert
    assert model.num_active_params() == model.num_params() - 2 * expert
    assert d_model.num_active_params() == d_model.num_params()


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(moe_experts=-1), "moe_experts must be >= 0"),
        (dict(moe_experts=4, moe_top_k=5), "moe_top_k (5) must be between 1 and moe_experts (4)"),
        (dict(moe_experts=4, moe_every=3), "moe_every (3) must be between 1 and n_layer (2)"),
        (dict(moe_experts=4, moe_capacity_factor=0.0), "moe_capacity_factor must be positive"),
        (dict(moe_experts=4, moe_d_ff=0), "moe_d_ff must be positive"),
        (dict(moe_experts=4, moe_z_loss_coef=-1.0), "must be >= 0"),
        (dict(moe_experts=4, moe_jitter=1.0), "moe_jitter must be in [0, 1)"),
        (dict(moe_top_k=1, moe_capacity_factor=2.0), "moe_top_k, moe_capacity_factor set but moe_experts is 0"),
    ],
)
def test_config_validation(kw, msg):
    with pytest.raises(LmforgeError, match=f"invalid model config: .*{__import__('re').escape(msg)}"):
        ModelConfig(n_layer=2, **kw).validate()


def test_presets_list_total_and_active_params(capsys):
    code, out, _ = run_cli(capsys, "presets")
    assert code == 0
    line = next(ln for ln in out.splitlines() if ln.startswith("moe-tiny"))
    total, active = (float(w[:-1]) for w in line.split()[1:3])
    llama = next(ln for ln in out.splitlines() if ln.startswith("llama-tiny"))
    assert total > 1.8 * active and abs(active - float(llama.split()[2][:-1])) < 0.05  # same active size as llama-tiny
    m = preset("moe-tiny").model
    assert m.moe_experts == 8 and m.moe_top_k == 2


# --- whole models ----------------------------------------------------------------------------------


def test_tiny_moe_model_learns(tmp_path, corpus_dir):
    model = ModelConfig(
        n_layer=2,
        n_head=2,
        d_model=64,
        block_size=64,
        norm="rmsnorm",
        pos="rope",
        mlp="swiglu",
        bias=False,
        moe_experts=4,
        moe_top_k=2,
        moe_d_ff=96,
        moe_capacity_factor=1.5,
    )
    cfg = Config(
        model=model,
        train=TrainConfig(
            batch_size=8,
            lr=3e-3,
            warmup_steps=5,
            eval_interval=1000,
            eval_batches=4,
            sample_tokens=0,
            tokenizer_vocab_size=320,
            log_interval=10,
            device="cpu",
            max_steps=150,
        ),
    )
    result = train(cfg, tmp_path / "run", data=corpus_dir, cache_root=tmp_path / "cache", log=lambda *_: None)
    shard_dir = next((tmp_path / "cache").glob("data-*"))
    entropy = unigram_entropy(np.asarray(read_shard(shard_dir / "train_0000.bin"), dtype=np.int64))
    assert result.final["val_loss"] < 0.5 * entropy, (result.final, entropy)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logs = [r for r in records if "loss" in r]
    assert logs[0]["loss"] > logs[-1]["loss"]
    for r in logs:  # router losses and routing reported separately from the LM loss
        assert r["moe_balance"] > 0 and r["moe_z"] > 0
        assert set(r["moe_routing"]) == {"blocks.0", "blocks.1"}
        for layer in r["moe_routing"].values():
            assert len(layer["load"]) == 4 and math.isclose(sum(layer["load"]), 1.0)
            assert 0.0 <= layer["drop_rate"] < 1.0
    # 10 steps of 8 x 64 tokens, 2 choices each, per log record (after the first)
    assert logs[2]["moe_routing"]["blocks.0"]["assignments"] == 10 * 8 * 64 * 2
    assert set(records[-1]["val_moe_routing"]) == {"blocks.0", "blocks.1"}


def test_cli_train_eval_and_export_errors(tmp_path, capsys, corpus_dir):
    out = tmp_path / "moe"
    args = [
        "--moe_experts",
        "4",
        "--moe_top_k",
        "2",
        "--moe_every",
        "2",
        "--moe_capacity_factor",
        "1.25",
        "--moe_shared_expert",
        "true",
    ]
    code, stdout, err = run_cli(capsys, "train", corpus_dir, "--out", out, "--max-steps", "10", *TINY_ARGS, *args)
    assert code == 0, err
    assert "| balance " in stdout and "dropped " in stdout
    code, stdout, err = run_cli(capsys, "eval", out, "--data", corpus_dir / "part0.txt", "--max-tokens", "2000")
    assert code == 0, err
    (line,) = [ln for ln in stdout.splitlines() if ln.startswith("blocks.1:")]
    assert "expert load %" in line and "beyond capacity" in line
    shares = [float(v) for v in line.split("[")[1].split("]")[0].split()]
    assert len(shares) == 4 and abs(sum(shares) - 100) < 0.5
    code, _, err = run_cli(capsys, "convert", "--to-hf", out, "--out", tmp_path / "hf")
    assert code == 1 and "moe_every=2" in err and "moe_shared_expert" in err and "without Llama attention" in err
    code, _, err = run_cli(
        capsys, "train", corpus_dir, "--out", tmp_path / "bad", *TINY_ARGS, "--moe_experts", "4", "--moe_top_k", "9"
    )
    assert code == 1 and err.startswith("error: invalid model config: moe_top_k (9)")


def test_readme_moe_config_runs(tmp_path, capsys, corpus_dir):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("### Mixture of Experts", 1)[1]
    toml = section.split("```toml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "moe.toml").write_text(toml)
    cfg = C.merge(C.preset("tiny"), C.load_file(tmp_path / "moe.toml"))
    cfg.validate()
    want = preset("moe-tiny").model
    # the README example is the moe-tiny preset spelled out
    # (d_ff, the size of dense layers, is unused: every layer is MoE)
    # (the default preset it applies to starts output projections at zero; moe-tiny, a Llama, does not)
    assert dataclasses.replace(cfg.model, d_ff=want.d_ff, zero_init_proj=want.zero_init_proj) == want
    code, stdout, err = run_cli(
        capsys,
        "train",
        corpus_dir,
        "--config",
        tmp_path / "moe.toml",
        "--out",
        tmp_path / "run",
        "--max-steps",
        "2",
        "--tokenizer_vocab_size",
        "320",
        "--batch_size",
        "2",
        "--seq_len",
        "64",
        "--eval_batches",
        "1",
        "--sample_tokens",
        "0",
        "--log_interval",
        "1",
    )
    assert code == 0, err
    assert "| balance " in stdout
