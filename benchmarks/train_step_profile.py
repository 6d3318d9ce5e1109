"""Where does the time of one training step go? torch.profiler over a few steps, grouped by kind of work.

    flock /tmp/lmforge-cpu.lock python benchmarks/train_step_profile.py --preset tiny --precision fp32
    flock /tmp/lmforge-cpu.lock python benchmarks/train_step_profile.py --preset gpt2-tiny --precision fp32

The step is the one `lmforge bench train` times (forward, loss, backward, clipping, optimizer step) on
random tokens. Self CPU time of every operator is summed into: matmul (mm/addmm/bmm and the linear
layers' backward, Muon's Newton-Schulz), attention (the SDPA kernels), loss (log-softmax / cross-entropy
over the vocabulary), norms, activations, optimizer (AdamW / Muon / clipping), embedding, and the rest
(copies, views, adds, RoPE's multiplies). Operators are grouped by name, so the shares are approximate.
"""

from __future__ import annotations

import argparse
import resource
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from lmforge import machine
from lmforge.config import preset
from lmforge.models import build_model
from lmforge.train.bench import bench_step
from lmforge.train.optim import build_optimizers
from lmforge.train.precision import autocast_for

KINDS = [  # (kind, substrings of operator names), first match wins
    ("attention", ("scaled_dot_product", "_flash_attention", "_efficient_attention")),
    (
        "matmul",
        ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear", "aten::_weight_int"),
    ),
    (
        "loss",
        (
            "log_softmax",
            "aten::_softmax",
            "aten::log",
            "nll_loss",
            "cross_entropy",
            "crossentropy",
            "softmax_backward",
            "logsumexp",
            "aten::exp",
            "gather",
            "aten::sub",
        ),
    ),
    ("norm", ("layer_norm", "rms_norm", "rsqrt", "aten::pow", "aten::mean", "aten::norm")),
    ("activation", ("gelu", "relu", "silu", "tanh", "threshold_backward", "aten::square")),
    ("optimizer", ("adam", "_foreach", "Optimizer", "newton", "lerp", "addcdiv", "sqrt", "clip")),
    ("embedding", ("embedding",)),
]


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k.lower() in low for k in keys):
            return kind
    return "other"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="tiny")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    machine.keep_freed_memory()  # as `lmforge train` does on a CPU (LMFORGE_KEEP_FREED_MEMORY=0: glibc's default)
    cfg = preset(args.preset)
    mc, tc = cfg.model, cfg.train
    dev = torch.device("cpu")
    torch.manual_seed(0)
    model = build_model(mc)
    opts = build_optimizers(model, tc, dev)
    autocast = autocast_for(dev, args.precision)
    x = torch.randint(0, mc.vocab_size, (tc.batch_size, mc.block_size + 1))
    batch = (x[:, :-1], x[:, 1:])
    model.train()
    for _ in range(3):
        bench_step(model, opts, batch, autocast, tc.grad_clip)
    # One profiler session per step: the profiler's own event records, kept across steps, fragment the heap, so
    # a later step's big buffers (the 64 MB log-softmax of `tiny`) land on fresh pages and pay page faults that
    # training without the profiler never pays (measured: the log-softmax grew 6.5 -> 100 ms over five steps of
    # one session). Each step's faults are printed, and the breakdown is that of the step with the fewest, as
    # a training step without the profiler takes about none (CPU training keeps freed memory for reuse).
    steps = []
    for _ in range(args.steps):
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            bench_step(model, opts, batch, autocast, tc.grad_clip)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
        steps.append((sum(e.self_cpu_time_total for e in events), faults, events))
    print("steps (self CPU ms / page faults): " + ", ".join(f"{t / 1e3:.0f} / {f}" for t, f, _ in steps))
    total, faults, events = min(steps, key=lambda s: s[1])
    by_kind = defaultdict(float)
    for e in events:
        by_kind[kind_of(e.key)] += e.self_cpu_time_total
    print(f"{args.preset} {args.precision}: {total / 1e3:.0f} ms, {faults} page faults (self CPU time of the step)")
    for kind, t in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:<11} {100 * t / total:5.1f} %  {t / 1e3:7.1f} ms")
    print(f"  matrix multiplication + attention: {100 * (by_kind['matmul'] + by_kind['attention']) / total:.1f} %")
    print(f"\ntop {args.top} operators by self CPU time:")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]:
        print(
            f"  {e.key:<50} {kind_of(e.key):<11} {100 * e.self_cpu_time_total / total:5.1f} %  "
            f"{e.self_cpu_time_total / 1e3:6.1f} ms {e.count:>4} calls"
        )


if __name__ == "__main__":
    main()
