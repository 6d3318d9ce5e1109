"""Decode speed: lmforge's engine with each CPU kernel against transformers' `generate`, identical GPT-2 (124M) weights.

Random weights, greedy, prompt 128 tokens, 128 new tokens, batch 1 and 8. For every kernel of every
--quantize option (lmforge.inference.quantize.KERNELS) that this CPU can run, prints tokens/s, the
ratio to transformers, and the decode speed as a fraction of the memory-bandwidth ceiling: the
tokens/s at which each step would only stream its bytes (that variant's weights as stored, plus
the KV cache) at the measured read bandwidth. Starred rows are the kernels `--quantize` picks here.
Runs are interleaved and repeated; each figure is the best of the runs (a run's decode speed from its
median step time), because the machine is shared and other work only ever slows a run down.

    flock /tmp/lmforge-cpu.lock python benchmarks/decode_speed.py
    flock /tmp/lmforge-cpu.lock python benchmarks/decode_speed.py --batches 1 --variants onednn,bf16-linear
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
from lmforge.inference import quantize as Q  # noqa: E402
from lmforge.inference.engine import Engine, generate_batch  # noqa: E402
from lmforge.inference.sampling import SamplingParams  # noqa: E402
from lmforge.machine import describe_cpu  # noqa: E402
from lmforge.models import DecoderLM, build_model  # noqa: E402

WEIGHT_BYTES = {"bf16": 2, "int8": 1, "int8-dynamic": 1}  # per weight of a linear layer, by option (fp32: 4)


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s for streaming a tensor larger than the caches from memory (a sum reads every byte once)."""
    x = torch.ones(int(gib * (1 << 30)) // 4)
    x.sum()
    best = 1e9
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def bytes_per_step(model, batch: int, context: float, option: str = "none") -> float:
    """Bytes one decode step reads: every linear layer's weights as the option stores them (the tied LM head
    reads the whole embedding), the other parameters in fp32 except the embeddings (one row each), plus
    every row's keys and values at the given average context length (bf16 with --quantize bf16, else fp32)."""
    c = model.config
    linear = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)}
    embeddings = {id(model.tok_emb.weight), id(model.pos_emb.weight)} - set(linear)
    other = sum(p.numel() for p in model.parameters() if id(p) not in linear and id(p) not in embeddings)
    kv = c.n_layer * 2 * batch * context * c.kv_heads * c.head_dim
    return sum(linear.values()) * WEIGHT_BYTES.get(option, 4) + other * 4 + kv * (2 if option == "bf16" else 4)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--variants",
        default=",".join(k for ks in Q.KERNELS.values() for k in ks),
        help="kernels to run (lmforge.inference.quantize.KERNELS), plus fp32-compile (torch.compile'd decode step, "
        "minutes to compile); kernels this CPU cannot run are listed and skipped",
    )
    args = ap.parse_args()
    known = [k for ks in Q.KERNELS.values() for k in ks] + ["fp32-compile"]
    if unknown := [v for v in args.variants.split(",") if v not in known]:
        ap.error(f"unknown variant(s) {', '.join(unknown)}: choose from {', '.join(known)}")
    print(f"CPU: {describe_cpu()}")
    torch.manual_seed(0)
    base = build_model(preset("gpt2").model).eval()
    hf = to_hf_gpt2(base)
    print(
        f"GPT-2 124M shape, random weights; max |logit difference| lmforge vs transformers: {check_same(base, hf):.2e}"
    )
    chosen = {q: Q.choose_kernel(q, base, log=print, compiled=True) for q in Q.QUANTIZE}  # as the server chooses
    print("--quantize picks on this CPU: " + ", ".join(f"{q} -> {k}" for q, k in chosen.items()))
    option_of = {k: q for q, ks in Q.KERNELS.items() for k in ks} | {"fp32-compile": "none"}
    models = {}
    for v in args.variants.split(","):
        if v == "fp32-compile":
            models[v] = base
        elif (why := Q.kernel_available(v)) is not None:
            print(f"  {v}: not available on this CPU ({why})")
        else:
            models[v] = Q.pack_for_inference(copy.deepcopy(base), option_of[v], kernel=v)
    bw = max(read_bandwidth() for _ in range(3))
    print(f"measured memory read bandwidth: {bw / 1e9:.1f} GB/s (measured again in every round; the best counts)\n")

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
        # warm up, and check both generate the same greedy tokens (fp32 through the chosen kernel)
        theirs = run_hf(ids, args.new)[:, args.prompt :].tolist()
        fp32 = models.get(chosen["none"]) or Q.pack_for_inference(copy.deepcopy(base), "none")
        mine = [c.token_ids for c in run_ours(fp32, prompts, args.new)]
        same = sum(a == b for ra, rb in zip(theirs, mine) for a, b in zip(ra, rb)) / (B * args.new)
        for v, m in models.items():
            run_ours(m, prompts, 4, compile=v == "fp32-compile")
        totals, steps = {}, {}
        for _ in range(args.repeats):
            bw = max(bw, read_bandwidth(repeats=2))  # between runs, so the ceiling sees the same background load
            for name, model, fn in [("transformers", hf, lambda ids=ids: run_hf(ids, args.new))] + [
                (v, m, lambda m=m, v=v, p=prompts: run_ours(m, p, args.new, v == "fp32-compile"))
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
        print(f"batch {B}: greedy tokens of fp32 ({chosen['none']}) identical to transformers: {same:.1%}")
        print(
            f"  {'':<18} {'option':<13} {'end-to-end tok/s':>17} {'x transformers':>15} {'decode tok/s':>13} "
            f"{'x transformers':>15} {'of bandwidth ceiling':>21}"
        )
        for name in totals:
            option = option_of.get(name, "none")
            ceiling = B * bw / bytes_per_step(base, B, context, option)  # tok/s if a step only streamed its bytes
            star = "*" if chosen.get(option) == name else " "
            print(
                f"  {name + star:<18} {'' if name == 'transformers' else option:<13} {e2e[name]:>17.1f} "
                f"{e2e[name] / e2e['transformers']:>14.2f}x {decode[name]:>13.1f} "
                f"{decode[name] / decode['transformers']:>14.2f}x {decode[name] / ceiling:>20.0%}"
            )
        print(
            f"  (ceiling at fp32: {B * bw / bytes_per_step(base, B, context):.1f} tok/s = {bw / 1e9:.1f} GB/s / "
            f"{bytes_per_step(base, B, context) / 1e6:.0f} MB read per step x {B} rows; bf16 and int8 weights read "
            f"2x / 4x fewer bytes. Best of {args.repeats} runs: end-to-end incl. prefill, decode = median step time)\n"
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
