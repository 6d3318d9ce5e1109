"""Model families. `build_model(config)` returns the model a config describes."""

from ..config import ModelConfig
from .decoder import DecoderLM


def build_model(cfg: ModelConfig):
    return DecoderLM(cfg)


__all__ = ["DecoderLM", "build_model"]
