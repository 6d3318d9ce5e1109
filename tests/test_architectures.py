"""Every architecture option trains, and cached generation stays exact for each."""

import pytest
import torch

from lmforge.config import Config, ModelConfig, TrainConfig
from lmforge.inference.engine import generate_tokens
from lmforge.models import build_model
from lmforge.train.loop import train

# Each option of each axis appears at least once; a few combine the unusual ones.
COMBOS = {
    "gpt2": dict(),
    "llama": dict(norm="rmsnorm", pos="rope", mlp="swiglu", n_kv_head=2, bias=False, tie_embeddings=False),
    "mqa-qknorm-geglu": dict(norm="rmsnorm", pos="rope", mlp="geglu", n_kv_head=1, qk_norm=True),
    "sinusoidal-relu2-nobias-ln": dict(pos="sinusoidal", mlp="relu2", bias=False, norm_bias=False),
    "nopos-gelu-exact": dict(pos="none", mlp="gelu"),
    "window-softcaps": dict(pos="rope", sliding_window=6, attn_softcap=20.0, logit_softcap=15.0),
    "rope-ntk-window-gqa": dict(
        pos="rope", rope_scaling={"type": "ntk", "factor": 2.0}, sliding_window=5, n_kv_head=2, norm="rmsnorm"
    ),
    "rope-linear-learned-eps": dict(
        pos="rope", rope_scaling={"type": "linear", "factor": 4.0}, norm_eps=1e-6, dropout=0.1
    ),
    "moe-llama-capacity": dict(
        norm="rmsnorm",
        pos="rope",
        mlp="swiglu",
        n_kv_head=2,
        bias=False,
        moe_experts=4,
        moe_top_k=2,
        moe_d_ff=24,
        moe_capacity_factor=1.0,
    ),
    "moe-gpt2-every2-shared-top1": dict(
        moe_experts=3,
        moe_top_k=1,
        moe_every=2,
        moe_shared_expert=True,
        moe_renormalize=False,
        moe_jitter=0.1,
        moe_capacity_factor=0.5,
    ),
    "moe-window-geglu-top3": dict(
        pos="rope", sliding_window=6, mlp="geglu", moe_experts=5, moe_top_k=3, moe_z_loss_coef=0.0
    ),
    "valueres-llama-window": dict(
        norm="rmsnorm", pos="rope", mlp="swiglu", n_kv_head=2, bias=False, sliding_window=6, value_residual=True
    ),
    "valueres-gpt2-dropout": dict(value_residual=True, dropout=0.1),
}


def make(kw, vocab=97, block=64):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab, block_size=block, n_layer=2, n_head=4, d_model=32, d_ff=48, init_std=0.1, **kw)
    return build_model(cfg).eval()


@pytest.mark.parametrize("name", list(COMBOS))
def test_cached_generation_equals_recomputation(name):
    model = make(COMBOS[name])
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    cached = list(generate_tokens(model, prompt, 40, temperature=0.0))
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(40):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert cached == seq[len(prompt) :]
    x = torch.randint(0, 97, (2, 50))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2, 50)
        steps = [model(x[:, :7], cache)] + [model(x[:, t : t + 1], cache) for t in range(7, 50)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=2e-5, rtol=0)


@pytest.mark.parametrize("name", list(COMBOS))
def test_trains_a_few_steps(name, tmp_path, corpus_dir):
    model_kw = dict(n_layer=2, n_head=4, d_model=32, d_ff=48, block_size=32, **COMBOS[name])
    cfg = Config(
        model=ModelConfig(**model_kw),
        train=TrainConfig(
            batch_size=4,
            max_steps=6,
            warmup_steps=2,
            eval_interval=100,
            eval_batches=1,
            sample_tokens=4,
            tokenizer_vocab_size=320,
            device="cpu",
            precision="fp32",
        ),
    )
    res = train(cfg, tmp_path / "run", data=corpus_dir, cache_root=tmp_path / "cache", log=lambda *_: None)
    assert res.step == 6 and torch.isfinite(torch.tensor(res.final["val_loss"]))


def test_sliding_window_ring_buffer_far_past_the_window():
    W = 6
    model = make(dict(pos="rope", sliding_window=W, n_kv_head=2), block=128)
    prompt = [7, 8, 9]
    cache = model.new_cache(1, 128)
    assert cache.k[0].shape[2] == W  # memory is bounded by the window, not the length
    out = list(generate_tokens(model, prompt, 100, temperature=0.0))
    assert len(out) == 100  # 17x the window
    seq = prompt + out
    with torch.no_grad():
        logits = model(torch.tensor([seq[:-1]]))  # full recomputation with the windowed mask
    assert logits[0, len(prompt) - 1 :].argmax(-1).tolist() == out


def test_window_really_limits_attention():
    W = 4
    model = make(dict(pos="rope", sliding_window=W))
    x = torch.randint(0, 97, (1, 30))
    x2 = x.clone()
    x2[0, 10] = (x2[0, 10] + 1) % 97
    with torch.no_grad():
        a, b = model(x), model(x2)
    # with 2 layers information travels at most 2 * (W - 1) positions
    assert torch.equal(a[0, 10 + 2 * (W - 1) + 1 :], b[0, 10 + 2 * (W - 1) + 1 :])
    assert not torch.equal(a[0, 10:13], b[0, 10:13])
