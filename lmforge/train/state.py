"""What a run carries from step to step and across restarts, and what it leaves behind as it goes.

    RunState        step, tokens, training time, best validation loss, the data sampler's RNG; the budget
                    (progress towards max_steps / max_tokens / max_time) and the clock are kept here only
    global_rng_state / set_global_rng_state    torch's own RNGs (dropout), saved beside the run state
    MetricsWriter   metrics.jsonl (and TensorBoard), written by rank 0; truncate_metrics for resumes
    StopFlag        SIGINT / SIGTERM ask the loop to stop after the current step (and save)

The checkpoint's trainer_state.pt holds `RunState.to_dict()` plus the optimizer, scaler and global RNG states;
its keys (step, tokens, elapsed, best_val_loss, data_rng, rng, optimizers, scaler) are the on-disk format.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..io import write_text_atomic
from ..runs import METRICS


@dataclass
class RunState:
    """How far a run has come. `elapsed` counts training time only: evaluation and checkpoints run off the clock."""

    step: int = 0
    tokens: int = 0  # predicted tokens trained on, all ranks together
    elapsed: float = 0.0  # seconds
    best_val_loss: float | None = None
    data_rng: torch.Generator = field(default_factory=torch.Generator)  # draws the training batches
    _mark: float = field(default_factory=time.perf_counter, repr=False)  # when the clock last counted

    def progress(self, tc) -> float:
        """Fraction of the budget spent: the largest of step / max_steps, tokens / max_tokens, elapsed / max_time."""
        parts = [0.0]
        if tc.max_steps:
            parts.append(self.step / tc.max_steps)
        if tc.max_tokens:
            parts.append(self.tokens / tc.max_tokens)
        if tc.max_time:
            parts.append(self.elapsed / tc.max_time)
        return max(parts)

    def start_clock(self) -> None:
        self._mark = time.perf_counter()

    def advance(self, tokens: int) -> None:
        """One optimizer step is done: count it, its tokens and the time since the clock last counted."""
        now = time.perf_counter()
        self.step += 1
        self.tokens += tokens
        self.elapsed += now - self._mark
        self._mark = now

    @contextlib.contextmanager
    def off_the_clock(self):
        """Time spent inside (evaluation, checkpoints) does not count against the time budget."""
        try:
            yield
        finally:
            self.start_clock()

    def note_val_loss(self, val_loss: float | None) -> None:
        if val_loss is not None and (self.best_val_loss is None or val_loss < self.best_val_loss):
            self.best_val_loss = val_loss

    def to_dict(self) -> dict:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "elapsed": self.elapsed,
            "best_val_loss": self.best_val_loss,
            "data_rng": self.data_rng.get_state(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> RunState:
        """From a saved trainer state (older checkpoints may lack best_val_loss)."""
        gen = torch.Generator()
        gen.set_state(d["data_rng"])
        return cls(d["step"], d["tokens"], d["elapsed"], d.get("best_val_loss"), gen)


def global_rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_global_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class StopFlag:
    """SIGINT/SIGTERM set a flag the loop checks between steps; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping: saving a checkpoint (Ctrl-C again to abort at once)", file=sys.stderr)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class MetricsWriter:
    """metrics.jsonl always; TensorBoard too when asked for and installed. Only rank 0 writes."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, log):
        self.path = run_dir / METRICS
        self.enabled = enabled
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                log(
                    "warning: --tensorboard needs the tensorboard package (pip install tensorboard); "
                    "writing metrics.jsonl only"
                )

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self):
        if self.tb is not None:
            self.tb.close()


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint we resume from, and (with a warning on stderr) lines that are
    not a JSON record: what a full disk or a power loss leaves at the end of the file."""
    if not path.is_file():
        return
    keep, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if not isinstance(rec, dict) or not isinstance(rec.get("step", 0), (int, float)):
            bad += 1
        elif rec.get("step", 0) <= step:
            keep.append(line)
    if bad:
        print(f"warning: dropped {bad} unreadable line(s) of {path} (cut short by a crash?)", file=sys.stderr)
    write_text_atomic(path, "".join(line + "\n" for line in keep))


def fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
