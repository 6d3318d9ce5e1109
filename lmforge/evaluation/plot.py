"""PNG plots of one or more runs' metrics.jsonl (matplotlib, no display needed)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import LmforgeError
from ..io import atomic_path

# (metric key, axis label, file stem)
PANELS = [
    ("loss", "training loss", "loss"),
    ("val_loss", "validation loss", "val_loss"),
    ("val_acc", "validation next-token accuracy (top-1)", "val_acc"),
    ("val_top5", "validation next-token accuracy (top-5)", "val_top5"),
    ("lr", "learning rate", "lr"),
    ("tokens_per_s", "tokens / s", "tokens_per_s"),
    ("mfu", "model FLOPs utilisation", "mfu"),
]


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise LmforgeError(f"no metrics.jsonl in {run_dir}")
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash
        if isinstance(rec, dict):
            out.append(rec)
    return out


def plot_runs(runs: list[str | Path], out_dir: str | Path) -> list[Path]:
    """One PNG per metric and x-axis (steps, tokens), each run a line; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {Path(r).name or str(r): read_metrics(Path(r)) for r in runs}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for key, label, stem in PANELS:
        if not any(key in rec for recs in data.values() for rec in recs):
            continue
        for xkey in ("step", "tokens"):
            fig, ax = plt.subplots(figsize=(7, 4.2))
            for name, recs in data.items():
                pts = [(r[xkey], r[key]) for r in recs if key in r and xkey in r]
                if pts:
                    ax.plot(*zip(*pts), label=name, marker="." if len(pts) < 30 else None)
            ax.set_xlabel(xkey + "s")
            ax.set_ylabel(label)
            if key in ("loss", "val_loss"):
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend()
            fig.tight_layout()
            path = out_dir / f"{stem}_vs_{xkey}.png"
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format="png", dpi=110)
            plt.close(fig)
            written.append(path)
    if not written:
        raise LmforgeError("nothing to plot: the metrics files have no records yet")
    return written
