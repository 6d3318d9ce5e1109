"""Throughput accounting: model FLOPs per token, peak FLOP/s of the device, precision choice."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from pathlib import Path

import torch

from ..errors import LmforgeError

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


def cpu_has_native_bf16() -> bool:
    """True when bf16 matrix multiplies are clearly faster than fp32 on this CPU, as measured here.

    CPU flags are not enough (virtual machines may advertise instructions they emulate slowly),
    so this compares the measured peaks; without native support bf16 is orders of magnitude slower.
    """
    fp32, bf16 = cpu_peak_flops("fp32"), cpu_peak_flops("bf16")
    return bool(fp32 and bf16 and bf16 > 1.5 * fp32)


def choose_precision(requested: str, device: torch.device) -> str:
    """Resolve 'auto' to the fastest honest choice for the device."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and cpu_has_native_bf16():
        return "bf16"
    return "fp32"


def _cache_file() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "lmforge" / "peak_flops.json"


def _machine_key() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}|threads={torch.get_num_threads()}|torch={torch.__version__}"


def measure_cpu_peak(precision: str = "fp32", seconds: float = 1.0) -> float:
    """Best matmul FLOP/s on this CPU with the current thread count (square matrices of a few sizes)."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    best = 0.0
    for n in (512, 1024, 2048):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        reps, t0 = 0, time.perf_counter()
        while True:
            a @ b
            reps += 1
            dt = time.perf_counter() - t0
            if dt > seconds / 3 or (reps >= 2 and dt > 0.05 and best > 0 and 2 * n**3 * reps / dt < best / 20):
                break  # enough samples (or hopelessly slow: emulated bf16 can take seconds per multiply)
        best = max(best, 2 * n**3 * reps / dt)
    return best


def cpu_peak_flops(precision: str = "fp32", measure_if_missing: bool = True) -> float | None:
    """The peak stored by `lmforge bench matmul` for this machine, measuring (about 1 s) if there is none."""
    path, key = _cache_file(), _machine_key() + f"|{precision}"
    try:
        stored = json.loads(path.read_text())
        if key in stored:
            return float(stored[key])
    except (OSError, json.JSONDecodeError, ValueError):
        stored = {}
    if not measure_if_missing:
        return None
    return store_cpu_peak(measure_cpu_peak(precision), precision)


def store_cpu_peak(value: float, precision: str = "fp32") -> float:
    from ..io import write_json_atomic

    path, key = _cache_file(), _machine_key() + f"|{precision}"
    try:
        stored = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        stored = {}
    stored[key] = value
    try:
        write_json_atomic(path, stored)
    except OSError:
        pass  # a read-only home is fine: we measure again next time
    return value


def peak_flops(device: torch.device, precision: str) -> float | None:
    if device.type == "cpu":
        return cpu_peak_flops(precision)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for frag, peaks in GPU_PEAKS.items():
            if frag in name:
                return peaks.get(precision)
    return None


def pick_device(name: str = "auto") -> torch.device:
    if name != "auto":
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise LmforgeError("device cuda requested but CUDA is not available")
        if name == "mps" and not torch.backends.mps.is_available():
            raise LmforgeError("device mps requested but MPS is not available")
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast_for(device: torch.device, precision: str):
    """A context-manager factory: autocast to bf16/fp16, or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)
