"""Run directories: a self-contained folder with everything needed to use a trained model.

runs/NAME/config.json        model family ("decoder" or "seq2seq") + model and training configuration
runs/NAME/tokenizer.json     the tokenizer (standard Hugging Face format); for seq2seq the target one
runs/NAME/source_tokenizer.json   seq2seq only, when source and target vocabularies are separate
runs/NAME/model.safetensors  weights
runs/NAME/metrics.jsonl      one JSON object per log line / evaluation
runs/NAME/data.json          what the run trained on (the prepared shards, or the pairs / demo), for --resume
runs/NAME/checkpoints/step_NNNNNNN/, best/   model.safetensors, trainer_state.pt (optimizer, step, RNG states;
                             torch.load(weights_only=True)) and manifest.json (sizes and hashes): see
                             lmforge/train/checkpoint.py
runs/NAME/chat_template.jinja     optional: the chat template (Hugging Face conventions), or a
                             `chat_template` in runs/NAME/tokenizer_config.json
runs/NAME/eval/              benchmark results (`lmforge eval --tasks`), one JSON file per evaluation
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .config import FAMILIES, Config
from .data.tokenizer import Tokenizer
from .errors import LmforgeError
from .io import atomic_path, write_json_atomic
from .machine import pick_device
from .models import build_model

CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
WEIGHTS = "model.safetensors"
TRAINER_STATE = "trainer_state.pt"
METRICS = "metrics.jsonl"
DATA_INFO = "data.json"  # where a run's training data is (the shards, or a pairs file / demo), for --resume
CHAT_TEMPLATE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
EVAL_DIR = "eval"
WANDB_RUN = "wandb.json"  # the Weights & Biases run id (--wandb), so that --resume continues the same W&B run


def save_config(run_dir: Path, cfg: Config) -> None:
    write_json_atomic(Path(run_dir) / CONFIG, {"lmforge_version": __version__, "family": cfg.family, **cfg.to_dict()})


def load_config(run_dir: str | Path) -> Config:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise LmforgeError(f"run directory not found: {run_dir}")
    path = run_dir / CONFIG
    if not path.is_file():
        raise LmforgeError(f"{run_dir} is not a run directory (no {CONFIG})")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LmforgeError(f"corrupt {path}: {e}") from None
    if not isinstance(d, dict):
        raise LmforgeError(f"corrupt {path}: not a JSON object")
    family = d.get("family", "decoder")
    if family not in FAMILIES:
        raise LmforgeError(f"{path} names an unknown model family {family!r} (known: {', '.join(FAMILIES)})")
    d = {k: v for k, v in d.items() if k in ("model", "train")}
    cfg = Config.from_dict(d, family)
    cfg.validate()
    return cfg


def read_data_info(run_dir: Path) -> dict:
    """A run's data.json as a dict; LmforgeError (one line) when it is missing, unreadable or not a JSON object."""
    path = Path(run_dir) / DATA_INFO
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LmforgeError(f"cannot resume {run_dir}: it has no {DATA_INFO} (where its training data is)") from None
    except (OSError, ValueError) as e:
        raise LmforgeError(f"cannot resume {run_dir}: unreadable {path} ({e})") from None
    if not isinstance(info, dict):
        raise LmforgeError(f"cannot resume {run_dir}: corrupt {path} (not a JSON object)")
    return info


def weights_for_saving(model) -> dict[str, torch.Tensor]:
    """The state dict without tied duplicates (safetensors stores each tensor once): a weight shared under
    several names (a tied LM head, a source/target embedding) is kept under the first name only."""
    out, seen = {}, set()
    for k, v in model.state_dict().items():
        key = (v.data_ptr(), v.dtype, tuple(v.shape), v.stride())
        if key not in seen:
            seen.add(key)
            out[k] = v.detach().contiguous().cpu()
    return out


def save_weights(path: Path, model, metadata: dict | None = None) -> None:
    with atomic_path(path) as tmp:
        save_file(weights_for_saving(model), str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})


def load_weights(path: Path, model) -> dict:
    """Load safetensors weights into model (strict), returning the file's metadata."""
    if not path.is_file():
        raise LmforgeError(f"missing weights file {path}")
    try:
        sd = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise LmforgeError(f"corrupt or truncated weights file {path}: {e}") from None
    if getattr(model.config, "tie_embeddings", False):
        sd.pop("lm_head.weight", None)
    expected = set(weights_for_saving(model))
    missing, unexpected = expected - set(sd), set(sd) - expected
    if missing or unexpected:
        raise LmforgeError(
            f"weights in {path} do not match the model config "
            f"(missing: {sorted(missing)[:3]}, unexpected: {sorted(unexpected)[:3]})"
        )
    for k, v in sd.items():
        want = model.state_dict()[k].shape
        if v.shape != want:
            raise LmforgeError(
                f"weights in {path} do not match the model config: "
                f"{k} has shape {tuple(v.shape)}, expected {tuple(want)}"
            )
    model.load_state_dict(sd, strict=False)
    return meta


def save_trainer_state(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_trainer_state(path: Path) -> dict:
    if not path.is_file():
        raise LmforgeError(f"missing trainer state {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip or a pickle we refuse to run
        raise LmforgeError(f"corrupt trainer state {path}: {str(e).splitlines()[0]}") from None


def load_tokenizer(run_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(Path(run_dir) / TOKENIZER)


def load_pair_tokenizer(run_dir: Path, model_cfg):
    """The source/target tokenizers of a seq2seq run, checked against the model's vocabulary sizes."""
    from .data.pairs import PairTokenizer

    tok = PairTokenizer.load(run_dir, model_cfg.shared_vocab)
    for side, t, size in (
        ("source", tok.source, model_cfg.src_vocab_size),
        ("target", tok.target, model_cfg.tgt_vocab_size),
    ):
        if t.vocab_size > size:
            raise LmforgeError(
                f"{side} tokenizer in {run_dir} has {t.vocab_size} tokens but the model's {side} vocabulary is {size}"
            )
    return tok


def load(run_dir: str | Path, device: str | torch.device = "cpu"):
    """(model, tokenizer) from a run directory; the model is in eval mode on `device`.

    For a seq2seq run the tokenizer is a `pairs.PairTokenizer` (source and target sides)."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir)
    if cfg.family == "seq2seq":
        tokenizer = load_pair_tokenizer(run_dir, cfg.model)
    else:
        tokenizer = load_tokenizer(run_dir)
        if tokenizer.vocab_size > cfg.model.vocab_size:
            raise LmforgeError(
                f"tokenizer in {run_dir} has {tokenizer.vocab_size} tokens "
                f"but the model's vocabulary is {cfg.model.vocab_size}"
            )
    model = build_model(cfg.model)
    load_weights(run_dir / WEIGHTS, model)
    model.to(pick_device(device) if isinstance(device, str) else device).eval()
    return model, tokenizer
