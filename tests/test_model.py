import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.inference.engine import generate_tokens
from lmforge.inference.sampling import sample_next_token
from lmforge.models import build_model
from lmforge.models.layers import rope_cos_sin


def tiny_model(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(vocab_size=97, block_size=48, n_layer=2, n_head=4, d_model=32), **kw})
    return build_model(cfg).eval()


def test_causality():
    model = tiny_model()
    x = torch.randint(0, 97, (2, 40))
    base = model(x)
    for t in (0, 17, 39):
        x2 = x.clone()
        x2[:, t] = (x2[:, t] + 1) % 97
        out = model(x2)
        assert torch.equal(out[:, :t], base[:, :t])
        assert not torch.allclose(out[:, t:], base[:, t:])


def test_cached_forward_equals_full():
    model = tiny_model()
    x = torch.randint(0, 97, (3, 30))
    full = model(x)
    cache = model.new_cache(3, 48)
    parts = [model(x[:, :11], cache)] + [model(x[:, t : t + 1], cache) for t in range(11, 30)]
    assert cache.pos == 30
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)


def test_greedy_cached_generation_equals_recomputation():
    model = tiny_model()
    prompt = [5, 7, 11, 13]
    cached = list(generate_tokens(model, prompt, 30, temperature=0.0))
    seq = list(prompt)
    for _ in range(30):
        with torch.no_grad():
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert cached == seq[len(prompt) :]


def test_parameter_count_and_tied_head():
    model = tiny_model()
    assert model.lm_head.weight is model.tok_emb.weight
    d, L, V, T = 32, 2, 97, 48
    per_block = 12 * d * d + 13 * d  # qkv+proj+mlp weights and biases, two layernorms
    assert model.num_params() == V * d + T * d + L * per_block + 2 * d


def test_gpt2_init_scales_residual_projections():
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=64, block_size=16, n_layer=8, n_head=4, d_model=256))
    assert abs(model.blocks[0].attn.qkv.weight.std().item() - 0.02) < 0.002
    assert abs(model.blocks[0].mlp.down.weight.std().item() - 0.02 / 4) < 0.001


def test_zero_init_projections_make_blocks_start_as_identity():
    model = tiny_model(zero_init_proj=True, mlp="relu2")
    for block in model.blocks:
        assert not block.attn.proj.weight.any() and not block.mlp.down.weight.any()
        assert block.attn.qkv.weight.std() > 0.01  # the rest keeps its normal init
    x = torch.randn(2, 9, 32)
    assert torch.equal(model.blocks[0](x)[0], x)


def test_cross_entropy_matches_torch_with_smoothing_and_ignored_targets():
    import torch.nn.functional as F

    from lmforge.data.pairs import IGNORE
    from lmforge.models.loss import token_cross_entropy

    torch.manual_seed(0)
    for smoothing in (0.0, 0.1):
        for reduction in ("mean", "sum"):
            logits = torch.randn(37, 50, dtype=torch.float64, requires_grad=True)
            y = torch.randint(0, 50, (37,))
            y[::5] = IGNORE
            ours = token_cross_entropy(logits, y, reduction, smoothing)
            (g_ours,) = torch.autograd.grad(2.5 * ours, logits)
            ref = F.cross_entropy(logits, y, reduction=reduction, label_smoothing=smoothing, ignore_index=IGNORE)
            (g_ref,) = torch.autograd.grad(2.5 * ref, logits)
            torch.testing.assert_close(ours, ref)
            torch.testing.assert_close(g_ours, g_ref)
            assert not g_ours[::5].any()  # ignored rows get no gradient
    half = torch.randn(8, 30, dtype=torch.bfloat16, requires_grad=True)
    token_cross_entropy(half, torch.randint(0, 30, (8,))).backward()
    assert half.grad.dtype == torch.bfloat16


def test_cross_entropy_exact_for_targets_far_below_the_top():
    """The loss of a row comes from its softmax, -log p(target): a target so unlikely that p underflows fp32
    (here 90 and 300 nats below the rest) must still get the exact loss, not inf or a rounded one."""
    import torch.nn.functional as F

    from lmforge.models.loss import target_nats, token_cross_entropy

    torch.manual_seed(0)
    logits = torch.randn(16, 40) * 3
    y = torch.randint(0, 40, (16,))
    logits[2, y[2]] -= 90.0
    logits[9, y[9]] -= 300.0
    for row in range(16):
        ours = token_cross_entropy(logits[row : row + 1], y[row : row + 1], "sum")
        ref = F.cross_entropy(logits[row : row + 1].double(), y[row : row + 1], reduction="sum")
        assert torch.isfinite(ours)
        assert abs(ours.item() - ref.item()) <= 2e-6 * max(1.0, ref.item()), (row, ours.item(), ref.item())
    ref = F.cross_entropy(logits.double(), y, reduction="none")
    for sync_free in (False, True):  # the CPU path and the accelerators' path, both run here
        nats = target_nats(logits, logits.softmax(-1), y, sync_free)
        torch.testing.assert_close(nats, ref.float(), rtol=2e-6, atol=2e-6)
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    token_cross_entropy(a, y).backward()
    F.cross_entropy(b, y).backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]])
    g = torch.Generator().manual_seed(0)
    assert {int(sample_next_token(logits, 1.0, top_k=2, generator=g)) for _ in range(200)} == {3, 4}
    assert {int(sample_next_token(logits, 1.0, top_p=0.5, generator=g)) for _ in range(200)} == {4}
    assert int(sample_next_token(logits, 0.0)) == 4
    a = [int(sample_next_token(logits, 1.0, generator=torch.Generator().manual_seed(3))) for _ in range(5)]
    b = [int(sample_next_token(logits, 1.0, generator=torch.Generator().manual_seed(3))) for _ in range(5)]
    assert a == b


# --- value residual (Zhou et al. 2024, ResFormer) --------------------------------------------------


def _lambdas(model):
    return [b.attn.value_lambda for b in model.blocks if b.attn.value_lambda is not None]


def test_value_residual_is_off_by_default_and_needs_two_layers():
    assert not ModelConfig().value_residual and not _lambdas(tiny_model())
    model = tiny_model(value_residual=True, n_layer=3)
    assert [p.item() for p in _lambdas(model)] == [0.5, 0.5]  # layers 2 and 3; the first has none
    with pytest.raises(LmforgeError, match="value_residual needs n_layer >= 2"):
        ModelConfig(n_layer=1, value_residual=True).validate()


@torch.no_grad()
def test_value_residual_mixes_the_first_layers_values():
    """lambda = 1 is the plain model, bit for bit; an attention layer's output is affine in lambda (attention is
    linear in its values), and at lambda = 0 the layer's own values no longer matter."""
    plain, vres = tiny_model(pos="rope", n_kv_head=2), tiny_model(pos="rope", n_kv_head=2, value_residual=True)
    missing = vres.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing == ["blocks.1.attn.value_lambda"]
    x = torch.randint(0, 97, (2, 40))
    vres.blocks[1].attn.value_lambda.fill_(1.0)
    assert torch.equal(vres(x), plain(x))

    attn = vres.blocks[1].attn
    h, v1 = torch.randn(2, 40, 32), torch.randn(2, 2, 40, 8)  # (B, T, d_model), (B, n_kv_head, T, head_dim)
    rope = rope_cos_sin(vres.inv_freq, torch.arange(40), torch.float32)

    def out(lam):
        attn.value_lambda.fill_(lam)
        y, passed_on = attn(h, rope, v_first=v1)
        assert passed_on is v1
        return y

    torch.testing.assert_close(out(0.3), 0.3 * out(1.0) + 0.7 * out(0.0), atol=1e-5, rtol=0)
    assert not torch.allclose(out(0.3), out(1.0))
    before = out(0.0)
    attn.qkv.weight[-16:] += 1.0  # the value rows of the fused projection (n_kv_head 2 x head_dim 8)
    torch.testing.assert_close(out(0.0), before, atol=0, rtol=0)


def test_value_residual_trains_its_lambdas():
    model = tiny_model(value_residual=True, n_layer=3).train()
    x = torch.randint(0, 97, (2, 40))
    torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
    assert all(p.grad is not None and p.grad.abs().item() > 0 for p in _lambdas(model))
    model.activation_checkpointing = True  # v_1 passes through the checkpointed blocks: the same gradients
    grads = [p.grad.clone() for p in _lambdas(model)]
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
    for p, g in zip(_lambdas(model), grads):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-5)


def test_value_residual_cached_forward_equals_full():
    model = tiny_model(value_residual=True, n_layer=3, pos="rope", n_kv_head=2)
    with torch.no_grad():
        for p in _lambdas(model):
            p.uniform_(-0.5, 1.5)  # away from the initial 0.5, as after training
    x = torch.randint(0, 97, (3, 30))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(3, 48)
        parts = (
            [model(x[:, :11], cache)]
            + [model(x[:, t : t + 1], cache) for t in range(11, 25)]
            + [model(x[:, 25:], cache)]
        )
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)
    assert not torch.allclose(full, tiny_model(n_layer=3, pos="rope", n_kv_head=2)(x))
