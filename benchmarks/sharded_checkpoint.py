"""Sharded (DCP) against gathered checkpoints of an FSDP model: save time, peak gathering and sizes.

    torchrun --nproc_per_node 2 benchmarks/sharded_checkpoint.py [--preset gpt2] [--out /tmp/ckpt-bench]

Both saves hold AdamW state after one step. "gathered" is what a sharded run would do without DCP: every
parameter and optimizer tensor gathered to full size on every rank, rank 0 writes one file. Prints seconds
per save (rank 0's wall clock, including hashing for the manifest) and the bytes on disk.
"""

import argparse
import shutil
import time
from pathlib import Path

import torch

from lmforge.config import preset
from lmforge.models import build_model
from lmforge.train.checkpoint import save_checkpoint, save_sharded_checkpoint
from lmforge.train.distributed import init_distributed, shutdown, wrap
from lmforge.train.optim import build_optimizers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--out", default="/tmp/ckpt-bench")
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args()
    info = init_distributed("cpu")
    cfg = preset(args.preset)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    parallel = wrap(model, "fsdp", info, torch.device("cpu"))
    opts = build_optimizers(model, cfg.train, torch.device("cpu"))
    x = torch.randint(0, cfg.model.vocab_size, (1, args.seq))
    t0 = time.perf_counter()
    parallel.parallel_model(x).float().square().mean().backward()
    for o in opts:
        o.step()
        o.zero_grad()
    step_s = time.perf_counter() - t0
    out = Path(args.out)
    if parallel.is_main:
        shutil.rmtree(out, ignore_errors=True)
    parallel.barrier()
    state = {"step": 1, "tokens": 0, "elapsed": 0.0, "rng": {}}
    times = {}
    for kind in ("sharded", "gathered"):
        parallel.barrier()
        t0 = time.perf_counter()
        run = out / kind
        if kind == "sharded":
            save_sharded_checkpoint(run, model, opts, dict(state), parallel, keep=1)
        else:
            full = {**state, "optimizers": [parallel.full_optimizer_state(o) for o in opts]}
            fm = parallel.full_model()
            if parallel.is_main:
                save_checkpoint(run, fm, full, keep=1)
            parallel.barrier()
        times[kind] = time.perf_counter() - t0
    if parallel.is_main:
        n = sum(p.numel() for p in model.parameters())  # DTensor numel: the global size
        print(
            f"{args.preset}: {n / 1e6:.0f}M parameters (FSDP over {info.world}); one step (1x{args.seq}) {step_s:.1f}s"
        )
        for kind, t in times.items():
            files = sorted(p for p in (out / kind / "checkpoints" / "step_0000001").iterdir())
            size = sum(p.stat().st_size for p in files)
            listing = ", ".join(f"{p.name} {p.stat().st_size / 1e6:.0f} MB" for p in files)
            print(f"{kind:>9}: save {t:.1f}s, {size / 1e6:.0f} MB ({listing})")
    shutdown(info)


if __name__ == "__main__":
    main()
