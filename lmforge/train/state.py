"""What a run carries from step to step and across restarts, and what it leaves behind as it goes.

    RunState        step, tokens, training time, best validation loss, the data sampler's RNG; the budget
                    (progress towards max_steps / max_tokens / max_time) and the clock are kept here only
    global_rng_state / set_global_rng_state    torch's own RNGs (dropout), saved beside the run state
    MetricsWriter   metrics.jsonl (and TensorBoard, Weights & Biases), written by rank 0; truncate_metrics for resumes
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

from ..errors import LmforgeError
from ..io import write_json_atomic, write_text_atomic
from ..runs import CONFIG, METRICS, WANDB_RUN


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
    """metrics.jsonl always; TensorBoard too when asked for and installed; Weights & Biases when given a project.
    Only rank 0 writes.

    Every record goes to each sink: the whole record to metrics.jsonl; its numbers to TensorBoard (against
    `step`) and W&B (with `step` as a metric of its own, so a resumed run may log a step again). A W&B run that
    cannot start leaves `self.error` (one line) for the caller to raise on every rank."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, log, wandb_project: str | None = None):
        self.path = run_dir / METRICS
        self.enabled = enabled
        self.tb = None
        self.wandb = None
        self.error: str | None = None
        if enabled and wandb_project:
            self.wandb, self.error = _start_wandb(run_dir, wandb_project)
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
        if self.wandb is not None:
            self.wandb.log(_numbers(record))

    def close(self):
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def require_wandb() -> None:
    """LmforgeError (one line) unless the wandb package can be imported; checked before a run starts."""
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        raise LmforgeError("--wandb needs the wandb package: pip install 'lmforge[wandb]' (or pip install wandb)")


def _start_wandb(run_dir: Path, project: str):
    """(a started wandb run, None) or (None, the reason in one line).

    The run is named after the run directory and carries its config.json; its id is kept in RUN/wandb.json so
    that `--resume` continues the same W&B run. Files go to $WANDB_DIR when set, else beside metrics.jsonl
    (RUN/wandb/). `WANDB_MODE=offline` works as W&B documents (sync later with `wandb sync`)."""
    import os

    require_wandb()
    import wandb

    id_file = run_dir / WANDB_RUN
    try:
        saved = json.loads(id_file.read_text(encoding="utf-8")) if id_file.is_file() else {}
    except ValueError:
        saved = {}
    run_id = saved.get("id") if saved.get("project") == project else None
    try:
        config = json.loads((run_dir / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    try:
        run = wandb.init(
            project=project,
            name=run_dir.name,
            id=run_id,
            resume="allow" if run_id else None,
            dir=os.environ.get("WANDB_DIR") or str(run_dir),
            config=config,
        )
        run.define_metric("*", step_metric="step")
    except Exception as e:  # not logged in, no network in online mode, a bad project name, ...
        lines = str(e).strip().splitlines()
        return None, f"Weights & Biases could not start ({type(e).__name__}: {lines[0] if lines else ''})"
    if run.id != run_id:
        write_json_atomic(id_file, {"project": project, "id": run.id})
    return run, None


def _numbers(record: dict, prefix: str = "") -> dict:
    """The int/float values of a metrics record, nested dicts flattened as 'outer/inner'."""
    out = {}
    for k, v in record.items():
        if isinstance(v, dict):
            out.update(_numbers(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)):
            out[prefix + k] = v
    return out


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
