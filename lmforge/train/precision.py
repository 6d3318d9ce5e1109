"""Throughput accounting: model FLOPs per token, peak FLOP/s of the device and MFU, precision choice.

A CPU's peak is measured, not looked up: `measure_cpu_peak` times square matrix products for about
half a second (whatever the CPU's speed), once per machine (lmforge.machine keeps the value and
shares it between processes and torchrun ranks). `PeakFlops` keeps MFU honest: a run that achieves
more than the stored peak re-measures it and raises it, so MFU never exceeds 100 %.
"""

from __future__ import annotations

import contextlib
import time

import torch

# Published dense peak FLOP/s by GPU name fragment and precision (tensor cores; fp32 = TF32 where available).
GPU_PEAKS = {
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "fp32": 183e12},
    "A10": {"bf16": 125e12, "fp16": 125e12, "fp32": 62.5e12},
    "4090": {"bf16": 165e12, "fp16": 165e12, "fp32": 82.6e12},
    "3090": {"bf16": 71e12, "fp16": 71e12, "fp32": 35.6e12},
    "V100": {"fp16": 125e12, "fp32": 15.7e12},
    "T4": {"fp16": 65e12, "fp32": 8.1e12},
}


def flops_per_token(cfg, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (matmul parameters) + attention scores and mixing (forward + backward).

    Matmul parameters are every weight matrix in the blocks plus the output head (position
    embeddings and the embedding lookup are not multiplies).
    """
    d, L = cfg.d_model, cfg.n_layer
    kv = cfg.kv_heads * cfg.head_dim
    attn = d * (d + 2 * kv) + d * d
    mlp = (3 if cfg.mlp in ("swiglu", "geglu") else 2) * d * cfg.ff_dim
    matmul_params = L * (attn + mlp) + d * cfg.vocab_size
    ctx = min(seq_len, cfg.sliding_window) if cfg.sliding_window else seq_len
    return 6 * matmul_params + 12 * L * d * ctx


PROBE_SECONDS = 0.5  # per precision: `--precision auto` and `lmforge bench matmul` measure fp32 and bf16
PROBE_MAX_N = 4096
BF16_INSTRUCTIONS = ("avx512_bf16", "amx_bf16")  # bf16 dot products in hardware; without them bf16 is emulated


def cpu_has_native_bf16(log=None) -> bool:
    """True when bf16 matrix multiplies are clearly faster than fp32 on this CPU.

    A CPU without bf16 dot-product instructions (BF16_INSTRUCTIONS) is answered from its flags;
    one with them is measured (once per machine, about 1 s, cached), because virtual machines may
    advertise instructions they emulate slowly.
    """
    from ..machine import cpu_features

    feats = cpu_features()
    if feats and not any(feats.get(f) for f in BF16_INSTRUCTIONS):
        return False
    peaks = cpu_peaks(("fp32", "bf16"), log)
    return bool(peaks["fp32"] and peaks["bf16"] and peaks["bf16"] > 1.5 * peaks["fp32"])


def choose_precision(requested: str, device: torch.device) -> str:
    """Resolve 'auto' to the fastest honest choice for the device (a first-time CPU measurement says so on stderr)."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and cpu_has_native_bf16():
        return "bf16"
    return "fp32"


def measure_cpu_peak(precision: str = "fp32", seconds: float = PROBE_SECONDS, matmul=torch.matmul) -> float:
    """Best matmul FLOP/s seen on this CPU in about `seconds`, with the current thread count.

    Square products from 64 x 64 up, doubling the size while the next size's first product is
    predicted (at the best rate so far, n^3 work) to end within the budget, so a CPU that emulates
    bf16 (hundreds of times slower) stops at small sizes instead of spending minutes. Each size is
    timed on up to 3 products and the fastest counts: background load only ever slows a product
    down. FLOPs of an n x n product: 2 n^3. matmul: injectable for tests.
    """
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    deadline = time.perf_counter() + seconds
    g = torch.Generator().manual_seed(0)
    best, n = 0.0, 64
    while True:
        a, b = (torch.randn(n, n, generator=g).to(dtype) for _ in range(2))
        for _ in range(3):
            t0 = time.perf_counter()
            matmul(a, b)
            dt = time.perf_counter() - t0
            best = max(best, 2 * n**3 / max(dt, 1e-9))
            if time.perf_counter() + dt > deadline:
                break
        n *= 2
        if n > PROBE_MAX_N or time.perf_counter() + 2 * n**3 / best > deadline:
            return best


def _peak_key(precision: str) -> str:
    return f"matmul_peak/{precision}"


def cpu_peaks(precisions=("fp32",), log=None, measure_if_missing: bool = True) -> dict[str, float | None]:
    """{precision: peak matmul FLOP/s} for this machine from the cache, measuring what is missing
    (about 0.5 s each, once per machine: concurrent processes wait for one measurement; lmforge.machine)."""
    from .. import machine

    if not measure_if_missing:
        return {p: machine.read(_peak_key(p)) for p in precisions}
    names = " and ".join(precisions)
    found = machine.measure_once(
        {_peak_key(p): (lambda p=p: measure_cpu_peak(p)) for p in precisions},
        f"measuring this CPU's {names} matmul peak (once per machine, about {len(precisions) * PROBE_SECONDS:.1f} s; "
        f"cached in {machine.cache_path()})",
        log,
    )
    return {p: found[_peak_key(p)] for p in precisions}


def cpu_peak_flops(precision: str = "fp32", measure_if_missing: bool = True, log=None) -> float | None:
    """The stored matmul peak of this machine for a precision, measuring (about 0.5 s) if there is none."""
    return cpu_peaks((precision,), log, measure_if_missing)[precision]


def store_cpu_peak(value: float, precision: str = "fp32") -> float:
    """Keep the larger of `value` and the stored peak (a peak is a maximum: a busy moment only lowers a
    measurement); returns the stored peak."""
    from .. import machine

    return machine.update(_peak_key(precision), lambda old: max(value, old or 0.0))


class PeakFlops:
    """The peak FLOP/s a run's MFU divides by. MFU = achieved / peak, never above 1.

    On a CPU the peak is measured, so a run can observe more than the stored value (measured on a
    busy moment, or by a probe cut short); the first time it does, the peak is measured again and
    the stored value becomes the larger of that and what the run achieved (later overshoots just
    raise it). Published GPU peaks are clipped at 100 %.
    """

    def __init__(self, device: torch.device, precision: str, log=None):
        self.device, self.precision, self.log = device, precision, log
        self.value = peak_flops(device, precision)
        self._remeasured = False

    def mfu(self, achieved: float) -> float | None:
        """Model FLOPs utilisation for `achieved` FLOP/s per device (None when the peak is unknown)."""
        if not self.value:
            return None
        if achieved > self.value and self.device.type == "cpu":
            remeasure, self._remeasured = not self._remeasured, True
            fresh = measure_cpu_peak(self.precision) if remeasure else 0.0
            old = self.value
            self.value = store_cpu_peak(max(achieved, fresh), self.precision)
            if remeasure:
                (self.log or print)(
                    f"note: this run reached {achieved / 1e9:,.1f} GFLOP/s, above the stored {self.precision} peak "
                    f"{old / 1e9:,.1f}; re-measured {fresh / 1e9:,.1f}, peak now {self.value / 1e9:,.1f} GFLOP/s"
                )
        return min(1.0, achieved / self.value)


def peak_flops(device: torch.device, precision: str, log=None) -> float | None:
    """Peak FLOP/s of the device at a precision: measured once per machine on a CPU, published for known GPUs."""
    if device.type == "cpu":
        return cpu_peak_flops(precision, log=log)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for frag, peaks in GPU_PEAKS.items():
            if frag in name:
                return peaks.get(precision)
    return None


def autocast_for(device: torch.device, precision: str):
    """A context-manager factory: autocast to bf16/fp16, or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)
