"""Checkpoints that survive crashes: one directory per step, written whole or not at all.

    RUN/checkpoints/step_000200/  one process or DDP ("full"): model.safetensors, trainer_state.pt (optimizers too)
                                  FSDP ("dcp", sharded): .metadata + __R_0.distcp (one shard file per rank R, written
                                  by torch.distributed.checkpoint: model and optimizer state), trainer_state.pt
                                  (run state, RNGs); and manifest.json (format, files: sizes + sha256)
    RUN/checkpoints/best/         the checkpoint with the lowest validation loss so far
    RUN/model.safetensors         the latest weights, so generate/eval/convert just work: refreshed at every full
                                  checkpoint; for a sharded run consolidated when training ends (`consolidate`,
                                  also `lmforge convert --consolidate RUN`), not at every checkpoint

A checkpoint is first written to a hidden temporary directory and renamed into place, so a
crash leaves either the complete new checkpoint or none (temporaries are removed at the next save or
resume). On resume, manifests are verified and a damaged checkpoint is skipped in favour of the previous
good one. A sharded checkpoint loads on any number of processes (DCP re-shards on load), also in one.

A sharded save may also run in the background (`ShardedCheckpointer`, train option async_checkpoint): its
shards are copied to host memory, written by a thread while training goes on, and the checkpoint counts
(manifest, rename) only once every rank's shards are complete, before the next save begins or the run ends.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import sys
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..errors import LmforgeError
from ..io import atomic_path
from ..runs import TRAINER_STATE, WEIGHTS, load_trainer_state, load_weights, save_trainer_state, save_weights

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
SHARDED = "dcp"  # manifest "format" of a sharded checkpoint (absent or "full": safetensors + trainer_state.pt)
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index of the shard files


def _file_info(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": _sha256(path)}


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
    """The files a checkpoint of the manifest's format cannot do without (a sharded one: also its shard files)."""
    return {DCP_METADATA, TRAINER_STATE} if is_sharded(manifest) else {WEIGHTS, TRAINER_STATE}


def is_sharded(manifest: dict | Path) -> bool:
    """Whether a checkpoint (its manifest, or its directory) is a sharded DCP checkpoint."""
    if isinstance(manifest, Path):
        manifest = _read_manifest(manifest) or {}
    return manifest.get("format") == SHARDED


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
    if is_sharded(manifest) and not any(str(n).endswith(".distcp") for n in files):
        return "manifest lists no shard files"
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


def latest_checkpoint(run_dir: Path) -> Path:
    """The newest checkpoint that passes `verify`; damaged ones are skipped with a warning on stderr.

    Raises LmforgeError when there is none, or none intact."""
    root = Path(run_dir) / CHECKPOINTS
    candidates = list(reversed(step_dirs(root))) if root.is_dir() else []
    if not candidates:
        raise LmforgeError(f"no checkpoint to resume in {run_dir}")
    for ckpt in candidates:
        problem = verify(ckpt)
        if problem is None:
            return ckpt
        _warn_damaged(ckpt, problem)
    raise LmforgeError(f"every checkpoint in {root} is damaged; cannot resume")


def _warn_damaged(ckpt: Path, problem: str) -> None:
    print(f"warning: checkpoint {ckpt.name} is damaged ({problem}); trying the previous one", file=sys.stderr)


def load_latest(run_dir: Path, model) -> dict:
    """Load the newest intact full checkpoint into model and return its trainer state (one process).

    Damaged checkpoints are skipped with a warning; raises LmforgeError when none is left. A sharded
    checkpoint needs the optimizers too: see `load_sharded`."""
    ckpt = latest_checkpoint(run_dir)
    while True:
        try:
            return load_full(ckpt, model)
        except LmforgeError as e:
            _warn_damaged(ckpt, str(e))
        older = [d for d in step_dirs(ckpt.parent) if d.name < ckpt.name and verify(d) is None]
        if not older:
            raise LmforgeError(f"every checkpoint in {ckpt.parent} is damaged; cannot resume")
        ckpt = older[-1]


def load_full(ckpt: Path, model) -> dict:
    """Load a full checkpoint's weights into model (plain, before wrapping); returns its trainer state."""
    if is_sharded(ckpt):
        raise LmforgeError(f"{ckpt} is a sharded checkpoint (load it with its optimizers)")
    state = load_trainer_state(ckpt / TRAINER_STATE)
    load_weights(ckpt / WEIGHTS, model)
    return state


# --- sharded checkpoints (FSDP): torch.distributed.checkpoint -------------------------------------------


def save_sharded_checkpoint(
    run_dir: Path, model, optimizers, trainer_state: dict, parallel, keep: int = 3, val_loss: float | None = None
) -> Path:
    """Every rank writes its own shards of the model and optimizer state to checkpoints/step_N (collective).

    No rank gathers the full state: `get_state_dict` gives each rank's local shards (DTensors) and DCP
    writes them as they are (one `__R_0.distcp` per rank R, plus the `.metadata` index from rank 0). Each rank
    hashes its own shard file; rank 0 writes trainer_state (run state and RNGs, no optimizer) and the manifest,
    then renames the directory into place, updates best and prunes. RUN/model.safetensors is left alone.
    (In the background instead: `ShardedCheckpointer`.)
    """
    import torch.distributed.checkpoint as dcp

    save = _begin_sharded(run_dir, model, optimizers, trainer_state, parallel, keep, val_loss)
    dcp.save(save.state_dict, checkpoint_id=save.tmp)
    return _finish_sharded(save, parallel)


@dataclass
class _ShardedSave:
    """A sharded save under way: where its shards go, and what `_finish_sharded` needs to make it count."""

    run_dir: Path
    tmp: Path  # checkpoints/.tmp-step_N-sharded: the shards are written here
    final: Path  # checkpoints/step_N: the name it gets once complete and verified
    step: int
    keep: int
    val_loss: float | None
    state_dict: dict | None  # {"model", "optimizers"}: this rank's shards (DTensors), for DCP to write
    future: Future | None = None  # an asynchronous save in flight: this rank's shard infos once written


def _begin_sharded(run_dir, model, optimizers, trainer_state: dict, parallel, keep, val_loss) -> _ShardedSave:
    """Rank 0 clears stale temporaries, makes the temporary directory and writes trainer_state into it; every
    rank takes its shards' state dict (no gathering). Collective."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    step = trainer_state["step"]
    root = Path(run_dir) / CHECKPOINTS
    tmp = root / f".tmp-step_{step:07d}-sharded"  # the same name on every rank
    if parallel.is_main:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(run_dir)
        tmp.mkdir()
        save_trainer_state(tmp / TRAINER_STATE, trainer_state)
    parallel.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizers)
    sd = {"model": without_tied_aliases(model_sd, model), "optimizers": optim_sd}
    return _ShardedSave(Path(run_dir), tmp, root / f"step_{step:07d}", step, keep, val_loss, sd)


def _shard_infos(tmp: Path, rank: int) -> dict:
    """{file: size and sha256} of one rank's shard files in a checkpoint directory."""
    return {p.name: _file_info(p) for p in tmp.glob(f"__{rank}_*.distcp")}


def _finish_sharded(save: _ShardedSave, parallel, mine: dict | None = None) -> Path:
    """Make a save whose shards are all on disk count (collective): every rank hashes its own shard files (or
    brings `mine`, hashed already), rank 0 writes the manifest, renames the directory into place, updates best
    and prunes."""
    tmp = save.tmp
    if mine is None:
        mine = _shard_infos(tmp, parallel.info.rank)
    shards = parallel.gather_objects(mine)  # rank 0: every rank's {file: size, sha256}
    if parallel.is_main:
        files = {name: info for part in shards for name, info in part.items()}
        files.update({name: _file_info(tmp / name) for name in (DCP_METADATA, TRAINER_STATE)})
        manifest = {"step": save.step, "val_loss": save.val_loss, "format": SHARDED, "ranks": len(shards)}
        (tmp / MANIFEST).write_text(json.dumps({**manifest, "files": files}, indent=1))
        if save.final.exists():
            shutil.rmtree(save.final)
        os.replace(tmp, save.final)
        if save.val_loss is not None:
            _update_best(save.final.parent, save.final, save.val_loss)
        _prune(save.final.parent, save.keep)
    parallel.barrier()
    return save.final


def async_save_unavailable(parallel) -> str | None:
    """Why this run cannot save in the background (None: it can).

    Background saves are DCP's `async_save` of a sharded (FSDP) run, over a gloo process group of their own
    (the training's collectives keep the default group; two threads must not share one)."""
    if not parallel.sharded:
        what = "a DDP run's" if parallel.info.enabled else "a one-process run's"
        return (
            f"{what} checkpoints are one full file written by rank 0; only sharded (FSDP) saves run in the background"
        )
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    if not hasattr(dcp, "async_save"):
        return "this PyTorch has no torch.distributed.checkpoint.async_save"
    if "async_stager" not in inspect.signature(dcp.async_save).parameters:  # its stager copies CPU shards
        return "this PyTorch's async_save may not copy shards already in host memory before returning"
    if not dist.is_gloo_available():
        return "this PyTorch has no gloo backend for the background save's process group"
    return None


class ShardedCheckpointer:
    """Sharded checkpoints of an FSDP run, written synchronously or in the background (asynchronous=True).

    In the background, `save` takes a copy of this rank's shards in host memory (DCP's stager), starts
    `torch.distributed.checkpoint.async_save` in a thread and returns: training goes on while the shards are
    written, then hashed (another thread). The save counts only once it is finished (`wait`): every rank's
    shards complete, their hashes in the manifest, the directory renamed into place, best and keep-last-K
    updated, exactly as a synchronous save.
    A save waits for the previous one first, and the run waits for the last one before it ends (leaving the
    `with` block); a crash while a save is in flight leaves only its temporary directory, so a resume falls
    back to the previous checkpoint. When a background save is not possible (`async_save_unavailable`),
    the constructor says why in one log line and saves synchronously.
    """

    def __init__(self, parallel, asynchronous: bool = False, log=print):
        self.parallel = parallel
        self.pending: _ShardedSave | None = None
        self.group = None  # the background saves' own process group
        self._hasher = None  # a thread that hashes this rank's shards once written
        if asynchronous:
            reason = async_save_unavailable(parallel)
            if reason is None:
                import torch.distributed as dist

                try:
                    self.group = dist.new_group(backend="gloo")  # collective: every rank builds the checkpointer
                except (RuntimeError, ValueError) as e:
                    reason = f"no gloo process group for it: {str(e).splitlines()[0][:200]}"
            if reason is not None:
                log(f"async checkpoints unavailable ({reason}); saving synchronously")

    @property
    def asynchronous(self) -> bool:
        return self.group is not None

    def save(self, run_dir: Path, model, optimizers, trainer_state: dict, keep: int = 3, val_loss=None) -> Path:
        """Write checkpoints/step_N (collective); in the background, it counts only after `wait`."""
        if not self.asynchronous:
            return save_sharded_checkpoint(
                run_dir, model, optimizers, trainer_state, self.parallel, keep=keep, val_loss=val_loss
            )
        import torch.distributed.checkpoint as dcp

        self.wait()  # the previous checkpoint counts before the next one begins
        save = _begin_sharded(run_dir, model, optimizers, trainer_state, self.parallel, keep, val_loss)
        # async_save stages (copies) the shards before it returns: the next optimizer steps cannot change them
        future = dcp.async_save(save.state_dict, checkpoint_id=save.tmp, process_group=self.group)
        written = getattr(future, "upload_completion", future)  # a Future, or an AsyncSaveResponse holding one
        if self._hasher is None:
            self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmforge-checkpoint-hash")
        # the shards are hashed in the background too (hashlib releases the GIL): `wait` only gathers the results
        save.future = self._hasher.submit(_hash_when_written, written, save.tmp, self.parallel.info.rank)
        save.state_dict = None
        self.pending = save
        return save.final

    def wait(self) -> Path | None:
        """Finish the save in flight, if any (collective): its checkpoint directory, or None."""
        save, self.pending = self.pending, None
        if save is None:
            return None
        mine = save.future.result()  # this rank's shards are written and hashed (or what went wrong is raised)
        return _finish_sharded(save, self.parallel, mine)

    def abandon(self) -> None:
        """After an error: let the save in flight end, but never count it (no manifest, no rename)."""
        save, self.pending = self.pending, None
        if save is not None:
            try:
                save.future.result()
            except Exception:  # the run is failing already; its error is the one to report
                pass

    def __enter__(self) -> ShardedCheckpointer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.wait()
        else:
            self.abandon()
        if self._hasher is not None:
            self._hasher.shutdown()


def _hash_when_written(written: Future, tmp: Path, rank: int) -> dict:
    written.result()  # raises what the background save raised
    return _shard_infos(tmp, rank)


def load_sharded(ckpt: Path, model, optimizers) -> dict:
    """Load a sharded checkpoint into the (wrapped or plain) model and its optimizers, on any number of
    processes (every rank reads the pieces of its own shards); returns the trainer state."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    state = load_trainer_state(ckpt / TRAINER_STATE)
    model_sd, optim_sd = get_state_dict(model, optimizers)  # this process's layout, filled in by DCP
    sd = {"model": without_tied_aliases(model_sd, model), "optimizers": optim_sd}
    _dcp_load(sd, ckpt, alone=not (dist.is_available() and dist.is_initialized()))
    set_state_dict(model, optimizers, model_state_dict=model_sd, optim_state_dict=sd["optimizers"])
    return state


def _tied_aliases(model) -> dict[str, str]:
    """{second name: first name} of every parameter the model holds under two names (a tied LM head)."""
    first, aliases = {}, {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.update({name: first[id(p)]} if id(p) in first else {})
        first.setdefault(id(p), name)
    return aliases


def without_tied_aliases(model_sd: dict, model) -> dict:
    """The model's state dict with each tied tensor under its first name only, so a sharded checkpoint stores
    it once (DCP would write it under both). The names are the model's, so every rank drops the same ones.
    Loading into this dict fills the tied tensor, which the full dict still holds under both names."""
    aliases = _tied_aliases(model)
    return {k: v for k, v in model_sd.items() if k not in aliases}


def _dcp_load(sd: dict, ckpt: Path, alone: bool) -> None:
    """DCP load into sd in place: by every rank together, or (alone) by this process by itself."""
    import torch.distributed.checkpoint as dcp

    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(sd, checkpoint_id=ckpt, no_dist=alone)
    except Exception as e:  # a checkpoint of another model, or unreadable shards
        raise LmforgeError(f"cannot load sharded checkpoint {ckpt}: {str(e).splitlines()[0][:300]}") from None


def consolidate(run_dir: Path, log=print) -> Path:
    """Write RUN/model.safetensors from the run's newest intact checkpoint, in this one process.

    For a sharded checkpoint the model's weights (not the optimizer state) are read through DCP into a plain
    model on the CPU: this is the one place the full weights are held, once. Returns the checkpoint used."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from ..models import build_model
    from ..runs import load_config

    run_dir = Path(run_dir)
    model_cfg = load_config(run_dir).model  # one line if RUN is not a run directory
    ckpt = latest_checkpoint(run_dir)
    step = (_read_manifest(ckpt) or {}).get("step")
    if not is_sharded(ckpt):
        with atomic_path(run_dir / WEIGHTS) as t:
            shutil.copyfile(ckpt / WEIGHTS, t)
    else:
        model = build_model(model_cfg)
        sd = get_model_state_dict(model)
        _dcp_load({"model": without_tied_aliases(sd, model)}, ckpt, alone=True)  # DCP reads just the keys asked for
        set_model_state_dict(model, sd)
        save_weights(run_dir / WEIGHTS, model, {"step": step})
    log(f"consolidated {ckpt.name} -> {run_dir / WEIGHTS}")
    return ckpt
