"""Decode speed: lmforge's engine against transformers' `generate` on identical GPT-2 (124M) weights, CPU.

Random weights, greedy, prompt 128 tokens, 128 new tokens, batch 1 and 8. Prints tokens/s for
each, the ratio to transformers, and the decode speed as a fraction of the memory-bandwidth limit
(bytes of weights + KV cache read per step / measured read bandwidth). Runs are interleaved and
repeated; each figure is the best of the runs (a run's decode speed from its median step time),
because the machine is shared and other work only ever slows a run down.

    flock /tmp/lmforge-cpu.lock python benchmarks/decode_speed.py
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's lmforge, not an installed one
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from hf_gpt2 import check_same, to_hf_gpt2  # noqa: E402

from lmforge.config import preset  # noqa: E402
from lmforge.inference.engine import Engine, generate_batch  # noqa: E402
from lmforge.inference.quantize import pack_for_inference  # noqa: E402
from lmforge.inference.sampling import SamplingParams
from lmforge.models import DecoderLM, build_model  # noqa: E402


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s for streaming a large tensor from memory (a sum reads every byte once)."""
    x = torch.ones(int(gib * (1 << 30)) // 4)
    x.sum()
    best = 1e9
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def bytes_per_step(model, batch: int, context: float) -> float:
    """Weights read once per decode step (the tied embedding is read whole by the LM head; positions one row)
    plus every row's keys and values at the given average context length."""
    c = model.config
    weights = sum(p.numel() for p in model.parameters()) - model.pos_emb.weight.numel()
    kv = c.n_layer * 2 * batch * context * c.kv_heads * c.head_dim
    return (weights + kv) * 4


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--variants",
        default="fp32,fp32-linear,bf16,int8-dynamic,int8",
        help="lmforge variants: fp32 (oneDNN-packed), fp32-linear (plain nn.Linear), bf16, int8-dynamic, int8, "
        "fp32-compile (torch.compile'd decode step; minutes to compile)",
    )
    args = ap.parse_args()
    torch.manual_seed(0)
    base = build_model(preset("gpt2").model).eval()
    hf = to_hf_gpt2(base)
    print(
        f"GPT-2 124M shape, random weights, {torch.get_num_threads()} threads; "
        f"max |logit difference| lmforge vs transformers: {check_same(base, hf):.2e}"
    )
    models = {}
    for v in args.variants.split(","):
        models[v] = (
            base
            if v in ("fp32-linear", "fp32-compile")
            else pack_for_inference(copy.deepcopy(base), {"fp32": "none"}.get(v, v))
        )
    bw = max(read_bandwidth() for _ in range(3))
    print(f"measured memory read bandwidth: {bw / 1e9:.1f} GB/s\n")

    def run_ours(model, prompts, new, compile=False):
        return generate_batch(
            model, None, prompts, SamplingParams(max_new_tokens=new, temperature=0.0, ignore_eos=True), compile=compile
        )

    def run_hf(ids, new):
        with torch.inference_mode():
            return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False)

    for B in [int(b) for b in args.batches.split(",")]:
        g = torch.Generator().manual_seed(B)
        ids = torch.randint(0, 50257, (B, args.prompt), generator=g)
        prompts = ids.tolist()
        # warm up, and check both generate the same greedy tokens
        theirs = run_hf(ids, args.new)[:, args.prompt :].tolist()
        mine = [c.token_ids for c in run_ours(models.get("fp32", base), prompts, args.new)]
        same = sum(a == b for ra, rb in zip(theirs, mine) for a, b in zip(ra, rb)) / (B * args.new)
        for v, m in models.items():
            run_ours(m, prompts, 4, compile=v.endswith("compile"))
        totals, steps = {}, {}
        for _ in range(args.repeats):
            for name, model, fn in [("transformers", hf, lambda ids=ids: run_hf(ids, args.new))] + [
                (v, m, lambda m=m, v=v, prompts=prompts: run_ours(m, prompts, args.new, v.endswith("compile")))
                for v, m in models.items()
            ]:
                with forward_times(model) as stamps:
                    t0 = time.perf_counter()
                    fn()
                    total = time.perf_counter() - t0
                totals[name] = min(totals.get(name, 1e9), total)
                step = statistics.median(b - a for a, b in zip(stamps[1:], stamps[2:]))  # decode steps, not the prefill
                steps[name] = min(steps.get(name, 1e9), step)
        e2e = {n: B * args.new / t for n, t in totals.items()}
        decode = {n: B / t for n, t in steps.items()}
        context = args.prompt + args.new / 2
        limit = B * bw / bytes_per_step(base, B, context)  # tokens/s if every step only streamed its bytes from memory
        print(f"batch {B}: greedy tokens identical to transformers: {same:.1%}")
        print(
            f"  {'':<14} {'end-to-end tok/s':>17} {'x transformers':>15} {'decode tok/s':>13} {'x transformers':>15} "
            f"{'of bandwidth limit':>19}"
        )
        for name in totals:
            frac = f"{decode[name] / limit:.0%}" if name in ("transformers", "fp32", "fp32-linear") else ""
            print(
                f"  {name:<14} {e2e[name]:>17.1f} {e2e[name] / e2e['transformers']:>14.2f}x {decode[name]:>13.1f} "
                f"{decode[name] / decode['transformers']:>14.2f}x {frac:>19}"
            )
        print(
            f"  (fp32 bandwidth limit: {limit:.1f} tok/s = {bw / 1e9:.1f} GB/s / "
            f"{bytes_per_step(base, B, context) / 1e6:.0f} MB read per step x {B} rows; best of {args.repeats} runs: "
            "end-to-end incl. prefill, decode = median step time)\n"
        )


@contextmanager
def forward_times(module):
    """Timestamps at the end of each forward pass (prefill, then one per decode step): transformers' model
    forward, or lmforge's Engine.add/step (outside any compiled code, so timing never forces a recompile)."""
    stamps = [time.perf_counter()]
    if module is not None and not isinstance(module, DecoderLM):
        handle = module.register_forward_hook(lambda *_: stamps.append(time.perf_counter()))
        try:
            yield stamps
        finally:
            handle.remove()
        return
    add, step = Engine.add, Engine.step

    def timed(fn):
        def wrapper(self, *a, **kw):
            out = fn(self, *a, **kw)
            stamps.append(time.perf_counter())
            return out

        return wrapper

    Engine.add, Engine.step = timed(add), timed(step)
    try:
        yield stamps
    finally:
        Engine.add, Engine.step = add, step


if __name__ == "__main__":
    main()
