"""This machine: what its CPU can do, and a cache of what was measured on it.

Some choices need a measurement (the matmul peak that MFU divides by, whether bf16 is native,
the fastest decode kernel). Each is taken once per machine, bounded to about a second, and kept
in one JSON file, `$XDG_CACHE_HOME/lmforge/machine.json` (default `~/.cache/lmforge/`), under a key
naming the CPU model, the thread count and the PyTorch version:

    {"<cpu>|threads=2|torch=2.x": {"matmul_peak/fp32": 1.4e11, "decode_kernel/bf16": "bf16-onednn", ...}}

Processes share it. `measure_once` takes the measurement under an exclusive lock on
`machine.json.lock` and reads the file again once it holds the lock, so when torchrun starts
four ranks together one of them measures (and says so, in one line) while the others wait and
then read its result. Writes are atomic (a temporary file renamed over the old one). Without a
writable cache directory, or without `fcntl` (Windows), every process measures for itself.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from .errors import LmforgeError

# CPU features that decide which matmul kernels exist: bf16 dot products (avx512_bf16, amx_bf16),
# the AVX-512 subsets oneDNN's packed bf16 path needs (avx512_bw/vl/dq, or avx_ne_convert), int8 dot products.
FEATURES = (
    "avx2",
    "avx512_f",
    "avx512_bw",
    "avx512_vl",
    "avx512_dq",
    "avx512_bf16",
    "amx_bf16",
    "avx_ne_convert",
    "avx512_vnni",
    "avx_vnni",
    "amx_int8",
)
LOCK_WAIT_SECONDS = 120.0  # a process waiting for another's measurement gives up after this and measures itself


def cpu_features() -> dict[str, bool]:
    """{feature: present} for FEATURES, as PyTorch's CPU detection (cpuinfo) reports them; {} when unknown."""
    import torch

    get = getattr(torch.cpu, "get_capabilities", None)
    if get is not None:
        try:
            caps = get()
            return {f: bool(caps.get(f, False)) for f in FEATURES}
        except Exception:  # an unusual build or platform: fall back to the kernel's flag list
            pass
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    linux_names = {"avx512_f": "avx512f", "avx512_bw": "avx512bw", "avx512_vl": "avx512vl", "avx512_dq": "avx512dq"}
    return {f: linux_names.get(f, f) in flags for f in FEATURES}


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
_kept_freed_memory: bool | None = None  # keep_freed_memory's result, once called


def keep_freed_memory() -> bool:
    """Make the C allocator keep freed memory for the process to reuse: glibc's mallopt with an mmap threshold
    of 1 GiB (a big tensor comes from the heap instead of a fresh mapping) and no heap trimming. Returns whether
    it took effect; once per process; LMFORGE_KEEP_FREED_MEMORY=0 turns it off (to measure what it gains).

    Why: by default glibc maps every allocation above an adaptive threshold (128 KiB to 32 MiB) afresh and
    returns freed heap memory to the system, so a CPU training step's new activations, gradients and logits
    arrive as untouched pages, and the kernel zero-fills each on its first write: about 48,000 page faults
    (190 MB) per step of the `tiny` preset. Kept for reuse, they cost nothing: `lmforge train` of `tiny` in
    fp32 ran 5-13 % more tokens/s (three alternating pairs, benchmarks/RESULTS.md), and peak memory stayed
    within 3 %, since a steady training step frees what the next one allocates. The same advice as
    PyTorch's CPU performance guide (a caching allocator such as jemalloc or tcmalloc), without preloading a
    library. Process-wide; a no-op (False) off Linux or without glibc.
    """
    global _kept_freed_memory
    if _kept_freed_memory is None:
        _kept_freed_memory = False
        if sys.platform.startswith("linux") and os.environ.get("LMFORGE_KEEP_FREED_MEMORY", "1") != "0":
            try:
                mallopt = ctypes.CDLL(None).mallopt  # the C library this process already uses
            except (OSError, AttributeError):  # no mallopt: not glibc
                mallopt = None
            if mallopt is not None and platform.libc_ver()[0] == "glibc":
                mmap_ok = mallopt(M_MMAP_THRESHOLD, 1 << 30) == 1
                _kept_freed_memory = mmap_ok and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    return _kept_freed_memory


def pick_device(name: str = "auto"):
    """The torch.device a --device value names: "auto" (CUDA, else MPS, else the CPU), "cpu", "cuda", "cuda:N",
    "mps". LmforgeError (one line) for a name torch does not know, or a device this machine does not have."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise LmforgeError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise LmforgeError(f"device {name} requested but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise LmforgeError(f"device {name} requested but this machine has {torch.cuda.device_count()} CUDA devices")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise LmforgeError(f"device {name} requested but MPS is not available")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise LmforgeError(f"device {name} is not supported by lmforge: use auto, cpu, cuda, cuda:N or mps")
    return device


def cpu_name() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name


def describe_cpu() -> str:
    """One line: model name, the matmul-relevant features present, threads (e.g. for benchmark output)."""
    import torch

    feats = cpu_features()
    have = [f for f, on in feats.items() if on] if feats else ["features unknown"]
    return f"{cpu_name()}: {' '.join(have) or 'no AVX2'}; {torch.get_num_threads()} threads"


def machine_key() -> str:
    import torch

    return f"{cpu_name()}|threads={torch.get_num_threads()}|torch={torch.__version__}"


def cache_path() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "lmforge" / "machine.json"


def _read_all(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read(name: str):
    """The value cached for this machine under `name`, or None."""
    entry = _read_all(cache_path()).get(machine_key())
    return entry.get(name) if isinstance(entry, dict) else None


def _write(values: dict) -> None:
    """Merge values into this machine's entry (call with the lock held); a read-only cache is ignored."""
    from .io import write_json_atomic

    path = cache_path()
    data = _read_all(path)
    entry = data.get(machine_key())
    entry = dict(entry) if isinstance(entry, dict) else {}
    entry.update(values)
    data[machine_key()] = entry
    try:
        write_json_atomic(path, data)
    except OSError:
        pass  # measured again next time


@contextmanager
def locked():
    """Hold the cache's exclusive lock (shared by this user's processes); yields even where locking is impossible."""
    path = cache_path().with_name("machine.json.lock")
    try:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except (ImportError, OSError):
        yield
        return
    try:
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        held = False
        while not held:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = True
            except BlockingIOError:
                if time.monotonic() > deadline:
                    break  # someone holds it far too long: go on without it
                time.sleep(0.02)
            except OSError:
                break  # a file system without locks
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def measure_once(measures: dict[str, Callable[[], object]], note: str, log: Callable[[str], None] | None = None):
    """{name: value} for every name, measuring (with the lock held) only those not cached yet.

    note: one line saying what is being measured, logged (default: stderr) only when something is.
    """
    found = {name: read(name) for name in measures}
    if all(v is not None for v in found.values()):
        return found
    with locked():
        found = {name: read(name) for name in measures}  # another process may have measured while we waited
        missing = [name for name, v in found.items() if v is None]
        if missing:
            (log or _stderr)(note)
            fresh = {name: measures[name]() for name in missing}
            _write(fresh)
            found.update(fresh)
    return found


def update(name: str, fn: Callable[[object], object]):
    """Replace the cached value v of `name` by fn(v) (v None when missing), under the lock; returns the new value."""
    with locked():
        value = fn(read(name))
        _write({name: value})
    return value
