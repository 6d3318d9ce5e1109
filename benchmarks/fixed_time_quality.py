"""Fixed-time quality: train two recipes for the same wall time on the default corpus and compare.

    python benchmarks/fixed_time_quality.py --seconds 120 --out bench-out/quality

"reference": the textbook recipe - GPT-2 block (learned positions, LayerNorm, GELU), AdamW,
warmup + cosine, fp32. "default": what `lmforge train` uses (the tiny preset as shipped). Both use
the same tokenizer, shards, batch shape, evaluation windows and budget. Prints the final
validation losses and the time each recipe needs to reach the reference's final loss, and writes
the validation-loss-versus-time plot.
"""

import argparse
import json
import shutil
import time
from pathlib import Path

from lmforge.config import ModelConfig, preset
from lmforge.train.loop import train

p = argparse.ArgumentParser()
p.add_argument("--seconds", type=float, default=120)
p.add_argument("--out", default="bench-out/quality")
p.add_argument("--eval-interval", type=int, default=25)
args = p.parse_args()
out = Path(args.out)
shutil.rmtree(out / "runs", ignore_errors=True)


def reference_config():
    cfg = preset("tiny")
    m = cfg.model
    cfg.model = ModelConfig(
        vocab_size=m.vocab_size,
        block_size=m.block_size,
        n_layer=m.n_layer,
        n_head=m.n_head,
        d_model=m.d_model,
        norm="layernorm",
        pos="learned",
        mlp="gelu_tanh",
        bias=True,
        tie_embeddings=True,
    )
    cfg.train.optimizer, cfg.train.precision, cfg.train.lr = "adamw", "fp32", 3e-3
    return cfg


recipes = {"reference": reference_config(), "default": preset("tiny")}
curves = {}
for name, cfg in recipes.items():
    cfg.train.max_time, cfg.train.max_steps, cfg.train.max_tokens = args.seconds, None, None
    cfg.train.eval_interval, cfg.train.sample_tokens, cfg.train.log_interval = args.eval_interval, 0, 50
    t0 = time.time()
    train(cfg, out / "runs" / name, data=None, cache_root=out / "cache", log=lambda *_: None)
    recs = [json.loads(line) for line in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    curves[name] = [(r["elapsed"], r["val_loss"]) for r in recs if "val_loss" in r]
    print(
        f"{name:<10} final val loss {curves[name][-1][1]:.4f} after {curves[name][-1][0]:.0f}s of training "
        f"({time.time() - t0:.0f}s wall with evaluation)"
    )

target = curves["reference"][-1][1]


def time_to(curve, target):
    for t, v in curve:
        if v <= target:
            return t
    return None


t_ref, t_def = time_to(curves["reference"], target), time_to(curves["default"], target)
print(
    f"time to reach the reference's final loss {target:.4f}: reference {t_ref:.0f}s, default "
    + (f"{t_def:.0f}s ({t_def / t_ref:.2f} of the reference's time)" if t_def is not None else "not reached")
)

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(figsize=(7, 4.2))
for name, c in curves.items():
    ax.plot(*zip(*c), marker=".", label=name)
ax.axhline(target, color="gray", lw=0.8, ls="--")
ax.set_xlabel("training seconds")
ax.set_ylabel("validation loss")
ax.grid(alpha=0.3)
ax.legend()
fig.tight_layout()
fig.savefig(out / "val_loss_vs_time.png", dpi=110)
print(f"plot: {out / 'val_loss_vs_time.png'}")
