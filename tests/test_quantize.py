"""CPU inference kernels (lmforge.inference.quantize): every kernel equals plain fp32 within its dtype's
tolerance, each option picks a kernel this CPU can run, and a CPU without oneDNN's packed bf16 path
(AVX2-only) is simulated here by making that path fail the way it fails there."""

import functools
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.inference import quantize as Q
from lmforge.inference.engine import generate_tokens
from lmforge.models import build_model

# max |logit - fp32 logit| allowed per kernel on the toy model (logits of size ~1-3)
TOLERANCE = {
    "onednn": 1e-4,
    "transposed": 1e-4,
    "linear": 0.0,
    "compiled-mv": 1e-4,
    "bf16-onednn": 0.2,
    "bf16-mv": 0.2,
    "bf16-transposed": 0.2,
    "bf16-linear": 0.2,
    "int8": 0.3,
    "int8-dynamic": 0.5,
}
AVX2_ERROR = (
    "mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx_ne_convert or avx512bw, avx512vl and avx512dq"
)


def tiny_model(**kw):
    torch.manual_seed(0)
    return build_model(ModelConfig(vocab_size=97, block_size=64, n_layer=2, n_head=4, d_model=32, **kw)).eval()


@pytest.fixture(autouse=True)
def fresh_trials(tmp_path_factory, monkeypatch):
    """Kernel trials are cached per process; tests that break a kernel must not leak into others.
    Timed kernel choices go to a cache of this module's own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "quantize-cache"))
    Q.kernel_available.cache_clear()
    yield
    Q.kernel_available.cache_clear()


@pytest.fixture
def no_packed_bf16(monkeypatch):
    """This CPU as an AVX2-only one looks to PyTorch: oneDNN refuses to pack bf16 weights (fp32 still packs)."""
    real = torch.ops.mkldnn._reorder_linear_weight

    def reorder(w, *a):
        if w.dtype == torch.bfloat16:
            raise RuntimeError(AVX2_ERROR)
        return real(w, *a)

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", reorder)


def test_every_option_has_kernels():
    assert set(Q.KERNELS) == set(Q.QUANTIZE)
    assert set(TOLERANCE) == {k for ks in Q.KERNELS.values() for k in ks}


@pytest.mark.parametrize("arch", [{}, dict(value_residual=True)], ids=["gpt2", "valueres"])
@pytest.mark.parametrize("kernel", list(TOLERANCE))
@torch.no_grad()
def test_each_kernel_equals_fp32(kernel, arch, monkeypatch):
    """Forced onto the toy model (fp32 layouts normally skip layers this small), every kernel this CPU
    runs matches nn.Linear; one it cannot run is refused in one line, never run. Value residual's mixing
    is outside the swapped layers: every kernel runs it."""
    quantize = next(q for q, ks in Q.KERNELS.items() if kernel in ks)
    monkeypatch.setattr(Q, "PACK_MIN_WEIGHTS", 0)
    ref_model, model = tiny_model(**arch), tiny_model(**arch)
    why = Q.kernel_available(kernel)
    if why is not None:  # e.g. bf16-onednn on an AVX2-only CPU
        with pytest.raises(LmforgeError, match="cannot run on this CPU") as e:
            Q.pack_for_inference(model, quantize, kernel=kernel)
        assert "\n" not in str(e.value)
        assert kernel not in Q.available_kernels(quantize)
        return
    Q.pack_for_inference(model, quantize, kernel=kernel)
    swapped = kernel != "linear"
    assert any(isinstance(m, nn.Linear) for m in model.modules()) != swapped
    x = torch.randint(0, 97, (3, 20))
    ref, out = ref_model(x), model(x)
    assert (out - ref).abs().max() <= TOLERANCE[kernel]
    assert torch.corrcoef(torch.stack([out.flatten(), ref.flatten()]))[0, 1] > 0.99
    if quantize == "none":  # fp32 layouts: greedy decoding is unchanged
        want = list(generate_tokens(ref_model, [1, 2, 3], 20, temperature=0.0))
        assert list(generate_tokens(model, [1, 2, 3], 20, temperature=0.0)) == want


@torch.no_grad()
def test_bf16_kernels_agree_with_bf16_weights_reference(monkeypatch):
    """bf16 kernels compute with bf16 weights: each is close to F.linear on bf16-rounded weights, far closer
    than to fp32 (the option's reference is fp32 math on bf16 weights, not fp32 weights)."""
    monkeypatch.setattr(Q, "PACK_MIN_WEIGHTS", 0)
    torch.manual_seed(1)
    lin = nn.Linear(256, 384)
    x = torch.randn(5, 256)
    ref = torch.nn.functional.linear(x.bfloat16().float(), lin.weight.bfloat16().float(), lin.bias.bfloat16().float())
    for kernel in Q.available_kernels("bf16"):
        layer = Q._FACTORIES[kernel][0](lin)
        err = (layer(x) - ref).abs().max() / ref.abs().max()
        assert err < 0.01, (kernel, float(err))
        for one in (
            x[:1],
            x[None, :1],
            x[1],
        ):  # one token (the matrix-vector path of bf16-mv), as (1, in), (1, 1, in), (in,)
            got = layer(one)
            assert got.shape == one.shape[:-1] + (384,) and got.dtype == torch.float32
            err = (got - ref[1 if one.dim() == 1 else 0]).abs().max() / ref.abs().max()
            assert err < 0.01, (kernel, one.shape, float(err))


def test_options_choose_a_runnable_kernel():
    model = build_model(ModelConfig(vocab_size=128, block_size=16, n_layer=1, n_head=4, d_model=512)).eval()
    for q in Q.QUANTIZE:
        for k in (Q.choose_kernel(q), Q.choose_kernel(q, model, log=lambda _: None)):
            assert k in Q.KERNELS[q] and Q.kernel_available(k) is None


def test_kernel_choice_is_timed_on_the_first_loads_and_kept(tmp_path, monkeypatch):
    """Each kernel's best time over the first MEASURE_LOADS loads decides; later loads skip the timing.

    The first load is timed on a 'busy machine' where the truly fastest kernel looked slowest; the best
    times of the later loads correct the choice instead of keeping the first one for good."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    usable = Q.available_kernels("bf16")
    fast, slow = usable[-1], usable[0]
    timed = []

    def measure(kernels, layers, seconds=Q.MEASURE_SECONDS):
        timed.append(list(kernels))
        if len(timed) == 1:  # busy: the fastest kernel was slowed down
            return {k: (0.009 if k == fast else 0.002) for k in kernels}
        return {k: (0.001 if k == fast else 0.003) for k in kernels}

    monkeypatch.setattr(Q, "measure_kernels", measure)
    notes = []
    models = [Q.pack_for_inference(tiny_model(), "bf16", log=notes.append) for _ in range(Q.MEASURE_LOADS + 2)]
    assert timed == [usable] * Q.MEASURE_LOADS and len(notes) == Q.MEASURE_LOADS and "timing" in notes[0]
    assert fast == "bf16-linear"

    def is_fast(m):  # a bf16-linear layer: (out, in) bf16 weights through F.linear, not bf16-mv's mv
        return type(m) is Q.DenseLinear and not m.transposed and not m.matvec

    if len(usable) > 1:  # the first, misled load picked the slow kernel
        assert not any(is_fast(m) for m in models[0].modules())
        assert slow != fast
    for model in models[1:]:
        layers = [m for m in model.modules() if isinstance(m, (nn.Linear, Q.DenseLinear, Q.PackedLinear))]
        assert all(is_fast(m) for m in layers)


def test_kernel_timings_of_older_kernel_code_are_not_trusted(tmp_path, monkeypatch):
    """Timings kept under another KERNELS_REVISION (the kernels' code has changed since) do not decide: the
    first loads time the kernels again."""
    from lmforge import machine

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    usable = Q.available_kernels("bf16")
    model = tiny_model()
    shapes = "+".join(dict.fromkeys(f"{m.out_features}x{m.in_features}" for m in Q._sample_layers(model, False)))
    old = {"seconds": {k: 1.0 for k in usable}, "loads": Q.MEASURE_LOADS}
    machine.update(f"decode_kernel_seconds/r1/bf16/{shapes}", lambda _: old)  # complete, but of older code
    timed = []

    def measure(kernels, layers, seconds=Q.MEASURE_SECONDS):
        timed.append(list(kernels))
        return {k: 0.001 for k in kernels}

    monkeypatch.setattr(Q, "measure_kernels", measure)
    Q.pack_for_inference(model, "bf16", log=lambda _: None)
    assert timed == [usable]
    assert machine.read(f"decode_kernel_seconds/{Q.KERNELS_REVISION}/bf16/{shapes}")["loads"] == 1


def test_measure_kernels_is_bounded(monkeypatch):
    """The passes stop at the time budget (on a clock that ticks 10 ms per reading, so the bound does not
    depend on how busy the machine is), after at least one warm-up and two timed passes."""
    torch.manual_seed(0)
    layers = [nn.Linear(256, 256), nn.Linear(256, 1024)]
    kernels = Q.available_kernels("none") + Q.available_kernels("bf16")
    clock = iter(range(10**6))
    monkeypatch.setattr(Q, "time", SimpleNamespace(perf_counter=lambda: next(clock) * 0.01))
    times = Q.measure_kernels(kernels, layers, seconds=0.3)
    readings, k = next(clock), len(kernels)
    # readings: the deadline, then a start per kernel in the warm-up pass, a start and a stop per kernel in
    # every later pass, and from the third pass on one deadline check at its end
    passes = 2 + (readings - 1 - 3 * k) / (2 * k + 1)
    assert passes == int(passes) and passes >= 3
    last_check = (readings - 1) * 0.01
    assert last_check > 0.3 and (passes == 3 or last_check - (2 * k + 1) * 0.01 <= 0.3)  # stopped at the first chance
    assert set(times) == set(kernels) and all(t == pytest.approx(0.01) for t in times.values())


@torch.no_grad()
def test_bf16_without_packed_kernel_falls_back(no_packed_bf16):
    assert "avx512bw" in Q.kernel_available("bf16-onednn")
    assert Q.kernel_available("onednn") is None  # fp32 packing still works on such CPUs
    assert Q.choose_kernel("bf16") in ("bf16-mv", "bf16-transposed", "bf16-linear")
    ref_model, model = tiny_model(), Q.pack_for_inference(tiny_model(), "bf16")
    assert not any(isinstance(m, (nn.Linear, Q.PackedLinear)) for m in model.modules())
    x = torch.randint(0, 97, (2, 16))
    assert (model(x) - ref_model(x)).abs().max() < TOLERANCE["bf16-linear"]
    with pytest.raises(LmforgeError, match="bf16-onednn cannot run on this CPU: mkldnn_reorder"):
        Q.pack_for_inference(tiny_model(), "bf16", kernel="bf16-onednn")


def test_cli_generate_bf16_without_packed_kernel(no_packed_bf16, tiny_run, capsys):
    from conftest import run_cli

    code, out, err = run_cli(
        capsys, "generate", tiny_run, "--prompt", "1: the", "--quantize", "bf16", "--max-new-tokens", 5, "--seed", 1
    )
    assert code == 0 and out.startswith("1: the"), err


def test_option_with_no_runnable_kernel_is_refused_in_one_line(monkeypatch, tiny_run, capsys):
    from conftest import run_cli

    def prepack(*a):
        raise RuntimeError("Didn't find engine for operation quantized::linear_prepack NoQEngine")

    monkeypatch.setattr(torch.ops.quantized, "linear_prepack", prepack)
    with pytest.raises(LmforgeError, match="--quantize int8-dynamic cannot run on this CPU: Didn't find engine"):
        Q.pack_for_inference(tiny_model(), "int8-dynamic")
    code, _, err = run_cli(capsys, "generate", tiny_run, "--prompt", "x", "--quantize", "int8-dynamic")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "cannot run on this CPU" in err


def test_unknown_quantization_and_kernel():
    with pytest.raises(LmforgeError, match="unknown quantization"):
        Q.pack_for_inference(tiny_model(), "int3")
    with pytest.raises(LmforgeError, match="not one of --quantize bf16's"):
        Q.pack_for_inference(tiny_model(), "bf16", kernel="int8")


def test_small_fp32_layers_keep_nn_linear():
    model = Q.pack_for_inference(tiny_model(), "none")  # every layer of the toy model is below PACK_MIN_WEIGHTS
    assert all(not isinstance(m, (Q.PackedLinear, Q.DenseLinear)) for m in model.modules())


LLAMA = dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, qk_norm=True, bias=False, tie_embeddings=False)


def bf16_weights_reference(model):
    """The bf16 option's reference: the same model with every linear weight (and bias) rounded to bf16, fp32 math."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                for p in (m.weight, m.bias):
                    if p is not None:
                        p.copy_(p.bfloat16().float())
    return model


@pytest.mark.parametrize("arch", ["gpt2", "llama", "mixtral"])
@pytest.mark.parametrize("kernel", Q.KERNELS["bf16"])
@torch.no_grad()
def test_bf16_blocks_match_the_bf16_weights_reference(kernel, arch):
    """With --quantize bf16 the attention and MLP blocks' projections (experts too) run in bf16, while the
    residual stream, the KV cache and attention through it stay fp32: a prompt, then decode steps through the
    cache, give the reference's logits (fp32 math on bf16 weights) within bf16 rounding, as fp32 logits, and
    the same greedy tokens."""
    if Q.kernel_available(kernel) is not None:
        pytest.skip(f"{kernel} cannot run on this CPU")
    kw = {"gpt2": {}, "llama": LLAMA, "mixtral": dict(LLAMA, moe_experts=4, moe_top_k=2)}[arch]
    ref = bf16_weights_reference(tiny_model(**kw))
    model = Q.pack_for_inference(tiny_model(**kw), "bf16", kernel=kernel)
    blocks = [m for m in model.modules() if isinstance(m, (Q.PackedLinear, Q.DenseLinear))]
    assert {m.out_dtype for m in blocks} == {torch.bfloat16, None}  # the LM head gives fp32 logits
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(3))
    want = ref(ids)
    scale = float(want.abs().max())
    assert scale > 0.2
    got = model(ids)
    assert got.dtype == torch.float32 and float((got - want).abs().max()) < 0.01 * scale
    cache = model.new_cache(2, 24)
    assert cache.k[0].dtype == torch.float32  # bf16 attention over a cache is several times slower on CPUs
    steps = [model(ids[:, :16], cache)] + [model(ids[:, t : t + 1], cache) for t in range(16, 24)]
    stepped = torch.cat(steps, dim=1)
    assert stepped.dtype == torch.float32 and float((stepped - want).abs().max()) < 0.01 * scale
    assert (stepped.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("layout", [{}, {"transposed": True}, {"matvec": True}])
@torch.no_grad()
def test_bf16_prompt_in_fp32_gives_the_bf16_products_values(layout):
    """prompt_in_fp32 (CPUs without fast bf16 products): a prompt is multiplied in fp32 by the bf16 weights and
    the bf16-rounded input, the values a bf16 product accumulating in fp32 has before its output rounding;
    a decode step (fewer than FP32_PROMPT_MIN_ROWS rows) still takes the bf16 kernel."""
    g = torch.Generator().manual_seed(5)
    lin = nn.Linear(64, 48)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 64, generator=g) / 8)
        lin.bias.copy_(torch.randn(48, generator=g) / 8)
    fp32_prompt = Q.DenseLinear(lin, torch.bfloat16, prompt_in_fp32=True, **layout)
    plain = Q.DenseLinear(lin, torch.bfloat16, **layout)
    x = torch.randn(2, 5, 64, generator=g)
    want = F.linear(x.bfloat16().float(), lin.weight.bfloat16().float(), lin.bias.bfloat16().float())
    got = fp32_prompt(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert float((plain(x) - want).abs().max()) > 0  # the bf16 kernel rounds its output: the paths differ
    for few in (x[:1, :1], x[:1, :4], x[:, :3]):  # a decode step, batches of 1-6 rows: the same bf16 kernel
        assert few.numel() < Q.FP32_PROMPT_MIN_ROWS * 64
        torch.testing.assert_close(fp32_prompt(few), plain(few), atol=0, rtol=0)


@torch.no_grad()
def test_bf16_prompts_in_fp32_where_bf16_products_are_slow(monkeypatch):
    """The plain bf16 kernels take prompts in fp32 exactly when the CPU has no fast bf16 matrix multiplies."""
    for slow in (True, False):
        monkeypatch.setattr(Q, "bf16_products_slower", lambda slow=slow: slow)
        Q.bf16_prompts_in_fp32.cache_clear()
        model = Q.pack_for_inference(tiny_model(), "bf16", kernel="bf16-linear")
        layers = [m for m in model.modules() if isinstance(m, Q.DenseLinear)]
        assert layers and all(m.prompt_in_fp32 is slow for m in layers)
    Q.bf16_prompts_in_fp32.cache_clear()
    t = time.perf_counter()
    assert isinstance(Q.bf16_products_slower(), bool)  # the real measurement: bounded, a few milliseconds
    assert time.perf_counter() - t < 2.0


@torch.inference_mode()
def test_compiled_matvec_equals_linear_for_decode_rows_and_prompts():
    """compiled-mv's generated product (1 to COMPILED_MAX_ROWS rows) and its oneDNN path (more rows) both equal
    F.linear in fp32, with and without a bias, for any leading shape."""
    if (why := Q.kernel_available("compiled-mv")) is not None:
        pytest.skip(f"compiled-mv cannot run here: {why}")
    torch.manual_seed(0)
    for bias in (True, False):
        lin = nn.Linear(200, 72, bias=bias)
        layer = Q.CompiledMatvecLinear(lin)
        for shape in [(1, 200), (1, 1, 200), (200,), (2, 1, 200), (3, 1, 200), (4, 1, 200), (5, 200), (2, 7, 200)]:
            x = torch.randn(shape)
            got, want = layer(x), F.linear(x, lin.weight, lin.bias)
            assert got.shape == want.shape and got.dtype == torch.float32
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_compiled_kernel_is_only_compiled_when_it_is_the_fastest(tmp_path, monkeypatch):
    """The trial of compiled-mv compiles code (seconds), so choosing a kernel neither times it for one
    generation (only a long-running process asks for compiled kernels), nor compiles it for a model too
    small to time or when the timing ranks another kernel first; ranked first, it is tried, and a failing
    trial falls back to the next kernel."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(Q, "_COMPILED", {"compiled-mv": lambda: None})  # prerequisites met, whatever this machine
    tried = []
    real_trial = Q.kernel_available.__wrapped__

    def trial(name):
        tried.append(name)
        return "no compiler in this test" if name == "compiled-mv" else real_trial(name)

    monkeypatch.setattr(Q, "kernel_available", functools.cache(trial))
    assert Q.choose_kernel("none", tiny_model(), compiled=True) == "onednn" and "compiled-mv" not in tried
    model = build_model(ModelConfig(vocab_size=128, block_size=16, n_layer=1, n_head=4, d_model=512)).eval()
    order = {"onednn": 2, "transposed": 3, "linear": 4, "compiled-mv": 1}
    timed = []

    def measure(kernels, layers):
        timed.append(list(kernels))
        return {k: order[k] for k in kernels}

    monkeypatch.setattr(Q, "measure_kernels", measure)
    # one generation (compiled=False, the default): not even timed, although it would be the fastest
    assert Q.choose_kernel("none", model, log=lambda _: None) == "onednn" and "compiled-mv" not in timed[-1]
    order["compiled-mv"] = 5  # a long-running process, where it times slowest: timed, never tried
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "server"))
    assert Q.choose_kernel("none", model, log=lambda _: None, compiled=True) == "onednn"
    assert "compiled-mv" in timed[-1] and "compiled-mv" not in tried
    order["compiled-mv"] = 1  # now the fastest: tried, fails here, the next one is used
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "again"))
    assert Q.choose_kernel("none", model, log=lambda _: None, compiled=True) == "onednn" and "compiled-mv" in tried


@torch.inference_mode()
def test_a_compiled_kernel_that_fails_to_compile_is_left_out_of_the_timing(monkeypatch):
    def fail(*args):
        raise RuntimeError("C++ compile error")

    monkeypatch.setattr(Q, "_compiled_products", lambda: (fail, fail))
    torch.manual_seed(0)
    times = Q.measure_kernels(["onednn", "compiled-mv"], [nn.Linear(256, 256)], seconds=0.05)
    assert times["compiled-mv"] == float("inf") and times["onednn"] < float("inf")
