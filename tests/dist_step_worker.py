"""Run by test_train_step under torchrun (2 processes, gloo): one train_step per parallel kind.

Rank r accumulates micro-batches 2r and 2r + 1 of DIR/micro.pt; rank 0 writes DIR/{ddp,fsdp}.pt with the
step's logged loss, its token count and the full weights after the step.
"""

import sys
from pathlib import Path

import torch
from test_train_step import ListTask, sgd, tiny_model

from lmforge.train.distributed import init_distributed, shutdown, wrap
from lmforge.train.loop import Setup, train_step


def main(out: Path) -> None:
    info = init_distributed("cpu")
    assert info.world == 2
    micro = torch.load(out / "micro.pt", weights_only=True)["micro"]
    mine = micro[2 * info.rank : 2 * info.rank + 2]
    for kind in ("ddp", "fsdp"):
        model = tiny_model()
        parallel = wrap(model, kind, info, torch.device("cpu"))
        setup = Setup(model, [sgd(model)], accum=2, parallel=parallel)
        res = train_step(setup, ListTask(mine), None, 1.0)
        loss = parallel.sum(res.loss).item()  # what the loop logs
        weights = {k: v.clone() for k, v in parallel.full_model().state_dict().items()}
        if info.is_main:
            torch.save({"loss": loss, "tokens": res.tokens, "weights": weights}, out / f"{kind}.pt")
        parallel.barrier()
    shutdown(info)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
