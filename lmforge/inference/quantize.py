"""Linear layers prepared for fast CPU inference, swapped into a model in place.

Decoding one token reads every weight once, so on a CPU its speed is set by how fast the
matrix-vector products stream weights from memory, and which kernel streams fastest depends on
the CPU (benchmarks/decode_speed.py and benchmarks/RESULTS.md). So each --quantize option has
several kernels, a weight layout plus the operation that multiplies by it, and the model gets
the best one this CPU can run:

    option        kernels (fallback order)              what changes
    none          onednn, transposed, linear,           nothing but the layout: fp32, same results up to rounding
                  compiled-mv
    bf16          bf16-onednn, bf16-mv,                  weights and products in bfloat16, and the projections'
                  bf16-transposed, bf16-linear           outputs within each attention and MLP block; the residual
                                                         stream, the norms, the KV cache and attention over it,
                                                         and the logits stay fp32
    int8          int8                                   weight-only int8, one scale per output channel
    int8-dynamic  int8-dynamic                           int8 weights, activations rounded to int8 per call (PyTorch's
                                                         quantized ops, which PyTorch has deprecated): least exact

    onednn        W reordered once into oneDNN's blocked layout (what torch.compile's CPU path does after freezing);
                  bf16 needs AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT: AVX2-only CPUs cannot run it
    transposed    W^T kept as an (in, out) matrix, y = x @ W^T: a matrix-vector product that streams W row by row
    linear        the usual (out, in) layout through F.linear
    compiled-mv   the (out, in) layout; one to COMPILED_MAX_ROWS tokens through a matrix-vector product that
                  torch.compile generates for this CPU (a C++ loop streaming each weight row once for all rows),
                  more tokens through oneDNN's product on the same weights. Needs a C++ compiler; the first
                  load on a machine compiles it (seconds, then cached by PyTorch), each process pays ~3 s to
                  load the compiler stack, so it is only ever tried when it could be picked (see below)
    mv            the (out, in) layout, one token through torch.mv with oneDNN switched off (PyTorch's own
                  reduced-precision matrix-vector kernel, which accumulates in fp32; every CPU runs it) and the
                  bias added after, more tokens through F.linear

On a CPU whose bf16 matrix multiplies are slower than fp32 (no native bf16: AVX2-only CPUs; measured),
the plain bf16 kernels (mv, transposed, linear) multiply a prompt (8 rows or more) in fp32 from the bf16
weights: there a 128-token bf16 product is compute-bound and ~4x slower than converting the weight and
multiplying in fp32, while one decode token still streams the bf16 bytes (bf16_prompts_in_fp32).

Choosing a kernel (`choose_kernel`), in two steps:
  1. which can run: a kernel is available when a trial on a tiny layer runs and agrees with
     F.linear (`kernel_available`, once per process). No option ever takes a path the CPU cannot
     run; an option with no kernel left is refused in one line. compiled-mv's trial compiles, so it
     counts as available when its prerequisites are there (a C++ compiler, not Windows), is timed
     only for a long-running process (the server: compiled=True) whose model has layers worth timing,
     and takes its trial once it is the fastest.
  2. which is fastest: the available ones are timed on the model's own first layers (up to
     MEASURE_BYTES of weights, one token at a time, under MEASURE_SECONDS in all). Each kernel's best
     time is kept per machine and layer shapes (lmforge.machine), improved by the first MEASURE_LOADS
     loads and then trusted, so one load timed on a busy machine cannot fix a slow choice for good
     (background load only ever makes a kernel look slower, and the best of three loads rarely all are).
`pack_for_inference(..., kernel=NAME)` forces one (tests and benchmarks use it).

The model becomes inference-only: parameters of the swapped layers are no longer trainable
parameters, and the state dict changes, so load a fresh model to train or save.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
import time
import warnings
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LmforgeError

QUANTIZE = ("none", "bf16", "int8", "int8-dynamic")
KERNELS = {
    "none": ("onednn", "transposed", "linear", "compiled-mv"),
    "bf16": ("bf16-onednn", "bf16-mv", "bf16-transposed", "bf16-linear"),
    "int8": ("int8",),
    "int8-dynamic": ("int8-dynamic",),
}
PACK_MIN_WEIGHTS = 1 << 19  # fp32 layouts skip layers smaller than this (768 x 768 is repacked, 192 x 576 is not)
MEASURE_SECONDS = 0.4  # choosing among an option's kernels, on each of the first MEASURE_LOADS loads
MEASURE_LOADS = 3  # per machine and model shape: each kernel's best time over these loads decides, then it is kept
# of the model's fp32 weights timed for it: several times a CPU's last-level cache (32 MB on a 2-core EPYC VM), or
# a weight pass partly hits it: at 64 MB oneDNN and compiled-mv timed 2.99 vs 3.29 ms in one load, while in
# decode and at 128-256 MB compiled-mv was 10-25 % faster
MEASURE_BYTES = 128 << 20
# Part of the key under which kernel timings are kept per machine: raise it whenever a kernel's code changes,
# so machines time the kernels again instead of trusting timings of the old code (r2: bf16-mv's mv without
# oneDNN, the plain bf16 kernels' fp32 prompts; r3: compiled-mv added, each kernel timed over its own loads).
KERNELS_REVISION = "r3"
# compiled-mv takes inputs of up to this many rows (decode of a small batch): 48 GPT-2 body matrices took
# 14.5 / 15.1 / 15.6 / 32.9 ms for 1 / 2 / 4 / 8 rows, oneDNN 16.6 / 20.3 / 18.9 / 27.1 ms (2-core AMD EPYC)
COMPILED_MAX_ROWS = 4
# prompt_in_fp32 takes inputs of at least this many rows: under AVX2-only kernels a 3072 x 768 bf16 product
# of 4 rows took 0.45 ms against 0.57 ms converted to fp32, of 8 rows 0.90 against 0.69 ms (benchmarks/RESULTS.md)
FP32_PROMPT_MIN_ROWS = 8


class PackedLinear(nn.Module):
    """x W^T + b with W reordered once into oneDNN's blocked layout (fp32 or bf16)."""

    def __init__(self, linear: nn.Linear, dtype=torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.dtype = linear.in_features, linear.out_features, dtype
        self.out_dtype = None  # None: the input's dtype; pack_for_inference sets bf16 inside attention and MLP blocks
        self.packed = torch.ops.mkldnn._reorder_linear_weight(
            linear.weight.detach().to(dtype).contiguous(), 1
        )  # batch-size hint 1: decode
        self.bias = None if linear.bias is None else linear.bias.detach().to(dtype)

    @torch.compiler.disable  # an opaque oneDNN tensor: torch.compile runs this layer as it is
    def forward(self, x):
        # .default: the op itself, without the overload resolution of a call through its packet (per token, per layer)
        h = x.to(self.dtype).contiguous()
        y = torch.ops.mkldnn._linear_pointwise.default(h, self.packed, self.bias, "none", [], "")
        return y.to(self.out_dtype or x.dtype)


@contextmanager
def _aten_kernels():
    """Within: PyTorch's own CPU kernels instead of oneDNN's for products (torch.backends.mkldnn off; the flag
    is process-wide, restored on exit). For a bf16 matrix-vector product ATen's kernel streams the weights
    faster than oneDNN's: 48 GPT-2 body matrices in 5.5 ms with it, 15.2 ms through oneDNN and 7.7 ms through
    oneDNN's packed layout, on a 2-core AMD EPYC with AVX512-BF16 (benchmarks/RESULTS.md)."""
    enabled = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(enabled)


class DenseLinear(nn.Module):
    """x W^T + b with W stored in `dtype`, either as it is (out, in) through F.linear or transposed (in, out).

    matvec (the (out, in) layout only): one row x (..., in) with a single row, the decode step at batch 1,
    goes through torch.mv instead, PyTorch's own matrix-vector kernel (oneDNN off: _aten_kernels), then
    adds the bias; more rows (a prompt) through F.linear.
    Plain PyTorch ops, so every CPU runs it; bf16 weights halve the bytes each token reads.
    prompt_in_fp32: inputs of FP32_PROMPT_MIN_ROWS rows or more (a prompt; not a small decode batch, where
    converting the weights costs more than it saves) are multiplied in fp32, by the weights converted
    from `dtype` on the fly and the input rounded to `dtype` first: the same values as the `dtype` product,
    for CPUs where that product is slow (bf16_prompts_in_fp32).
    """

    def __init__(
        self,
        linear: nn.Linear,
        dtype=torch.float32,
        transposed: bool = False,
        matvec: bool = False,
        prompt_in_fp32: bool = False,
    ):
        super().__init__()
        if transposed and matvec:
            raise ValueError("matvec uses the (out, in) layout, not the transposed one")
        self.in_features, self.out_features, self.dtype = linear.in_features, linear.out_features, dtype
        self.transposed, self.matvec = transposed, matvec
        self.prompt_in_fp32 = prompt_in_fp32  # several rows: fp32 product of the rounded input and weights
        self.out_dtype = None  # None: the input's dtype; pack_for_inference sets bf16 inside attention and MLP blocks
        w = linear.weight.detach().to(dtype)
        self.register_buffer("weight", w.t().contiguous() if transposed else w.contiguous())  # (in, out) or (out, in)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(dtype))

    def forward(self, x):
        h = x.to(self.dtype)
        if self.matvec and h.numel() == self.in_features:  # one token of one row
            v = h.reshape(self.in_features)
            with _aten_kernels():  # mv, then the bias: its addmv with a bias is ~14x slower in bf16
                y = torch.mv(self.weight, v) if self.bias is None else torch.mv(self.weight, v).add_(self.bias)
            return y.view(*x.shape[:-1], self.out_features).to(self.out_dtype or x.dtype)
        if self.prompt_in_fp32 and h.numel() >= FP32_PROMPT_MIN_ROWS * self.in_features:  # a prompt, slow bf16
            w = self.weight.float()
            b = None if self.bias is None else self.bias.float()
            y = F.linear(h.float(), w.t() if self.transposed else w, b)
            return y.to(self.out_dtype or x.dtype)
        if not self.transposed:
            return F.linear(h, self.weight, self.bias).to(self.out_dtype or x.dtype)
        flat = h.reshape(-1, self.in_features)
        y = flat @ self.weight if self.bias is None else torch.addmm(self.bias, flat, self.weight)
        return y.view(*x.shape[:-1], self.out_features).to(self.out_dtype or x.dtype)


def _row_times_weight(weight: torch.Tensor, row: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """row (in,) @ weight (out, in)^T + bias -> (out,), written as the reduction torch.compile turns into one loop
    over the weight's rows, each read once (a decode token)."""
    return (weight * row).sum(-1) + bias


def _rows_times_weight(weight: torch.Tensor, rows: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """rows (R, in) @ weight (out, in)^T + bias -> (R, out), the same for a few rows: each weight row is read
    once for all R."""
    return ((weight[:, None, :] * rows[None]).sum(-1) + bias[:, None]).t().contiguous()


@functools.cache
def _compiled_products():
    """(one row, a few rows): _row_times_weight and _rows_times_weight compiled once per process for every
    shape (dynamic), CPU code from PyTorch's inductor. Two functions, so each keeps its own few compiled
    variants (one row is always a variant of its own) well under torch.compile's recompile limit."""
    # PyTorch's C++ builder warns on every first compile when a CUDA build of torch runs without CUDA (a CPU-only
    # machine): not something a user of lmforge can act on
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    return tuple(torch.compile(f, dynamic=True, fullgraph=True) for f in (_row_times_weight, _rows_times_weight))


class CompiledMatvecLinear(nn.Module):
    """x W^T + b, W in the usual (out, in) layout: up to COMPILED_MAX_ROWS rows (decode) through the product
    torch.compile generates for this CPU, more rows (a prompt) through oneDNN's product on the same weights
    (F.linear without oneDNN).

    Why: batch-1 decode streams every weight once per token, and the generated loop streams faster than the
    library kernels: 48 GPT-2 body matrices back to back in 12-15 ms against oneDNN's 15-18 ms (the same
    weights, alternating in one process), and GPT-2 decode at 1.64-2.39x transformers (median 2.05x over nine
    runs) against oneDNN's 1.45-1.79x in the same runs, on a 2-core AMD EPYC with AVX-512
    (benchmarks/decode_speed.py, benchmarks/RESULTS.md). For many rows the
    product is compute-bound and oneDNN's blocked kernel is faster (128 rows: 126 vs 273 ms); it reaches
    the same speed from the plain layout (133 ms), so one copy of the weights serves both.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features, self.dtype = linear.in_features, linear.out_features, torch.float32
        self.out_dtype = None
        self.register_buffer("weight", linear.weight.detach().float().contiguous())
        bias = torch.zeros(self.out_features) if linear.bias is None else linear.bias.detach().float()
        self.register_buffer("bias", bias)  # zeros without one: one compiled variant, the add is fused

    def forward(self, x):
        rows = x.reshape(-1, self.in_features).float()
        if len(rows) == 1:
            y = _compiled_products()[0](self.weight, rows[0], self.bias)
        elif len(rows) <= COMPILED_MAX_ROWS:
            y = _compiled_products()[1](self.weight, rows, self.bias)
        elif torch.backends.mkldnn.is_available():
            y = torch.ops.mkldnn._linear_pointwise.default(rows.contiguous(), self.weight, self.bias, "none", [], "")
        else:
            y = F.linear(rows, self.weight, self.bias)
        return y.view(*x.shape[:-1], self.out_features).to(self.out_dtype or x.dtype)


@functools.cache
def compiled_kernel_prerequisites() -> str | None:
    """None when torch.compile can build CPU code here (a C++ compiler on PATH, or $CXX; not Windows), else why
    not. Cheap: the real trial compiles (kernel_available)."""
    if sys.platform == "win32":
        return "torch.compile's CPU code is not used on Windows here"
    candidates = [os.environ["CXX"]] if os.environ.get("CXX") else ["c++", "g++", "clang++"]
    if not any(shutil.which(c) for c in candidates):
        return "no C++ compiler found (torch.compile needs one: install g++ or clang)"
    return None


class Int8Linear(nn.Module):
    """Weight-only int8: W ~ q * scale with one scale per output row; x stays in its own dtype."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        shape = x.shape
        y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]).float().contiguous(), self.qweight, self.scale)
        y = y.view(*shape[:-1], -1).to(x.dtype)
        return y if self.bias is None else y + self.bias


class DynamicInt8Linear(nn.Module):
    """int8 weights (one scale per output row) and activations quantised to int8 on the fly (fbgemm / oneDNN)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1).clamp(min=1e-12) / 127).double()
        with warnings.catch_warnings():  # deprecated in PyTorch; kernel_available guards their removal
            warnings.simplefilter("ignore")
            q = torch.quantize_per_channel(
                w, scale, torch.zeros(w.shape[0], dtype=torch.long), axis=0, dtype=torch.qint8
            )
            bias = None if linear.bias is None else linear.bias.detach().float()
            self.packed = torch.ops.quantized.linear_prepack(q, bias)

    @torch.compiler.disable
    def forward(self, x):
        return torch.ops.quantized.linear_dynamic.default(x.float().contiguous(), self.packed, True).to(x.dtype)


@functools.cache
def bf16_prompts_in_fp32() -> bool:
    """Whether the plain bf16 kernels multiply prompts in fp32: when this CPU's bf16 matrix multiplies are
    slower than its fp32 ones (`bf16_products_slower`, measured once per process, a few milliseconds).

    Under AVX2-only kernels (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 on an AMD EPYC) a 128-token prompt
    through a 3072 x 768 layer took 16.3 ms in bf16 and 4.0 ms in fp32 from the converted weights; with the
    CPU's native bf16 instructions, 1.7 ms in bf16 (benchmarks/RESULTS.md).
    """
    return bf16_products_slower()


def bf16_products_slower(rows: int = 128, width: int = 768, repeats: int = 3) -> bool:
    """True when a (rows, width) x (width, width) product takes longer in bf16 than in fp32 on this CPU, best
    of `repeats` each: a CPU without bf16 instructions (or a PyTorch build without their kernels) converts
    every element, several times slower; one with them is faster in bf16."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(rows, width, generator=g), torch.randn(width, width, generator=g)
    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        xd, wd = x.to(dtype), w.to(dtype)
        F.linear(xd, wd)  # first call: allocations, kernel selection
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            F.linear(xd, wd)
            times.append(time.perf_counter() - t)
        best[dtype] = min(times)
    return best[torch.bfloat16] > best[torch.float32]


# kernel -> (module built from an nn.Linear, or None to keep it; whether only layers >= PACK_MIN_WEIGHTS change)
_FACTORIES = {
    "onednn": (lambda lin: PackedLinear(lin, torch.float32), True),
    "transposed": (lambda lin: DenseLinear(lin, torch.float32, transposed=True), True),
    "linear": (None, True),
    "compiled-mv": (CompiledMatvecLinear, True),
    "bf16-onednn": (lambda lin: PackedLinear(lin, torch.bfloat16), False),
    "bf16-mv": (
        lambda lin: DenseLinear(lin, torch.bfloat16, matvec=True, prompt_in_fp32=bf16_prompts_in_fp32()),
        False,
    ),
    "bf16-transposed": (
        lambda lin: DenseLinear(lin, torch.bfloat16, transposed=True, prompt_in_fp32=bf16_prompts_in_fp32()),
        False,
    ),
    "bf16-linear": (lambda lin: DenseLinear(lin, torch.bfloat16, prompt_in_fp32=bf16_prompts_in_fp32()), False),
    "int8": (Int8Linear, False),
    "int8-dynamic": (DynamicInt8Linear, False),
}
_TRIAL_TOLERANCE = {"int8-dynamic": 0.1, "int8": 0.05}  # relative error on the trial layer; bf16 0.02, fp32 1e-4
# kernels whose trial compiles code (seconds): available on their prerequisites until they are to be used
_COMPILED = {"compiled-mv": compiled_kernel_prerequisites}


@functools.cache
def kernel_available(name: str) -> str | None:
    """None when this CPU and PyTorch build run kernel `name` correctly, else the reason it cannot (one line).

    Decided by running it once on a tiny layer and comparing with F.linear (cached for the process):
    feature flags alone cannot say whether a kernel is compiled in, or whether a build refuses a CPU.
    """
    make, _ = _FACTORIES[name]
    if make is None:
        return None
    if name.endswith("onednn") and not torch.backends.mkldnn.is_available():
        return "this PyTorch build has no oneDNN"
    if name in _COMPILED and (why := _COMPILED[name]()) is not None:
        return why
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(64, 48)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 64, generator=g) / 8)
        lin.bias.copy_(torch.randn(48, generator=g) / 8)
    x = torch.randn(3, 2, 64, generator=g)
    try:
        with torch.inference_mode(), warnings.catch_warnings():  # inference mode: as generation runs it
            warnings.simplefilter("ignore")
            layer = make(lin)
            got, want = layer(x), lin(x)
            one = layer(x[:1, :1])  # the decode shape: one row, one token
    except Exception as e:  # noqa: BLE001 - a kernel this build or CPU cannot run (compiled ones: any compile error)
        return (str(e).strip().splitlines() or [type(e).__name__])[0]
    tol = _TRIAL_TOLERANCE.get(name, 0.02 if name.startswith("bf16") else 1e-4)
    err = max(float((got - want).abs().max()), float((one - want[:1, :1]).abs().max())) / float(want.abs().max())
    if got.shape != want.shape or not err <= tol:
        return f"wrong results on this CPU (relative error {err:.2g})"
    return None


def available_kernels(quantize: str, tried: bool = True) -> list[str]:
    """The kernels of a --quantize option that run on this CPU, in order of preference. tried=False counts a
    kernel whose trial compiles code (compiled-mv) on its prerequisites alone, without compiling."""
    untried = () if tried else _COMPILED
    return [k for k in KERNELS[quantize] if (_COMPILED[k]() if k in untried else kernel_available(k)) is None]


def choose_kernel(quantize: str, model: nn.Module | None = None, log=None, compiled: bool = False) -> str:
    """The kernel pack_for_inference uses for an option on this CPU; LmforgeError when none can run here.

    With a model and several runnable kernels, the fastest for its layers on this machine: each kernel's
    best time over the first MEASURE_LOADS loads per machine and layer shapes (`measure_kernels`, under
    MEASURE_SECONDS each), cached by lmforge.machine; log (default stderr) gets one line when it measures.
    Without a model, the first runnable one. compiled: whether kernels that compile code (compiled-mv) are
    candidates. Worth it for a process that decodes many tokens (a server): the ~3 s it adds to every load
    is more than it saves on one generation (GPT-2 small: ~4 ms per token, so ~750 tokens to break even).
    """
    if quantize not in KERNELS:
        raise LmforgeError(f"unknown quantization {quantize!r} (choose from {', '.join(QUANTIZE)})")
    usable = [k for k in available_kernels(quantize, tried=False) if compiled or k not in _COMPILED]
    if not usable:
        raise LmforgeError(f"--quantize {quantize} cannot run on this CPU: {kernel_available(KERNELS[quantize][-1])}")
    layers = _sample_layers(model, _FACTORIES[usable[0]][1]) if model is not None else []
    if len(usable) == 1 or not layers:
        return _first_that_runs(quantize, usable)
    from .. import machine

    shapes = "+".join(dict.fromkeys(f"{lin.out_features}x{lin.in_features}" for lin in layers))
    key = f"decode_kernel_seconds/{KERNELS_REVISION}/{quantize}/{shapes}"
    kept = machine.read(key)
    if not _complete(kept, usable):
        (log or machine._stderr)(
            f"timing {', '.join(usable)} for --quantize {quantize} on this CPU (on the first {MEASURE_LOADS} loads "
            f"per machine and model shape, under {MEASURE_SECONDS:g} s"
            + (", plus compiling compiled-mv: seconds, ~10 s the first time" if "compiled-mv" in usable else "")
            + ")"
        )
        fresh = measure_kernels(usable, layers)
        kept = machine.update(key, lambda old: _merge_times(old, fresh))
    times = kept["seconds"]
    return _first_that_runs(quantize, sorted(usable, key=lambda k: times.get(k, float("inf"))))


def _first_that_runs(quantize: str, ranked: list[str]) -> str:
    """The first of `ranked` whose trial passes (a compiled kernel's trial compiles it only when it comes first)."""
    for k in ranked:
        if kernel_available(k) is None:
            return k
    raise LmforgeError(f"--quantize {quantize} cannot run on this CPU: {kernel_available(ranked[-1])}")


def _complete(kept, kernels: list[str]) -> bool:
    """Whether a cached timing entry has every kernel and MEASURE_LOADS loads behind it."""
    return (
        isinstance(kept, dict)
        and kept.get("loads", 0) >= MEASURE_LOADS
        and isinstance(kept.get("seconds"), dict)
        and all(k in kept["seconds"] for k in kernels)
    )


def _merge_times(old, fresh: dict) -> dict:
    """{"seconds": {kernel: best time}, "loads": n}: old's bests (if any) merged with a fresh measurement."""
    old = old if isinstance(old, dict) and isinstance(old.get("seconds"), dict) else {"seconds": {}, "loads": 0}
    seconds = dict(old["seconds"])
    for k, t in fresh.items():
        seconds[k] = min(t, seconds.get(k, float("inf")))
    return {"seconds": seconds, "loads": int(old.get("loads", 0)) + 1}


def _sample_layers(model: nn.Module, big_only: bool) -> list[nn.Linear]:
    """The model's first fp32 linear layers a kernel would replace, up to MEASURE_BYTES of weights."""
    out, total = [], 0
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu":
            if big_only and m.weight.numel() < PACK_MIN_WEIGHTS:
                continue
            if out and total + 4 * m.weight.numel() > MEASURE_BYTES:
                break
            out.append(m)
            total += 4 * m.weight.numel()
    return out


@torch.inference_mode()
def measure_kernels(kernels: list[str], layers: list[nn.Linear], seconds: float = MEASURE_SECONDS) -> dict:
    """{kernel: seconds for one batch-1 token through all `layers`}, best of several passes.

    Every kernel's layers are built first; then passes take turns, one per kernel, until `seconds`
    (building included) are spent, so background load slows all kernels alike and the best pass of
    each counts. Decode streams every weight once per token; with more weight bytes than the
    per-core caches hold, a pass measures that streaming rate, which is what decides the fastest kernel.
    """
    deadline = time.perf_counter() + seconds
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(1, 1, lin.in_features, generator=g) for lin in layers]
    built = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kernel in kernels:
            make = _FACTORIES[kernel][0]
            built[kernel] = [lin if make is None else make(lin) for lin in layers]
    best = dict.fromkeys(kernels, float("inf"))
    for passes in range(100):
        for kernel, mods in list(built.items()):
            t0 = time.perf_counter()
            try:
                for m, x in zip(mods, xs):
                    m(x)
            except Exception:  # noqa: BLE001 - a compiled kernel failing to compile here: never the fastest
                if kernel not in _COMPILED:
                    raise
                del built[kernel]
                continue
            if passes:  # the first pass warms up (first-call allocations, caches, a compiled kernel's compile)
                best[kernel] = min(best[kernel], time.perf_counter() - t0)
        if passes >= 2 and time.perf_counter() > deadline:
            break
    return best


def pack_for_inference(
    model: nn.Module, quantize: str | None = "none", kernel: str | None = None, log=None, compiled: bool = False
) -> nn.Module:
    """Swap the model's fp32 nn.Linear layers for the chosen CPU inference kernel (in place); returns the model.

    quantize: one of QUANTIZE (None = "none"). kernel: force one of KERNELS[quantize] instead of the
    fastest runnable one (choose_kernel; log gets its one line when it has to measure; compiled: whether
    compiled-mv may be chosen, for long-running processes such as the server). A model not on
    the CPU is left as it is for "none"; the other options are an error there, as is a forced kernel
    this CPU cannot run (LmforgeError, one line).
    """
    quantize = quantize or "none"
    if quantize not in QUANTIZE:
        raise LmforgeError(f"unknown quantization {quantize!r} (choose from {', '.join(QUANTIZE)})")
    if kernel is not None and kernel not in KERNELS[quantize]:
        raise LmforgeError(f"kernel {kernel!r} is not one of --quantize {quantize}'s: {', '.join(KERNELS[quantize])}")
    if not all(p.device.type == "cpu" for p in model.parameters()):
        if quantize == "none" and kernel is None:
            return model
        raise LmforgeError(
            f"--quantize {quantize} is for CPU inference (this model is on {next(model.parameters()).device})"
        )
    if kernel is None:
        kernel = choose_kernel(quantize, model, log, compiled)
    elif (why := kernel_available(kernel)) is not None:
        raise LmforgeError(f"kernel {kernel} cannot run on this CPU: {why}")
    make, big_only = _FACTORIES[kernel]
    model.eval()
    if make is None:
        return model
    # A small layer that stays in cache gains nothing from a new fp32 layout; reduced precision always pays.
    smallest = PACK_MIN_WEIGHTS if big_only else 0
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear) and child.weight.dtype == torch.float32 and child.weight.numel() >= smallest
    ]
    with torch.no_grad():
        for parent, name, child in targets:
            setattr(parent, name, make(child))
    if targets and kernel in _COMPILED:  # compile now, at load, not during the first tokens
        layer = getattr(targets[0][0], targets[0][1])
        with torch.inference_mode():
            for rows in (1, 2):  # one row, and several: two specialisations
                layer(torch.zeros(rows, layer.in_features))
    if quantize == "bf16":
        _bf16_inside_blocks(model)
    return model


def _bf16_inside_blocks(model: nn.Module) -> None:
    """Keep the projections' outputs in bf16 within each attention and MLP block of a bf16 model; the residual
    stream, the norms, the KV cache and attention over it, and the logits stay fp32.

    The projections of attention (qkv, proj) and of the MLP (up, gate, down) return bf16, which is what their
    bf16 products give before the cast back: so the MLP's activation runs in bf16 and the next projection takes
    its input without a conversion. The KV cache stays fp32 (the embeddings' dtype), so Attention.forward casts
    the queries to it and attends in fp32 through the cache (prompt and decode steps). That is faster: PyTorch's
    CPU attention kernel is 4-7x slower in bf16 than in fp32 for one query token on a CPU without AMX (131 vs
    30 us per layer over 192 cached positions, 691 vs 99 us over 1,024, on a 2-core AMD EPYC with AVX512-BF16;
    benchmarks/decode_attention.py), while the fp32 cache only adds the keys' and values' bytes, small next
    to the weights a step reads at these lengths. A block's output joins the fp32 residual stream in the add
    (type promotion), so the stream keeps fp32 precision; the only roundings added are of values that are
    already bf16 products (a projection's output) or about to be rounded for the next product anyway.
    """
    from ..models.layers import MLP, Attention

    for block in model.modules():
        if isinstance(block, (Attention, MLP)):
            for child in block.children():
                if isinstance(child, (PackedLinear, DenseLinear)) and child.dtype == torch.bfloat16:
                    child.out_dtype = torch.bfloat16
