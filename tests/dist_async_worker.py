"""Run by test_sharded_checkpoints under torchrun (2 processes, gloo, FSDP, async_checkpoint): a new run checkpointed
in the background every 2 steps, killed (an OSError on every rank) at step 7 while the save of step 6 is in flight.

Checked here, on every rank:
- a background save starts only once the previous one counts: no other temporary directory, its checkpoint in place;
- the background write of step 2 is held back until step 3 has changed the weights, and a synchronous DCP save of
  the same state at the same moment goes to RUN-reference/ (the test compares the two);
- the write of step 6 is held until the run dies in step 7: it is in flight at the crash.
"""

import functools
import os
import re
import sys
import threading
from pathlib import Path

import torch.distributed.checkpoint as dcp
from test_sharded_checkpoints import async_config
from torch.distributed.checkpoint import state_dict_saver

from lmforge.train import loop


def _step(checkpoint_id) -> int:
    return int(re.search(r"step_(\d+)", Path(checkpoint_id).name).group(1))


def main(run: Path, corpus: Path, cache: Path) -> None:
    held = {2: threading.Event(), 6: threading.Event()}  # background writes held back until set
    real_async_save, real_write = dcp.async_save, state_dict_saver.save
    launched = []

    @functools.wraps(real_async_save)  # the same signature: lmforge inspects it
    def checked_async_save(state_dict, *, checkpoint_id, **kw):
        root = Path(checkpoint_id).parent
        assert [p.name for p in root.glob(".tmp-*")] == [Path(checkpoint_id).name], "a save is still in flight"
        for step in launched[-1:]:
            assert (root / f"step_{step:07d}" / "manifest.json").is_file(), f"step {step} does not count yet"
        launched.append(_step(checkpoint_id))
        if launched[-1] == 2:
            dcp.save(state_dict, checkpoint_id=Path(f"{run}-reference"))  # the same state, synchronously, now
        return real_async_save(state_dict, checkpoint_id=checkpoint_id, **kw)

    def held_write(state_dict, *, checkpoint_id=None, **kw):  # what async_save's thread runs
        event = held.get(_step(checkpoint_id))
        if event is not None:
            assert event.wait(timeout=240), "never released"
        return real_write(state_dict, checkpoint_id=checkpoint_id, **kw)

    real_train_step, steps = loop.train_step, []

    def train_step(*a, **k):
        steps.append(len(steps) + 1)
        if steps[-1] == 7:
            held[6].set()  # the write may go on now (the run will not count it)
            raise OSError("killed while the save of step 6 is in flight")
        out = real_train_step(*a, **k)
        if steps[-1] == 3:
            held[2].set()  # the weights of step 2 are gone from the model: only the staged copy has them
        return out

    dcp.async_save, state_dict_saver.save, loop.train_step = checked_async_save, held_write, train_step
    try:
        loop.train(async_config(), run, data=corpus, cache_root=cache, log=lambda *_: None)
    except OSError as e:
        assert "killed while the save of step 6" in str(e)
    else:
        raise AssertionError("the run should have died at step 7")
    assert launched == [2, 4, 6], launched


if __name__ == "__main__":
    main(*map(Path, sys.argv[1:4]))
    # This rank died as planned and checked it. Leave without the interpreter's teardown: a process whose training
    # raised mid-run can abort there ("terminate called without an active exception", most likely a gloo thread
    # destroyed at finalization; seen once in ~12 runs), which torchrun would report as a failure of the crash itself.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
