"""lmforge: build, train and run transformer language models from scratch."""

__version__ = "0.1.0"

from .errors import LmforgeError  # noqa: E402
from .generation import SamplingParams, generate, generate_batch, generate_stream  # noqa: E402
from .runs import load  # noqa: E402
from .seq2seq import translate  # noqa: E402
from .tokenizer import Tokenizer  # noqa: E402

__all__ = ["LmforgeError", "SamplingParams", "Tokenizer", "generate", "generate_batch", "generate_stream", "load", "translate",
           "__version__"]
