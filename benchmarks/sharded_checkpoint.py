"""Sharded (DCP) checkpoints of an FSDP model: what a save costs a training run, synchronous vs asynchronous,
and how big it is, against a gathered (full-state) save.

    torchrun --nproc_per_node 2 benchmarks/sharded_checkpoint.py [--preset gpt2] [--steps 12] [--every 4]

Three timed runs of the same training steps (AdamW, batch 1 x --seq tokens per rank, in one process per rank):
- "none": no checkpoint, the baseline;
- "sync": a sharded save every --every steps (`ShardedCheckpointer(asynchronous=False)`: every rank writes and
  hashes its shards, rank 0 writes the manifest and renames, before training goes on);
- "async": the same saves in the background (`asynchronous=True`: DCP `async_save` stages a host copy and
  writes while training continues; a save counts once `wait` has finished it).
The runs' wall clocks include waiting for the last save, so "cost per save" = (run - baseline) / saves is
everything a save takes from training, including the CPU its background threads take from the training
threads on the same cores. The three runs are repeated --rounds times in rotating order; medians are printed,
with every round's figure beside them (on a shared machine a single round can be off by seconds).
Then one gathered save (every parameter and optimizer tensor gathered to full size on every rank, rank 0
writes one file; what a sharded run would do without DCP) is timed for comparison, and the sizes on disk
of both kinds are printed.
"""

import argparse
import shutil
import statistics
import time
from pathlib import Path

import torch

from lmforge.config import preset
from lmforge.models import build_model
from lmforge.train.checkpoint import ShardedCheckpointer, save_checkpoint
from lmforge.train.distributed import init_distributed, shutdown, wrap
from lmforge.train.optim import build_optimizers


def _dir_listing(ckpt: Path) -> tuple[int, str]:
    files = sorted(p for p in ckpt.iterdir())
    size = sum(p.stat().st_size for p in files)
    return size, ", ".join(f"{p.name} {p.stat().st_size / 1e6:.0f} MB" for p in files if p.stat().st_size > 1e6)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--out", default="/tmp/ckpt-bench")
    ap.add_argument("--seq", type=int, default=128, help="tokens per rank per step")
    ap.add_argument("--steps", type=int, default=12, help="training steps per timed run")
    ap.add_argument("--every", type=int, default=4, help="a save every this many steps")
    ap.add_argument("--rounds", type=int, default=3, help="repetitions of the three runs (medians are printed)")
    args = ap.parse_args()
    info = init_distributed("cpu")
    cfg = preset(args.preset)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    parallel = wrap(model, "fsdp", info, torch.device("cpu"))
    opts = build_optimizers(model, cfg.train, torch.device("cpu"))
    gen = torch.Generator().manual_seed(info.rank)
    out = Path(args.out)
    if parallel.is_main:
        shutil.rmtree(out, ignore_errors=True)
    parallel.barrier()

    def step():
        x = torch.randint(0, cfg.model.vocab_size, (1, args.seq), generator=gen)
        parallel.parallel_model(x).float().square().mean().backward()
        for o in opts:
            o.step()
            o.zero_grad()

    step()  # warm-up: optimizer state exists from here on, so every save holds model + AdamW state
    walls, stalls, saves = {}, {}, {}  # mode -> [per round]
    modes = ["none", "sync", "async"]
    order = [modes[(r + i) % 3] for r in range(args.rounds) for i in range(3)]  # rotating
    for mode in order:
        parallel.barrier()
        run_dir = out / mode
        stall, n = 0.0, 0
        t0 = time.perf_counter()
        with ShardedCheckpointer(parallel, asynchronous=mode == "async", log=lambda *_: None) as ckpt:
            for i in range(1, args.steps + 1):
                step()
                if mode != "none" and i % args.every == 0:
                    s0 = time.perf_counter()
                    ckpt.save(run_dir, model, opts, {"step": i, "tokens": 0, "elapsed": 0.0, "rng": {}}, keep=1)
                    stall += time.perf_counter() - s0
                    n += 1
        parallel.barrier()
        walls.setdefault(mode, []).append(time.perf_counter() - t0)
        stalls.setdefault(mode, []).append(stall)
        saves[mode] = n
    # one gathered save, for comparison
    parallel.barrier()
    t0 = time.perf_counter()
    full = {"step": 1, "tokens": 0, "elapsed": 0.0, "rng": {}}
    full["optimizers"] = [parallel.full_optimizer_state(o) for o in opts]
    fm = parallel.full_model()
    if parallel.is_main:
        save_checkpoint(out / "gathered", fm, full, keep=1)
    parallel.barrier()
    gathered_s = time.perf_counter() - t0
    if parallel.is_main:
        n = sum(p.numel() for p in model.parameters())  # DTensor numel: the global size
        med = {m: statistics.median(v) for m, v in walls.items()}
        base = med["none"] / args.steps
        print(
            f"{args.preset}: {n / 1e6:.0f}M parameters, FSDP over {info.world} processes of "
            f"{torch.get_num_threads()} thread(s); {args.steps} steps of 1 x {args.seq} tokens per rank, "
            f"a save every {args.every}; baseline {base:.2f} s/step; medians of {args.rounds} rounds"
        )
        print("| saves | run wall (s) | s/step | cost per save (s) | training blocked in save() per save (s) |")
        print("|---|---|---|---|---|")
        for mode in modes:
            k = saves[mode]
            each = ", ".join(f"{w:.1f}" for w in walls[mode])
            cost = f"{(med[mode] - med['none']) / k:.2f}" if k else ""
            blocked = f"{statistics.median(stalls[mode]) / k:.2f}" if k else ""
            print(f"| {mode} | {med[mode]:.1f} ({each}) | {med[mode] / args.steps:.2f} | {cost} | {blocked} |")
        size, listing = _dir_listing(next((out / "async" / "checkpoints").glob("step_*")))
        print(f"sharded checkpoint: {size / 1e6:.0f} MB on disk ({listing})")
        gsize, glisting = _dir_listing(next((out / "gathered" / "checkpoints").glob("step_*")))
        print(f"gathered checkpoint: {gsize / 1e6:.0f} MB ({glisting}); one gathered save {gathered_s:.1f} s")
    shutdown(info)


if __name__ == "__main__":
    main()
