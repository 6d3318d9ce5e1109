"""What --quantize costs and buys: perplexity, agreement with fp32 and decode speed for each option.

Needs a trained run (random weights say nothing about quality), e.g. the default `lmforge train`,
and text it did not train on:

    flock /tmp/lmforge-cpu.lock python benchmarks/quantization.py runs/tiny --data lmforge/
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lmforge.evaluation.perplexity import evaluate_text  # noqa: E402
from lmforge.inference.engine import generate_batch
from lmforge.inference.quantize import QUANTIZE, pack_for_inference  # noqa: E402
from lmforge.inference.sampling import SamplingParams  # noqa: E402
from lmforge.runs import load  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--data", required=True, help="held-out text (file, directory, glob)")
    ap.add_argument("--max-tokens", type=int, default=200_000)
    ap.add_argument("--new", type=int, default=128, help="tokens generated for the speed figure")
    args = ap.parse_args()

    ref_model, tok = load(args.run)
    probe = torch.randint(
        0, tok.vocab_size, (4, ref_model.config.block_size), generator=torch.Generator().manual_seed(0)
    )
    with torch.inference_mode():
        ref_logp = torch.log_softmax(ref_model(probe).float(), -1)
    prompt = tok.encode("import os\n\ndef main():\n")
    print(
        f"{args.run}: {ref_model.num_params() / 1e6:.1f}M parameters; perplexity on {args.data}; "
        f"decode speed at batch 1, {args.new} tokens\n"
    )
    print(
        f"{'weights':<22} {'perplexity':>10} {'change':>8} {'KL vs fp32 (nats/token)':>24} {'top-1 agreement':>16} "
        f"{'decode tok/s':>13}"
    )
    base_ppl = None
    for q in ("fp32 (nn.Linear)",) + QUANTIZE:
        model, _ = load(args.run)
        if q in QUANTIZE:
            pack_for_inference(model, q)
        res = evaluate_text(model, tok, args.data, max_tokens=args.max_tokens)
        with torch.inference_mode():
            logp = torch.log_softmax(model(probe).float(), -1)
        kl = float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean())
        agree = float((ref_logp.argmax(-1) == logp.argmax(-1)).float().mean())
        params = SamplingParams(max_new_tokens=args.new, temperature=0.0, ignore_eos=True)
        generate_batch(model, tok, [prompt], params)  # warm up
        best = 1e9
        for _ in range(3):
            t = time.perf_counter()
            generate_batch(model, tok, [prompt], params)
            best = min(best, time.perf_counter() - t)
        base_ppl = base_ppl or res["perplexity"]
        name = {"none": "fp32 (oneDNN-packed)"}.get(q, q)
        print(
            f"{name:<22} {res['perplexity']:>10.3f} {res['perplexity'] / base_ppl - 1:>+8.2%} {kl:>24.5f} "
            f"{agree:>16.2%} {args.new / best:>13.1f}"
        )


if __name__ == "__main__":
    main()
