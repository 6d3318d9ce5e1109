"""Tokens/s of chat fine-tuning vs pretraining: the same model, the same step, taking turns.

    python benchmarks/finetune_speed.py runs/tiny --demo colors --rounds 10 --steps 5

Builds the two tasks the training loop would build for RUN -- pretraining (`LMTask` on the run's own
shards) and fine-tuning (`SFTTask` on a built-in chat demo, the run's weights, lmforge's template) --
and times `train_step` (forward, backward, clipping, optimizer step, the loop's own code) on each in
turns, `steps` steps a turn, so background load hits both alike. Both use the run's model, precision
and 16 rows of up to seq_len tokens per micro-batch; the fine-tuning rows hold packed conversations
(cut to the longest in the batch), with attention reset at each conversation.

Two rates per task, the best turn of each, and the ratios fine-tuning / pretraining (the median over rounds of
the ratio of two neighbouring turns, which background load hits about alike):
    processed tok/s   input positions the model runs on per second (the compute rate)
    trained tok/s     positions whose prediction is in the loss (what `lmforge train` / `finetune` log as tok/s;
                      pretraining trains on every position, fine-tuning on the assistant's tokens only)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lmforge.config import finetune_config
from lmforge.data.chat_data import ChatSource
from lmforge.runs import load_config
from lmforge.train.distributed import DistInfo
from lmforge.train.loop import start, train_step
from lmforge.train.precision import cpu_has_native_bf16
from lmforge.train.tasks import LMTask, SFTTask


class Counting:
    """A task whose loss also counts the input positions it ran on."""

    def __init__(self, task):
        self.task, self.positions = task, 0

    def __getattr__(self, name):
        return getattr(self.task, name)

    def loss(self, model, batch):
        self.positions += batch[0].numel()
        return self.task.loss(model, batch)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a pretrained decoder run (lmforge train)")
    p.add_argument("--demo", default="colors")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per turn")
    args = p.parse_args()
    run = Path(args.run)
    quiet = lambda *_: None  # noqa: E731
    device = torch.device("cpu")
    base_cfg = load_config(run)
    ft_cfg = finetune_config(base_cfg)
    ft_cfg.train.precision = base_cfg.train.precision
    ft_cfg.train.seq_len = base_cfg.train.seq_len
    tasks = {"pretraining": LMTask(base_cfg, run, None, resume=True, cache_root=None, log=quiet)}
    with tempfile.TemporaryDirectory() as tmp:
        tasks["fine-tuning"] = SFTTask(ft_cfg, Path(tmp), ChatSource(run, demo=args.demo), False, log=quiet)
        setups = {}
        for name, task in tasks.items():
            cfg = base_cfg if name == "pretraining" else ft_cfg
            setup, _ = start(cfg, task, Path(tmp), False, device, DistInfo(), quiet)
            setup.accum = 1  # one micro-batch of 16 rows per step for both
            setups[name] = (setup, Counting(task), torch.Generator().manual_seed(0))
        for setup, task, gen in setups.values():  # warm up
            train_step(setup, task, gen, 1.0)
        best = {name: (0.0, 0.0) for name in setups}
        ratios = []  # per round: fine-tuning's rates / pretraining's, (processed, trained)
        for _ in range(args.rounds):
            rates = {}
            for name, (setup, task, gen) in setups.items():
                task.positions, trained = 0, 0
                began = time.perf_counter()
                for _ in range(args.steps):
                    trained += train_step(setup, task, gen, 1.0).tokens
                seconds = time.perf_counter() - began
                rates[name] = (task.positions / seconds, trained / seconds)
                best[name] = max(best[name], rates[name])
            (pp, pt), (fp, ft) = rates["pretraining"], rates["fine-tuning"]
            ratios.append((fp / pp, ft / pt))
    cpu = "native bf16" if cpu_has_native_bf16() else "no native bf16"
    print(f"{run}: {setups['pretraining'][0].precision}, CPU with {cpu}, {torch.get_num_threads()} thread(s)")
    print("| task | processed tok/s | trained tok/s |")
    print("|---|---|---|")
    for name, (processed, trained) in best.items():
        print(f"| {name} | {processed:,.0f} | {trained:,.0f} |")
    processed, trained = (statistics.median(r) for r in zip(*ratios))
    print(
        f"fine-tuning / pretraining, median of {len(ratios)} rounds: processed {processed:.2f}x, trained {trained:.2f}x"
    )


if __name__ == "__main__":
    main()
