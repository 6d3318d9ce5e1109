"""Attention for one decode token on a CPU: PyTorch's scaled_dot_product_attention in fp32 and in bf16.

Why lmforge keeps the KV cache and attention fp32 under `--quantize bf16` (lmforge.inference.quantize):
one query token against S cached keys and values per layer, GPT-2 124M's 12 heads of 64, batch 1, best of
5 x 2,000 calls per shape, both dtypes in one process.

    flock /tmp/lmforge-cpu.lock python benchmarks/decode_attention.py
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def per_call_us(fn, calls: int = 2000, repeats: int = 5) -> float:
    """Best mean time of one call, in microseconds."""
    for _ in range(50):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t) / calls)
    return best * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="192,1024", help="cached positions S, comma-separated")
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    args = ap.parse_args()
    from lmforge.machine import describe_cpu

    print(f"CPU: {describe_cpu()}")
    print(f"{'cached positions':>17} {'fp32 us/layer':>14} {'bf16 us/layer':>14} {'bf16 / fp32':>12}")
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for S in (int(s) for s in args.lengths.split(",")):
            q, k, v = (torch.randn(1, args.heads, n, args.head_dim, generator=g) for n in (1, S, S))
            t = {}
            for dtype in (torch.float32, torch.bfloat16):
                qd, kd, vd = q.to(dtype), k.to(dtype), v.to(dtype)
                t[dtype] = per_call_us(lambda qd=qd, kd=kd, vd=vd: F.scaled_dot_product_attention(qd, kd, vd))
            fp32, bf16 = t[torch.float32], t[torch.bfloat16]
            print(f"{S:>17} {fp32:>14.1f} {bf16:>14.1f} {bf16 / fp32:>11.1f}x")


if __name__ == "__main__":
    main()
