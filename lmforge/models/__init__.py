"""Model families. `build_model(config)` returns the model a config describes."""

from ..config import ModelConfig, Seq2SeqConfig
from .decoder import DecoderLM
from .seq2seq import Seq2SeqTransformer


def build_model(cfg: ModelConfig | Seq2SeqConfig):
    if isinstance(cfg, Seq2SeqConfig):
        return Seq2SeqTransformer(cfg)
    return DecoderLM(cfg)


__all__ = ["DecoderLM", "Seq2SeqTransformer", "build_model"]
