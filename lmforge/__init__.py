"""lmforge: build, train and run transformer language models from scratch.

The public API is imported lazily (PEP 562), so `import lmforge` and `lmforge --help` stay cheap:
torch is loaded the first time one of these names is used.

    load(run_dir)                     (model, tokenizer) from a run directory
    generate / generate_stream        continue one prompt (whole text / piece by piece)
    generate_batch, SamplingParams    many prompts at once, each with its own settings
    translate                         seq2seq runs: the best output for each source
    Tokenizer                         byte-level BPE
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "LmforgeError": "lmforge.errors",
    "SamplingParams": "lmforge.inference.sampling",
    "generate": "lmforge.inference.engine",
    "generate_batch": "lmforge.inference.engine",
    "generate_stream": "lmforge.inference.engine",
    "load": "lmforge.runs",
    "translate": "lmforge.inference.beam",
    "Tokenizer": "lmforge.data.tokenizer",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lmforge' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
