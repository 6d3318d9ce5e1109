"""`lmforge bench`: measured numbers for this machine (peak matmul FLOP/s, training throughput)."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import machine
from ..config import preset
from ..errors import LmforgeError
from ..models import build_model
from ..models.loss import token_cross_entropy
from .optim import build_optimizers
from .precision import (
    PROBE_SECONDS,
    PeakFlops,
    autocast_for,
    choose_precision,
    flops_per_token,
    measure_cpu_peak,
    store_cpu_peak,
)


def bench_matmul(log=print) -> dict:
    """Measure the fp32 and bf16 matmul peaks (about PROBE_SECONDS each) and keep the best ever seen for MFU.

    Returns {precision: {"measured": FLOP/s now, "stored": the peak kept for this machine}}.
    """
    from ..machine import cache_path, describe_cpu

    log(f"measuring fp32 and bf16 matmul peaks, about {2 * PROBE_SECONDS:.0f} s ({describe_cpu()})")
    out = {}
    for precision in ("fp32", "bf16"):
        measured = measure_cpu_peak(precision)
        stored = store_cpu_peak(measured, precision)
        out[precision] = {"measured": measured, "stored": stored}
        kept = "" if stored <= measured else f" (kept the stored {stored / 1e9:,.1f}: measured at a quieter moment)"
        log(f"{precision} matmul peak: {measured / 1e9:,.1f} GFLOP/s{kept}")
    log(f"stored for MFU in {cache_path()}")
    return out


def load_reference():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "reference_gpt.py"
    if not path.is_file():
        raise LmforgeError(f"the reference implementation is not here ({path}); run bench from a source checkout")
    spec = importlib.util.spec_from_file_location("reference_gpt", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def bench_step(model, optimizers, batch, autocast, grad_clip: float = 1.0, loss_fn=token_cross_entropy) -> torch.Tensor:
    """One training step as `lmforge train` takes it: forward, loss, backward, clipping, optimizer step.

    batch is (inputs, targets), both (B, T) token ids; loss_fn(logits (N, V), targets (N,)) is lmforge's
    cross-entropy, or F.cross_entropy for the textbook reference. Returns the loss (not synchronised).
    """
    inp, tgt = batch
    with autocast():
        logits = model(inp)
    loss = loss_fn(logits.float().view(-1, logits.size(-1)), tgt.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    for opt in optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss


def _time_steps(
    model,
    optimizers,
    batch_size,
    seq_len,
    vocab,
    device,
    autocast,
    steps,
    warmup,
    grad_clip=1.0,
    loss_fn=token_cross_entropy,
):
    """Seconds per optimizer step, after warmup steps, on random tokens."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (batch_size, seq_len + 1), generator=g).to(device)
    batch = (x[:, :-1], x[:, 1:])
    model.train()
    for _ in range(warmup):
        bench_step(model, optimizers, batch, autocast, grad_clip, loss_fn)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = bench_step(model, optimizers, batch, autocast, grad_clip, loss_fn)
    loss.item()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def bench_train(
    preset_name: str = "tiny",
    steps: int = 10,
    warmup: int = 3,
    rounds: int = 3,
    batch_size: int | None = None,
    seq_len: int | None = None,
    compile: bool = False,
    precision: str = "auto",
    ref_precision: str = "fp32",
    device: str = "auto",
    log=print,
) -> dict:
    """Steady-state training tokens/s and MFU of lmforge and of the textbook reference, interleaved, same sizes.

    lmforge runs as `lmforge train` would (its precision choice, optimizer split); the reference is
    the textbook fp32 setup unless ref_precision says otherwise. On a CPU both run in this one process with
    the allocator setting `lmforge train` uses (machine.keep_freed_memory), so the ratio compares the steps
    themselves; LMFORGE_KEEP_FREED_MEMORY=0 measures both without it.
    """
    cfg = preset(preset_name)
    mcfg, tcfg = cfg.model, cfg.train
    dev = machine.pick_device(device)
    kept = dev.type == "cpu" and machine.keep_freed_memory()
    precision = choose_precision(precision, dev)
    ref_precision = choose_precision(ref_precision, dev)
    B = batch_size or tcfg.batch_size
    T = seq_len or mcfg.block_size
    autocast = autocast_for(dev, precision)
    ref_autocast = autocast_for(dev, ref_precision)
    ref_mod = load_reference()
    torch.manual_seed(0)
    ours = build_model(mcfg).to(dev)
    ours_opts = build_optimizers(ours, tcfg, dev)
    ours_fwd = torch.compile(ours) if compile else ours
    ref, ref_opt = ref_mod.build(mcfg)
    ref = ref.to(dev)
    flops = flops_per_token(mcfg, T)
    peaks = {"lmforge": PeakFlops(dev, precision, log), "reference": PeakFlops(dev, ref_precision, log)}
    times = {"lmforge": [], "reference": []}
    for _ in range(rounds):  # interleave so background load hits both alike
        times["lmforge"].append(_time_steps(ours_fwd, ours_opts, B, T, mcfg.vocab_size, dev, autocast, steps, warmup))
        times["reference"].append(
            _time_steps(
                ref, [ref_opt], B, T, mcfg.vocab_size, dev, ref_autocast, steps, warmup, loss_fn=F.cross_entropy
            )
        )
        warmup = 1
    out = {
        "preset": preset_name,
        "batch": B,
        "seq_len": T,
        "precision": precision,
        "ref_precision": ref_precision,
        "device": str(dev),
        "compile": compile,
    }
    for name, ts in times.items():
        best = min(ts)
        tps = B * T / best
        out[name] = {"tokens_per_s": tps, "mfu": peaks[name].mfu(tps * flops), "step_s": best}
    out["ratio"] = out["lmforge"]["tokens_per_s"] / out["reference"]["tokens_per_s"]
    compiled = ", compiled" if compile else ""
    memory = ", freed memory kept for reuse" if kept else ""
    log(
        f"bench train: preset {preset_name}, batch {B} x {T}, {dev}{compiled}{memory}; best of {rounds} x {steps} steps"
    )
    for name, prec in (("lmforge", precision), ("reference", ref_precision)):
        r = out[name]
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        log(
            f"  {name:<10} {prec:<5} {r['tokens_per_s']:>10,.0f} tok/s   MFU {mfu:>6} (of the {prec} peak)   "
            f"{1000 * r['step_s']:.0f} ms/step"
        )
    log(f"  ratio      {out['ratio']:.2f}x")
    return out
