"""Run by test_sharded_checkpoints under torchrun (2 processes, gloo, FSDP): a new run checkpointed every 2 steps,
killed (an OSError on every rank) in the middle of its second sharded save, at step 4.

While a checkpoint is saved, no DTensor may be gathered to its full size (full_tensor / redistribute raise).
"""

import os
import sys
from pathlib import Path

from test_sharded_checkpoints import dcp_config
from torch.distributed.tensor import DTensor

from lmforge.train import distributed, loop

saving = False


def main(run: Path, corpus: Path, cache: Path) -> None:
    def no_full_state(name, original):
        def guarded(self, *a, **k):
            assert not saving, f"DTensor.{name} during a sharded save: a rank would hold the full state"
            return original(self, *a, **k)

        return guarded

    DTensor.full_tensor = no_full_state("full_tensor", DTensor.full_tensor)
    DTensor.redistribute = no_full_state("redistribute", DTensor.redistribute)

    real_save = loop.save

    def watched_save(*a, **k):
        global saving
        saving = True
        try:
            real_save(*a, **k)
        finally:
            saving = False

    loop.save = watched_save

    real_gather, calls = distributed.Parallel.gather_objects, []

    def gather_then_die(self, obj):
        calls.append(obj)
        if len(calls) == 2:  # the shards of step 4 are on disk, the manifest is not
            raise OSError("killed in the middle of a sharded save")
        return real_gather(self, obj)

    distributed.Parallel.gather_objects = gather_then_die
    try:
        loop.train(dcp_config(), run, data=corpus, cache_root=cache, log=lambda *_: None)
    except OSError as e:
        assert "killed in the middle" in str(e)
    else:
        raise AssertionError("the save at step 4 should have died")


if __name__ == "__main__":
    main(*map(Path, sys.argv[1:4]))
    # This rank died as planned and checked it. Leave without the interpreter's teardown: a process whose training
    # raised mid-run can abort there ("terminate called without an active exception", most likely a gloo thread
    # destroyed at finalization; seen once in ~12 runs), which torchrun would report as a failure of the crash itself.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
