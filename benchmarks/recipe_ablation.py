"""Recipe ablation at equal wall-clock time: which modern changes make a `tiny` model better per CPU-second?

    flock /tmp/lmforge-cpu.lock python benchmarks/recipe_ablation.py --seconds 90 --corpus stdlib \\
        --only textbook,rope,rmsnorm,relu2,swiglu,qknorm,untied,softcap,zeroinit,nobias,valueres,muon,wsd
    python benchmarks/recipe_ablation.py --table            # print the table of everything measured so far
    python benchmarks/recipe_ablation.py --table --write    # ... and append it to benchmarks/RESULTS.md

Every recipe trains the `tiny`-sized model (4 layers, d_model 192, context 256, 4,096-token tokenizer unless
the recipe says otherwise) for the same wall-clock budget, in fp32 by default, with the same seed, data order
and validation windows. "textbook" is the GPT-2 recipe (the `gpt2-tiny` preset: learned positions, LayerNorm,
GELU, biases, tied head, AdamW 3e-3, warmup + cosine); every other recipe is textbook plus the changes its
name lists (see CHANGES, ALIASES and the knobs in parse_recipe). The metric is validation bits per byte
(comparable across tokenizer sizes) at the end of the budget, and the training time a recipe needs to reach
the textbook's final value on the same corpus and budget (linear interpolation between evaluations).

How "equal wall-clock" is measured on a shared machine. Wall-clock training runs are at the mercy of the
machine's other load: on 2 shared cores a run can lose half its steps to a neighbour, and which recipe
suffers is luck. So the two parts are measured apart:
1. seconds per step of every recipe, with both threads, interleaved round-robin over the recipes in one
   process and the best of 3 rounds kept (the timed part: run it under the CPU lock); then
2. each recipe trains for budget / (its seconds per step) steps, with its schedule stretched over those
   steps. What a recipe learns in a given number of steps does not depend on the load, so these runs go
   in parallel processes of one thread each (--jobs). Curves are put on the budget clock: step x seconds/step.
--textbook-step fixes the textbook's seconds per step (e.g. measured on a quiet machine) and rescales the
others by their measured ratio to it. Not counted: evaluation, and the data loader (the same for all).

Corpora: "stdlib", the default corpus (the Python standard library and the pydoc topics); "prose",
English text built from what ships with Python and the installed packages: the pydoc topics, then per
package the long description in its metadata (README-like), its .rst/.md documents and its docstrings of
at least 200 characters, at most 0.5 MB per package, capped at --prose-mb megabytes, in sorted order.

Each run appends one line to OUT/results.jsonl; --table reads them all, so the ablation can run in parts
(--only) and be tabulated at the end.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import shlex
import sys
import sysconfig
import time
from pathlib import Path

import torch

from lmforge.config import merge, preset

ROOT = Path(__file__).resolve().parents[1]

# name -> (description, {"model": {...}, "train": {...}}) applied on top of the textbook recipe, in order.
CHANGES = {
    "rope": ("rotary positions", {"model": {"pos": "rope"}}),
    "rmsnorm": ("RMSNorm", {"model": {"norm": "rmsnorm"}}),
    "relu2": ("ReLU² MLP", {"model": {"mlp": "relu2"}}),
    "swiglu": ("SwiGLU MLP (d_ff 512: same parameters)", {"model": {"mlp": "swiglu", "d_ff": 512}}),
    "qknorm": ("QK-norm", {"model": {"qk_norm": True}}),
    "untied": ("untied head", {"model": {"tie_embeddings": False}}),
    "softcap": ("logit softcap 15", {"model": {"logit_softcap": 15.0}}),
    "zeroinit": ("zero-initialised output projections", {"model": {"zero_init_proj": True}}),
    "nobias": ("no biases in linear layers", {"model": {"bias": False}}),
    "valueres": (
        "value residual (first layer's values mixed in, learned per layer)",
        {"model": {"value_residual": True}},
    ),
    "muon": ("Muon (lr 0.02) for hidden matrices", {"train": {"optimizer": "muon"}}),
    "wsd": ("warmup-stable-decay schedule (decay 30 %)", {"train": {"schedule": "wsd"}}),
    "wsd0": ("WSD decaying to 0", {"train": {"schedule": "wsd", "min_lr_ratio": 0.0}}),
}

# Combinations and variations: a recipe name is "+"-joined change names and knobs below
# (e.g. "rope+muon", "modern+lr6e-3"). Knobs: lrX (AdamW lr), mlrX (Muon lr), LxD (layers x d_model),
# seqN (context), bsN (batch), vocabN (tokenizer), wuN (warmup steps), dfX (wsd decay fraction).
ALIASES = {
    "modern": "rope+rmsnorm+relu2+qknorm+untied+softcap+zeroinit+nobias+muon+wsd",
    "llama": "rope+rmsnorm+swiglu+untied+nobias+muon+wsd",
}


def parse_recipe(name: str) -> dict:
    """The overrides {"model": ..., "train": ...} of a recipe name (see CHANGES, ALIASES and the knobs)."""
    out = {"model": {}, "train": {}}
    if name == "textbook":
        return out
    for part in name.split("+"):
        if part in ALIASES:
            sub = parse_recipe(ALIASES[part])
            for k in out:
                out[k].update(sub[k])
        elif part in CHANGES:
            for k, v in CHANGES[part][1].items():
                out[k].update(v)
        elif part.startswith("mlr"):
            out["train"]["muon_lr"] = float(part[3:])
        elif part.startswith("lr"):
            out["train"]["lr"] = float(part[2:])
        elif part.startswith("seq"):
            out["model"]["block_size"] = int(part[3:])
        elif part.startswith("bs"):
            out["train"]["batch_size"] = int(part[2:])
        elif part.startswith("vocab"):
            out["train"]["tokenizer_vocab_size"] = int(part[5:])
        elif part.startswith("wu"):
            out["train"]["warmup_steps"] = int(part[2:])
        elif part.startswith("df"):
            out["train"]["decay_fraction"] = float(part[2:])
        elif "x" in part and part.split("x")[0].isdigit():
            n_layer, d_model = (int(v) for v in part.split("x"))
            out["model"].update(n_layer=n_layer, d_model=d_model, n_head=max(1, d_model // 48))
        elif part.startswith("preset:"):
            cfg = preset(part[7:])
            out["model"].update({k: v for k, v in cfg.to_dict()["model"].items() if k != "vocab_size"})
            out["train"].update(
                {k: v for k, v in cfg.to_dict()["train"].items() if k not in ("max_time", "precision", "eval_interval")}
            )
        else:
            raise SystemExit(f"unknown recipe part {part!r} in {name!r}")
    return out


def textbook():
    """The GPT-2 recipe at tiny size (the gpt2-tiny preset)."""
    return preset("gpt2-tiny")


def build_prose(out: Path, megabytes: float, per_package_mb: float = 0.5) -> Path:
    """Write OUT/prose.jsonl (one document per line) from English text shipped with Python and installed packages.

    The pydoc topics, then per installed package (sorted by name) its metadata description, its .rst/.md
    documents and its docstrings of >= 200 characters, at most per_package_mb each so that no single
    package (e.g. one with thousands of example files) dominates; megabytes caps the whole.
    """
    path = out / "prose.jsonl"
    if path.is_file():
        return path
    import pydoc_data.topics

    budget, cap = int(megabytes * 1e6), int(per_package_mb * 1e6)
    docs: list[str] = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    site = Path(sysconfig.get_paths()["purelib"])

    def package_texts(pkg: Path):
        meta = sorted(site.glob(f"{pkg.name.replace('-', '_')}-*.dist-info/METADATA"))
        for m in meta[:1]:
            text = m.read_text(encoding="utf-8", errors="replace")
            yield text.split("\n\n", 1)[1] if "\n\n" in text else ""
        for f in sorted(p for ext in ("rst", "md") for p in pkg.rglob(f"*.{ext}")):
            try:
                yield f.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
        for src in sorted(pkg.rglob("*.py")):
            if "test" in src.relative_to(pkg).parts[0:-1] or "tests" in src.parts:
                continue
            try:
                tree = ast.parse(src.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError, RecursionError):
                continue
            for node in [tree, *ast.walk(tree)]:
                if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    text = ast.get_docstring(node)
                    if text and len(text) >= 200:
                        yield text

    size = sum(len(d) for d in docs)
    for pkg in sorted(p for p in site.iterdir() if p.is_dir() and not p.name.endswith((".dist-info", "__pycache__"))):
        taken = 0
        for text in package_texts(pkg):
            if len(text) < 200:
                continue
            docs.append(text[: cap - taken])
            taken += len(docs[-1])
            if taken >= cap:
                break
        size += taken
        if size >= budget:
            break
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    tmp.rename(path)
    print(f"prose corpus: {len(docs):,} documents, {size / 1e6:.1f} M characters -> {path}", file=sys.stderr)
    return path


def recipe_config(name: str):
    cfg = merge(textbook(), parse_recipe(name))
    return cfg


def compute_key(cfg) -> str:
    """What decides a recipe's step time: the model's shape and layers, the batch and the optimizer, not its
    initialisation or learning-rate schedule (zeroinit, wsd and lr changes compute exactly what textbook does)."""
    model = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k not in ("zero_init_proj", "init_std")}
    train = {k: getattr(cfg.train, k) for k in ("batch_size", "optimizer", "tokenizer_vocab_size")}
    return json.dumps([model, train], sort_keys=True)


def step_seconds(names: list[str], vocab_size: int, precision: str, rounds: int = 3, steps: int = 3) -> dict:
    """Seconds per optimizer step of each recipe on random tokens, interleaved (round-robin, the order rotated
    every round) so that background load hits every recipe alike; the best of `rounds` for each. Recipes that
    compute the same thing (same compute_key) are timed once and share the figure. Uses `lmforge bench
    train`'s step."""
    from lmforge.models import build_model
    from lmforge.train.bench import _time_steps
    from lmforge.train.optim import build_optimizers
    from lmforge.train.precision import autocast_for

    dev = torch.device("cpu")
    built, key_of = {}, {}
    for name in names:
        cfg = recipe_config(name)
        cfg.model.vocab_size = round_vocab(cfg.train.tokenizer_vocab_size, vocab_size)
        key_of[name] = compute_key(cfg)
        if key_of[name] in built:
            continue
        torch.manual_seed(0)
        model = build_model(cfg.model)
        built[key_of[name]] = (model, build_optimizers(model, cfg.train, dev), cfg)
    times = {k: [] for k in built}
    keys = list(built)
    for r in range(rounds):
        for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
            model, opts, cfg = built[key]
            t = _time_steps(
                model,
                opts,
                cfg.train.batch_size,
                cfg.model.block_size,
                cfg.model.vocab_size,
                dev,
                autocast_for(dev, precision),
                steps,
                2 if r == 0 else 1,
            )
            times[key].append(t)
    return {n: min(times[key_of[n]]) for n in names}


def round_vocab(tokenizer_vocab: int, default_vocab: int) -> int:
    """The model vocabulary a run gets for a tokenizer of this size (lmforge rounds it up to a multiple of 64)."""
    from lmforge.config import round_up

    return round_up(tokenizer_vocab) if tokenizer_vocab else default_vocab


def run(name, corpus, steps, step_s, budget_s, precision, out: Path, eval_interval, prose_mb, threads):
    """Train recipe `name` for `steps` optimizer steps (its share of the budget at its measured step time)."""
    import shutil

    from lmforge.train.loop import train

    torch.set_num_threads(threads)
    cfg = recipe_config(name)
    tc = cfg.train
    tc.max_time, tc.max_steps, tc.max_tokens = None, steps, None
    tc.precision, tc.eval_interval, tc.sample_tokens, tc.log_interval = precision, eval_interval, 0, 50
    tc.checkpoint_interval, tc.keep_checkpoints = 10**9, 1
    data = None if corpus == "stdlib" else build_prose(out, prose_mb)
    run_dir = out / "runs" / f"{corpus}-{int(budget_s)}s-{precision}-{name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.time()
    res = train(cfg, run_dir, data=data, cache_root=out / "cache", log=lambda *_: None)
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # seconds of training at the measured step time, so every recipe is on the same (budget) clock
    curve = [(r["step"] * step_s, r["val_bpb"]) for r in recs if "val_bpb" in r]
    from lmforge.models import build_model

    rec = {
        "recipe": name,
        "corpus": corpus,
        "seconds": budget_s,
        "precision": precision,
        "final_bpb": curve[-1][1],
        "curve": curve,
        "steps": res.step,
        "step_s": step_s,
        "tokens": res.tokens,
        "tokens_per_s": res.tokens / res.step / step_s,
        "params": build_model(cfg.model).num_params(),
        "wall": round(time.time() - t0, 1),
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "command": "python benchmarks/recipe_ablation.py " + shlex.join(sys.argv[1:]),
    }
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    with open(out / "results.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")
    print(
        f"{corpus:<7} {name:<40} bpb {rec['final_bpb']:.4f}  steps {res.step:>5} x {1000 * step_s:.0f} ms  "
        f"({rec['wall']:.0f}s wall)",
        flush=True,
    )
    return rec


def time_to(curve, target):
    """Training seconds at which the curve first reaches target (linear between evaluations), or None."""
    prev = (0.0, float("inf"))
    for t, v in curve:
        if v <= target:
            if prev[1] == float("inf"):
                return t
            return prev[0] + (t - prev[0]) * (prev[1] - target) / (prev[1] - v)
        prev = (t, v)
    return None


def table(out: Path) -> str:
    recs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    latest = {}
    for r in recs:  # the latest measurement of each (corpus, seconds, precision, recipe); repeats listed too
        latest.setdefault((r["corpus"], r["seconds"], r["precision"], r["recipe"]), []).append(r)
    lines = []
    for corpus, seconds, precision in sorted({k[:3] for k in latest}):
        group = {k[3]: v for k, v in latest.items() if k[:3] == (corpus, seconds, precision)}
        if "textbook" not in group:
            continue
        base = group["textbook"][-1]
        target = base["final_bpb"]
        lines += [
            "",
            f"**{corpus}, {seconds:.0f} s of training, {precision}** — textbook final {target:.4f} bits/byte",
            "",
            "| recipe | val bits/byte | vs textbook | time to textbook's final | steps | tok/s | params |",
            "|---|---|---|---|---|---|---|",
        ]
        order = sorted(group, key=lambda n: group[n][-1]["final_bpb"])
        for name in order:
            for r in group[name]:
                t = time_to(r["curve"], target)
                when = f"{t:.0f} s ({t / base['curve'][-1][0]:.2f})" if t is not None else "not reached"
                lines.append(
                    f"| {name} | {r['final_bpb']:.4f} | {100 * (r['final_bpb'] / target - 1):+.1f} % | {when} | "
                    f"{r['steps']} | {r['tokens_per_s']:,.0f} | {r['params'] / 1e6:.2f}M |"
                )
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=90, help="the wall-clock budget, in seconds of textbook steps")
    p.add_argument("--textbook-step", type=float, default=None, help="seconds per textbook step (default: measure)")
    p.add_argument("--corpus", default="stdlib", help="stdlib, prose, or both")
    p.add_argument("--only", default="textbook", help="comma-separated recipe names (see the module docstring)")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--eval-interval", type=int, default=25)
    p.add_argument("--prose-mb", type=float, default=8.0)
    p.add_argument("--jobs", type=int, default=2, help="quality runs in parallel, one thread each (not timed)")
    p.add_argument("--out", default="bench-out/ablation")
    p.add_argument("--rounds", type=int, default=3, help="step timing: interleaved rounds (the best counts)")
    p.add_argument("--phase", default="all", choices=["all", "time", "train"], help="time: step times only")
    p.add_argument("--table", action="store_true", help="print the table of all results in OUT (no training)")
    p.add_argument("--write", action="store_true", help="with --table: append it to benchmarks/RESULTS.md")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.table:
        text = table(out)
        print(text)
        if args.write:
            with open(ROOT / "benchmarks" / "RESULTS.md", "a", encoding="utf-8") as f:
                f.write(text + "\n")
        return
    torch.set_num_threads(min(2, torch.get_num_threads()))
    corpora = ["stdlib", "prose"] if args.corpus == "both" else [args.corpus]
    names = [n for n in args.only.split(",") if n]
    for n in names:
        parse_recipe(n)  # fail before training anything
    # 1. seconds per step of every recipe (and the textbook), interleaved, with all threads: the timed part.
    # Stored in OUT/step_times.json (per precision), so --phase time (under the CPU lock) and --phase train
    # (deterministic; may run at low priority outside it) can be separate commands.
    times_path = out / "step_times.json"
    stored = json.loads(times_path.read_text()) if times_path.is_file() else {}
    timing = list(dict.fromkeys(["textbook", *names]))
    if args.phase in ("all", "time"):
        measured = step_seconds(timing, 4096, args.precision, rounds=args.rounds, steps=3)
        # ratios to the textbook measured in the same round-robin are what carries across sessions
        rel = {n: t / measured["textbook"] for n, t in measured.items()}
        stored[args.precision] = {**stored.get(args.precision, {}), **rel}
        stored[f"{args.precision}_textbook_s"] = measured["textbook"]
        times_path.write_text(json.dumps(stored, indent=1))
    rel = dict(stored.get(args.precision, {}))
    keys = {compute_key(recipe_config(n)): n for n in rel}
    for n in timing:  # a recipe that computes what a timed one does (an init or schedule change) shares its time
        if n not in rel and compute_key(recipe_config(n)) in keys:
            rel[n] = rel[keys[compute_key(recipe_config(n))]]
    missing = [n for n in timing if n not in rel]
    if missing:
        raise SystemExit(f"no step time for {', '.join(missing)}: run --phase time first (under the CPU lock)")
    ref = args.textbook_step or stored[f"{args.precision}_textbook_s"]
    step_s = {n: rel[n] * ref for n in timing}
    for n in timing:
        print(f"step time {n:<40} {1000 * step_s[n]:7.0f} ms ({1 / rel[n]:.2f}x textbook speed)")
    if args.phase == "time":
        return
    # 2. each recipe trains for the steps its step time allows in the budget: deterministic, so run in parallel
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from lmforge.data.prepare import ensure_data

    for corpus in corpora:  # prepare data once per tokenizer before the parallel runs share the cache
        for vocab in sorted({recipe_config(n).train.tokenizer_vocab_size for n in names}):
            tc = recipe_config("textbook").train
            tc.tokenizer_vocab_size = vocab
            ensure_data(None if corpus == "stdlib" else build_prose(out, args.prose_mb), tc, out / "cache", print)
    jobs = [(n, c, max(1, round(args.seconds / step_s[n])), step_s[n], args.seconds) for c in corpora for n in names]
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        futures = [
            pool.submit(run, *j, args.precision, out, args.eval_interval, args.prose_mb, 1 if args.jobs > 1 else 2)
            for j in jobs
        ]
        for f in futures:
            f.result()


if __name__ == "__main__":
    main()
