"""Checkpoints that survive crashes: one directory per step, written whole or not at all.

    RUN/checkpoints/step_000200/  model.safetensors, trainer_state.pt, manifest.json (sizes + sha256)
    RUN/checkpoints/best/         the checkpoint with the lowest validation loss so far
    RUN/model.safetensors         a copy of the latest weights, so generate/eval/convert just work

A checkpoint is first written to a hidden temporary directory and renamed into place, so a
crash leaves either the complete new checkpoint or none. On resume, manifests are verified and
a damaged checkpoint is skipped in favour of the previous good one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

from ..errors import LmforgeError
from ..io import atomic_path
from ..runs import TRAINER_STATE, WEIGHTS, load_trainer_state, load_weights, save_trainer_state, save_weights

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(run_dir: Path, model, trainer_state: dict, keep: int = 3, val_loss: float | None = None) -> Path:
    """Write checkpoints/step_N atomically, refresh RUN/model.safetensors, keep the last `keep` and the best."""
    step = trainer_state["step"]
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(run_dir)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp-step_{step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_weights(tmp / WEIGHTS, model, {"step": step})
    save_trainer_state(tmp / TRAINER_STATE, trainer_state)
    manifest = {
        "step": step,
        "val_loss": val_loss,
        "files": {f: {"size": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)} for f in (WEIGHTS, TRAINER_STATE)},
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    with atomic_path(Path(run_dir) / WEIGHTS) as t:
        shutil.copyfile(final / WEIGHTS, t)
    if val_loss is not None:
        _update_best(root, final, val_loss)
    _prune(root, keep)
    return final


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Remove what killed writes leave behind; returns what was removed.

    That is checkpoints/.tmp-* and .old-best-* directories (a checkpoint or best copy being written) and the
    hidden `.NAME.XXXX.tmp` files of `io.atomic_path` in the run directory and checkpoints/. Call it only where
    no other process writes the run (rank 0, before a save, or when resuming)."""
    run_dir = Path(run_dir)
    root = run_dir / CHECKPOINTS
    old_best = sorted(root.glob(".old-best-*"))
    if old_best and not (root / "best").exists():  # killed between moving best aside and putting the new one
        os.replace(old_best[-1], root / "best")
    stale = [p for pattern in (".tmp-*", ".old-best-*") for p in root.glob(pattern)]
    stale += [p for d in (run_dir, root) for p in d.glob(".*.tmp") if p.is_file()]
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return stale


def _update_best(root: Path, ckpt: Path, val_loss: float) -> None:
    best = root / "best"
    current = _read_manifest(best)
    best_loss = current.get("val_loss") if current is not None else None
    if isinstance(best_loss, (int, float)) and best_loss <= val_loss:
        return
    tmp = root / f".tmp-best-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(ckpt, tmp)
    old = root / f".old-best-{os.getpid()}"
    if best.exists():
        os.replace(best, old)
    os.replace(tmp, best)
    shutil.rmtree(old, ignore_errors=True)


def _prune(root: Path, keep: int) -> None:
    steps = step_dirs(root)
    for d in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(d, ignore_errors=True)


def step_dirs(root: Path) -> list[Path]:
    return sorted(d for d in root.glob("step_*") if d.is_dir())


def _read_manifest(ckpt: Path) -> dict | None:
    """The manifest as a dict, or None when it is missing, unreadable or not a JSON object."""
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # ValueError: JSONDecodeError and UnicodeDecodeError
        return None
    return manifest if isinstance(manifest, dict) else None


def required_files(manifest: dict) -> set[str]:
    """The files a checkpoint of the manifest's format cannot do without."""
    return {WEIGHTS, TRAINER_STATE}


def verify(ckpt: Path) -> str | None:
    """None if the checkpoint is complete and intact, else what is wrong with it.

    The manifest must be a JSON object whose "files" maps every file the checkpoint needs (`required_files`)
    to {"size": bytes, "sha256": hex}; each listed file must exist with that size and hash."""
    manifest = _read_manifest(ckpt)
    if manifest is None:
        return "missing or unreadable manifest"
    files = manifest.get("files")
    if not isinstance(files, dict):
        return "manifest lists no files"
    missing = required_files(manifest) - set(files)
    if missing:
        return f"manifest does not list {', '.join(sorted(missing))}"
    for name, info in files.items():
        if (
            not isinstance(info, dict)
            or not isinstance(info.get("size"), int)
            or not isinstance(info.get("sha256"), str)
        ):
            return f"manifest entry for {name} has no size and sha256"
        f = ckpt / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            return f"manifest names a file outside the checkpoint ({name})"
        if not f.is_file():
            return f"{name} missing"
        if f.stat().st_size != info["size"]:
            return f"{name} has the wrong size (truncated?)"
        if _sha256(f) != info["sha256"]:
            return f"{name} checksum mismatch"
    return None


def load_latest(run_dir: Path, model) -> dict:
    """Load the newest intact checkpoint into model and return its trainer state.

    Damaged checkpoints are skipped with a warning; raises LmforgeError when none is left."""
    root = Path(run_dir) / CHECKPOINTS
    candidates = list(reversed(step_dirs(root))) if root.is_dir() else []
    if not candidates:
        raise LmforgeError(f"no checkpoint to resume in {run_dir}")
    for ckpt in candidates:
        problem = verify(ckpt)
        if problem is None:
            try:
                state = load_trainer_state(ckpt / TRAINER_STATE)
                load_weights(ckpt / WEIGHTS, model)
                return state
            except LmforgeError as e:
                problem = str(e)
        print(f"warning: checkpoint {ckpt.name} is damaged ({problem}); trying the previous one", file=sys.stderr)
    raise LmforgeError(f"every checkpoint in {root} is damaged; cannot resume")
