"""Fixed-time quality: the textbook recipe and lmforge's default, trained for the same wall time, compared.

    flock /tmp/lmforge-cpu.lock python benchmarks/fixed_time_quality.py --seconds 150 --out bench-out/quality
    flock /tmp/lmforge-cpu.lock python benchmarks/fixed_time_quality.py --seconds 240 --precision auto \\
        --textbook-precision auto --out bench-out/quality-auto   # the README's 4-minute job, old vs new default

"textbook": the `gpt2-tiny` preset (GPT-2 block: learned positions, LayerNorm, GELU, tied head; AdamW,
warmup + cosine), the recipe `lmforge train` used before the recipe ablation (benchmarks/recipe_ablation.py).
"default": what `lmforge train` uses now (the `tiny` preset). Both train on the default corpus with the same
tokenizer, shards, batch shape, validation windows and budget (evaluation time is not counted), by default in
fp32 (what a CPU without native bf16 runs). Prints each recipe's final validation bits per byte, the time the
default needs to reach the textbook's final value and that time as a fraction of the textbook's, and writes
the bits-per-byte-versus-time plot.

A warmup-stable-decay schedule (the default's) only anneals at the end of its budget, so the point where
a full-budget curve crosses the textbook's final value understates how fast it gets there. So the default
also trains with half the budget ("default-half", its schedule fitted to that budget): ending at or below
the textbook's final value there is what "reaches it in half the time" means. --no-half skips that run.
"""

import argparse
import json
import shutil
import time
from pathlib import Path

from lmforge.config import preset
from lmforge.train.loop import train

p = argparse.ArgumentParser()
p.add_argument("--seconds", type=float, default=150)
p.add_argument("--out", default="bench-out/quality")
p.add_argument("--eval-interval", type=int, default=25)
p.add_argument("--precision", default="fp32", help="the default recipe's precision (auto: what lmforge train picks)")
p.add_argument("--textbook-precision", default="fp32")
p.add_argument("--no-half", action="store_true", help="skip the default trained for half the budget")
args = p.parse_args()
out = Path(args.out)
shutil.rmtree(out / "runs", ignore_errors=True)

recipes = {"textbook": preset("gpt2-tiny"), "default": preset("tiny")}
recipes["textbook"].train.precision = args.textbook_precision
recipes["default"].train.precision = args.precision
budgets = {"textbook": args.seconds, "default": args.seconds}
if not args.no_half:
    recipes["default-half"] = preset("tiny")
    recipes["default-half"].train.precision = args.precision
    budgets["default-half"] = args.seconds / 2
curves = {}
for name, cfg in recipes.items():
    cfg.train.max_time, cfg.train.max_steps, cfg.train.max_tokens = budgets[name], None, None
    cfg.train.eval_interval, cfg.train.sample_tokens, cfg.train.log_interval = args.eval_interval, 0, 50
    t0 = time.time()
    res = train(cfg, out / "runs" / name, data=None, cache_root=out / "cache", log=lambda *_: None)
    recs = [json.loads(line) for line in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    curves[name] = [(r["elapsed"], r["val_bpb"]) for r in recs if "val_bpb" in r]
    print(
        f"{name:<9} ({cfg.train.precision}) final val {curves[name][-1][1]:.4f} bits/byte after "
        f"{curves[name][-1][0]:.0f}s of training, {res.step} steps, {res.tokens / res.elapsed:,.0f} tok/s "
        f"({time.time() - t0:.0f}s wall with evaluation)",
        flush=True,
    )


def time_to(curve, target):
    """Training seconds at which curve [(seconds, bpb)] first reaches target (linear between evaluations)."""
    prev = None
    for t, v in curve:
        if v <= target:
            return t if prev is None else prev[0] + (t - prev[0]) * (prev[1] - target) / (prev[1] - v)
        prev = (t, v)
    return None


target = curves["textbook"][-1][1]
t_ref, t_def = curves["textbook"][-1][0], time_to(curves["default"], target)
change = 100 * (curves["default"][-1][1] / target - 1)
print(f"default ends {change:+.1f} % in bits/byte against the textbook")
print(
    f"time to reach the textbook's final {target:.4f} bits/byte: textbook {t_ref:.0f}s, default "
    + (f"{t_def:.0f}s = {t_def / t_ref:.2f} of the textbook's time" if t_def is not None else "not reached")
    + " (on the full-budget curve)"
)
if "default-half" in curves:
    half = curves["default-half"][-1]
    verdict = "reaches" if half[1] <= target else "does not reach"
    print(
        f"default trained for half the budget ({half[0]:.0f}s): final {half[1]:.4f} bits/byte, "
        f"{100 * (half[1] / target - 1):+.1f} % against the textbook's full-budget final: "
        f"{verdict} it in 0.5 of the time"
    )

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(figsize=(7, 4.2))
for name, c in curves.items():
    ax.plot(*zip(*c), marker=".", label=name)
ax.axhline(target, color="gray", lw=0.8, ls="--")
ax.set_xlabel("training seconds")
ax.set_ylabel("validation bits per byte")
ax.grid(alpha=0.3)
ax.legend()
fig.tight_layout()
fig.savefig(out / "bpb_vs_time.png", dpi=110)
print(f"plot: {out / 'bpb_vs_time.png'}")
