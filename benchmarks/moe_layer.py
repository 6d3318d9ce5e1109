"""Forward + backward time of an 8-expert top-2 MoE layer against a dense FFN of one expert's size and
against a naive MoE that runs every expert on every token (same tokens, same run, fp32 CPU).

    python benchmarks/moe_layer.py [--tokens 4096] [--d-model 512] [--d-ff 1024] [--repeats 7]

The ideal MoE / dense ratio is top_k = 2 (each token passes through two experts of the dense size);
the ideal naive / MoE ratio is experts / top_k = 4.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's lmforge, not an installed one
from lmforge.config import ModelConfig  # noqa: E402
from lmforge.models.layers import MLP  # noqa: E402
from lmforge.models.moe import MoE, choose_experts  # noqa: E402


def naive_moe(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, weighted by a dense (tokens, experts) gate matrix that is zero off the top-k."""
    B, T, D = x.shape
    probs, gates, experts = choose_experts(layer.router(x), layer.top_k, layer.renormalize)
    dense_gates = torch.zeros_like(probs).scatter(-1, experts, gates)  # (B, T, E)
    outs = torch.stack([expert(x) for expert in layer.experts], dim=-2)  # (B, T, E, D)
    return (outs * dense_gates[..., None]).sum(dim=-2)


def time_fwd_bwd(fn, x, repeats):
    times = []
    for _ in range(repeats):
        xi = x.detach().requires_grad_()
        t0 = time.perf_counter()
        fn(xi).square().mean().backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--d-ff", type=int, default=1024, help="hidden size of one expert (and of the dense FFN)")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig(
        d_model=args.d_model, d_ff=args.d_ff, mlp="swiglu", bias=False, moe_experts=args.experts, moe_top_k=args.top_k
    )
    moe, dense = MoE(cfg).train(), MLP(cfg).train()
    x = torch.randn(args.tokens // 256, 256, args.d_model)
    with torch.no_grad():
        err = (moe(x) - naive_moe(moe, x)).abs().max().item()

    impls = {
        "dense FFN (one expert's size)": dense,
        "MoE (sorted dispatch)": moe,
        "naive MoE (all experts)": lambda x: naive_moe(moe, x),
    }
    for fn in impls.values():  # warm up
        time_fwd_bwd(fn, x, 1)
    results = {name: [] for name in impls}
    for _ in range(3):  # interleave rounds so machine noise hits every implementation alike
        for name, fn in impls.items():
            results[name].append(time_fwd_bwd(fn, x, args.repeats))
    t = {name: min(v) for name, v in results.items()}

    print(
        f"{args.tokens} tokens, d_model {args.d_model}, expert d_ff {args.d_ff}, "
        f"{args.experts} experts top-{args.top_k}, {args.threads} threads; "
        f"forward+backward, best of 3 medians of {args.repeats}"
    )
    for name, v in t.items():
        print(f"  {name:<32} {1e3 * v:8.1f} ms")
    d, m, n = t["dense FFN (one expert's size)"], t["MoE (sorted dispatch)"], t["naive MoE (all experts)"]
    print(f"MoE / dense  = {m / d:.2f}x   (ideal {args.top_k}x)")
    print(f"naive / MoE  = {n / m:.2f}x   (ideal {args.experts / args.top_k:.0f}x)")
    print(f"max |MoE - naive| output difference: {err:.2e}")


if __name__ == "__main__":
    main()
