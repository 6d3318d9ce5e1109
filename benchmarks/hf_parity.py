"""Maximum absolute logit difference between lmforge and transformers on random-weight models (fp32, CPU).

python benchmarks/hf_parity.py
"""

import sys
import tempfile
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's lmforge, not an installed one
from test_interop import REFERENCES, save_reference  # noqa: E402

from lmforge.data.tokenizer import Tokenizer  # noqa: E402
from lmforge.interop import hf as interop  # noqa: E402
from lmforge.runs import load  # noqa: E402

transformers.logging.set_verbosity_error()
tok = Tokenizer.train(["the cat sees the moon. " * 50], 300)
print(f"{'reference':<26} {'full forward':>14} {'cached decode':>14}")
for name, build in REFERENCES.items():
    torch.manual_seed(0)
    ref = build().eval()
    with tempfile.TemporaryDirectory() as d:
        save_reference(ref, Path(d) / "hf", tok)
        model, _ = load(interop.from_hf(Path(d) / "hf", Path(d) / "run"))
    x = torch.randint(0, ref.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(x).logits
        full = (model(x) - want).abs().max().item()
        cache = model.new_cache(4, 64)
        steps = torch.cat([model(x[:, :16], cache)] + [model(x[:, t : t + 1], cache) for t in range(16, 64)], 1)
        cached = (steps - want).abs().max().item()
    print(f"{name:<26} {full:>14.2e} {cached:>14.2e}")
