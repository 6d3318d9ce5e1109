"""Configuration: plain dataclasses, named presets, TOML files and CLI overrides.

A run is described by a `Config` with two sections, `model` and `train`, whose field
names are the same in Python, in TOML files (`[model]`, `[train]` tables) and on the
command line (`--n_layer 4` or `--model.n_layer=4`). Unknown keys are an error.
The model section is a `ModelConfig` (decoder-only LM, family "decoder") or a
`Seq2SeqConfig` (encoder–decoder, family "seq2seq").
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import tomllib

from .errors import LmforgeError


@dataclass
class ModelConfig:
    """Architecture of a decoder-only transformer. Defaults give a GPT-2 style model."""

    vocab_size: int = 50304
    block_size: int = 1024  # longest sequence the model is trained on (context window)
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # None = n_head (multi-head); fewer = grouped-query; 1 = multi-query
    d_model: int = 768
    d_ff: int | None = None  # feed-forward hidden size; None = 4 * d_model
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    norm_bias: bool = True  # LayerNorm with a bias (ignored for rmsnorm)
    pos: str = "learned"  # learned | sinusoidal | rope | none
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # e.g. {"type": "linear", "factor": 2.0} or {"type": "llama3", ...}
    mlp: str = "gelu"  # gelu | gelu_tanh | swiglu | geglu | relu2
    bias: bool = True  # biases in the linear layers
    qk_norm: bool = False
    sliding_window: int | None = None  # a token attends to itself and at most this many previous tokens
    attn_softcap: float | None = None
    logit_softcap: float | None = None
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    zero_init_proj: bool = False  # attention/MLP output projections start at 0: blocks start as identity
    value_residual: bool = False  # layers after the first mix the first layer's attention values into their own
    # Mixture of Experts (models/moe.py): moe_experts > 0 replaces feed-forward layers by routed experts.
    moe_experts: int = 0  # routed experts per MoE layer; 0 = dense model
    moe_top_k: int = 2  # experts each token is sent to
    moe_d_ff: int | None = None  # hidden size of one expert; None = d_ff
    moe_every: int = 1  # layer i is MoE when (i + 1) % moe_every == 0: 1 = every layer, 2 = every second layer
    moe_capacity_factor: float | None = (
        None  # training only: an expert takes <= ceil(factor * tokens * k / experts); None = no limit
    )
    moe_shared_expert: bool = False  # also one always-on expert (of size moe_d_ff) for every token
    moe_renormalize: bool = (
        True  # gate weights renormalised to sum to 1 over the chosen experts (Mixtral); False = raw softmax
    )
    moe_aux_loss_coef: float = 0.01  # weight of the Switch load-balancing loss (1.0 when perfectly balanced)
    moe_z_loss_coef: float = 0.001  # weight of the router z-loss, mean logsumexp(router logits)^2
    moe_jitter: float = 0.0  # training only: router input multiplied by uniform noise in [1 - jitter, 1 + jitter]

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def ff_dim(self) -> int:
        return 4 * self.d_model if self.d_ff is None else self.d_ff

    @property
    def expert_dim(self) -> int:
        return self.ff_dim if self.moe_d_ff is None else self.moe_d_ff

    def is_moe_layer(self, i: int) -> bool:
        return self.moe_experts > 0 and (i + 1) % self.moe_every == 0

    def validate(self) -> None:
        def need(cond, msg):
            if not cond:
                raise LmforgeError(f"invalid model config: {msg}")

        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model", "ff_dim", "kv_heads"):
            need(getattr(self, name) > 0, f"{name} must be positive")
        need(self.d_model % self.n_head == 0, f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        need(
            self.n_head % self.kv_heads == 0, f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.kv_heads})"
        )
        need(self.norm in ("layernorm", "rmsnorm"), f"unknown norm {self.norm!r} (layernorm, rmsnorm)")
        need(
            self.pos in ("learned", "sinusoidal", "rope", "none"),
            f"unknown pos {self.pos!r} (learned, sinusoidal, rope, none)",
        )
        need(
            self.mlp in ("gelu", "gelu_tanh", "swiglu", "geglu", "relu2"),
            f"unknown mlp {self.mlp!r} (gelu, gelu_tanh, swiglu, geglu, relu2)",
        )
        need(self.pos != "rope" or self.head_dim % 2 == 0, "rope needs an even head_dim")
        need(self.sliding_window is None or self.sliding_window > 0, "sliding_window must be positive")
        need(0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)")
        need(
            not self.value_residual or self.n_layer >= 2,
            "value_residual needs n_layer >= 2 (it mixes the first layer's values into the later layers')",
        )
        need(self.block_size <= MAX_POSITIONS, f"block_size {self.block_size:,} is beyond {MAX_POSITIONS:,} positions")
        self._validate_moe(need)
        _check_footprint(need, self.param_estimate())

    def param_estimate(self) -> int:
        """Parameters of the model this config describes, in closed form (norms, biases and value-residual scalars
        left out), without building anything: embeddings (+ an untied head, + learned positions) and n_layer blocks
        of attention and feed-forward (or routed experts with their router)."""
        d, L = self.d_model, self.n_layer
        attn = d * (self.n_head + 2 * self.kv_heads) * self.head_dim + self.n_head * self.head_dim * d
        mats = 3 if self.mlp in ("swiglu", "geglu") else 2  # gated MLPs have a third matrix
        dense = mats * d * self.ff_dim
        moe_layers = L // self.moe_every if self.moe_experts > 0 else 0
        expert = mats * d * self.expert_dim
        moe = self.moe_experts * (expert + d) + (expert if self.moe_shared_expert else 0)
        blocks = L * attn + (L - moe_layers) * dense + moe_layers * moe
        embeddings = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        positions = self.block_size * d if self.pos in ("learned", "sinusoidal") else 0  # sinusoidal: a buffer
        return blocks + embeddings + positions

    def _validate_moe(self, need) -> None:
        need(self.moe_experts >= 0, "moe_experts must be >= 0 (0 = dense)")
        if self.moe_experts == 0:
            defaults = ModelConfig()
            changed = [
                f.name
                for f in fields(self)
                if f.name.startswith("moe_") and getattr(self, f.name) != getattr(defaults, f.name)
            ]
            need(
                not changed,
                f"{', '.join(changed)} set but moe_experts is 0 (a dense model); set moe_experts to use experts",
            )
            return
        need(
            1 <= self.moe_top_k <= self.moe_experts,
            f"moe_top_k ({self.moe_top_k}) must be between 1 and moe_experts ({self.moe_experts})",
        )
        need(self.expert_dim > 0, "moe_d_ff must be positive")
        need(
            1 <= self.moe_every <= self.n_layer,
            f"moe_every ({self.moe_every}) must be between 1 and n_layer ({self.n_layer})",
        )
        need(
            self.moe_capacity_factor is None or self.moe_capacity_factor > 0,
            "moe_capacity_factor must be positive (or none for no limit)",
        )
        need(
            self.moe_aux_loss_coef >= 0 and self.moe_z_loss_coef >= 0,
            "moe_aux_loss_coef and moe_z_loss_coef must be >= 0",
        )
        need(0.0 <= self.moe_jitter < 1.0, "moe_jitter must be in [0, 1)")


@dataclass
class Seq2SeqConfig:
    """Architecture of an encoder–decoder transformer. Defaults give the base model of "Attention Is All You Need"."""

    src_vocab_size: int = 37000
    tgt_vocab_size: int = 37000
    shared_vocab: bool = True  # one tokenizer and one embedding table for source and target
    tie_embeddings: bool = True  # the output projection is the target embedding matrix
    max_len: int = 256  # longest source, and longest target including its begin/end tokens
    n_encoder_layer: int = 6
    n_decoder_layer: int = 6
    n_head: int = 8
    d_model: int = 512
    d_ff: int | None = None  # feed-forward hidden size; None = 4 * d_model (2048 in the paper)
    mlp: str = "relu"  # relu | gelu | gelu_tanh | swiglu | geglu | relu2
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    norm_bias: bool = True
    norm_position: str = "post"  # post: x = Norm(x + Sublayer(x)) as in the paper; pre: x = x + Sublayer(Norm(x))
    pos: str = "sinusoidal"  # sinusoidal | learned
    bias: bool = True
    dropout: float = 0.1  # on the embeddings and on every sub-layer output

    head_dim = ModelConfig.head_dim  # d_model // n_head
    ff_dim = ModelConfig.ff_dim  # d_ff, or 4 * d_model

    def validate(self) -> None:
        def need(cond, msg):
            if not cond:
                raise LmforgeError(f"invalid model config: {msg}")

        for name in (
            "src_vocab_size",
            "tgt_vocab_size",
            "max_len",
            "n_encoder_layer",
            "n_decoder_layer",
            "n_head",
            "d_model",
            "ff_dim",
        ):
            need(getattr(self, name) > 0, f"{name} must be positive")
        need(self.max_len >= 2, "max_len must be at least 2 (a target needs its begin and end tokens)")
        need(self.d_model % self.n_head == 0, f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        need(
            not self.shared_vocab or self.src_vocab_size == self.tgt_vocab_size,
            "a shared vocabulary needs src_vocab_size == tgt_vocab_size "
            f"(got {self.src_vocab_size} and {self.tgt_vocab_size})",
        )
        need(self.norm in ("layernorm", "rmsnorm"), f"unknown norm {self.norm!r} (layernorm, rmsnorm)")
        need(self.norm_position in ("post", "pre"), f"unknown norm_position {self.norm_position!r} (post, pre)")
        need(self.pos in ("sinusoidal", "learned"), f"unknown pos {self.pos!r} (sinusoidal, learned)")
        need(
            self.mlp in ("relu", "gelu", "gelu_tanh", "swiglu", "geglu", "relu2"),
            f"unknown mlp {self.mlp!r} (relu, gelu, gelu_tanh, swiglu, geglu, relu2)",
        )
        need(0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)")
        need(self.max_len <= MAX_POSITIONS, f"max_len {self.max_len:,} is beyond {MAX_POSITIONS:,} positions")
        _check_footprint(need, self.param_estimate())

    def param_estimate(self) -> int:
        """Parameters in closed form (norms and biases left out): embeddings (source, target unless shared, output
        head unless tied, positions), encoder layers (self-attention, feed-forward) and decoder layers (self- and
        cross-attention, feed-forward)."""
        d = self.d_model
        attn = 4 * d * d
        ffn = (3 if self.mlp in ("swiglu", "geglu") else 2) * d * self.ff_dim
        layers = self.n_encoder_layer * (attn + ffn) + self.n_decoder_layer * (2 * attn + ffn)
        embeddings = self.src_vocab_size * d
        embeddings += 0 if self.shared_vocab else self.tgt_vocab_size * d
        embeddings += 0 if self.tie_embeddings else self.tgt_vocab_size * d
        return layers + embeddings + self.max_len * d


MAX_POSITIONS = 1 << 24  # longest context a config may ask for (16M tokens, past any published model's)
WEIGHT_BYTES = 4  # models are built in fp32


def machine_memory() -> int | None:
    """Physical memory of this machine in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _check_footprint(need, params: int) -> None:
    """The weights alone must fit in this machine's memory: a model is built in fp32 on the host first."""
    memory = machine_memory()
    size = params * WEIGHT_BYTES
    need(
        memory is None or size <= memory,
        f"about {params:.3g} parameters need {size / 1e9:,.1f} GB for their fp32 weights alone, "
        f"more than this machine's {(memory or 0) / 1e9:,.1f} GB of memory",
    )


FAMILIES = {"decoder": ModelConfig, "seq2seq": Seq2SeqConfig}


@dataclass
class TrainConfig:
    """How to train. A run's length is set by max_steps, max_tokens or max_time (first reached ends it)."""

    batch_size: int = 16  # sequences per micro-batch
    seq_len: int | None = None  # None = model block_size
    tokens_per_step: int | None = None  # gradient accumulation up to this many tokens; None = one micro-batch
    max_steps: int | None = None
    max_tokens: int | None = None
    max_time: float | None = None  # seconds
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # the schedule decays to lr * min_lr_ratio
    schedule: str = "cosine"  # cosine: warmup then cosine decay | wsd: warmup, constant, then linear decay at the end
    decay_fraction: float = 0.3  # wsd: the last fraction of the run that decays linearly to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    label_smoothing: float = 0.0  # spread this much of each target's probability over the whole vocabulary
    eval_interval: int = 100  # steps between validations (also at the end)
    eval_batches: int = 8
    log_interval: int = 10
    sample_tokens: int = 120  # length of the sample printed at each evaluation (0 = none)
    sample_prompt: str = ""
    tokenizer_vocab_size: int = (
        4096  # tokenizer size when lmforge trains one for the run (the model vocabulary follows it)
    )
    split_digits: bool = False  # when lmforge trains the tokenizer: every digit a token of its own
    text_field: str = "text"  # the .jsonl field, .parquet column or Hugging Face dataset column holding the text
    val_fraction: float = 0.01
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | mps
    checkpoint_interval: int = 0  # steps between checkpoints; 0 = at each evaluation
    keep_checkpoints: int = 3  # most recent checkpoints kept (plus the best by validation loss)
    async_checkpoint: bool = False  # FSDP: write sharded checkpoints in the background while training goes on
    optimizer: str = "adamw"  # adamw | muon (Muon for hidden matrices, AdamW for the rest)
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    precision: str = (
        "auto"  # auto | fp32 | bf16 | fp16 (auto: bf16/fp16 on CUDA, bf16 on CPUs with native bf16, else fp32)
    )
    compile: bool = False  # torch.compile the model for training and evaluation
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass
    parallel: str = "ddp"  # ddp | fsdp, used under torchrun with more than one process
    tensorboard: bool = False  # also write TensorBoard event files (needs the tensorboard package)
    wandb: str | None = None  # a Weights & Biases project to log to as well (needs the wandb package)
    # chat fine-tuning (lmforge finetune)
    train_on: str = "assistant"  # assistant: loss on the assistant's replies only | all: on every token
    pack: bool = True  # several conversations per row (attention and positions reset at each); False: one, padded

    def validate(self) -> None:
        def need(cond, msg):
            if not cond:
                raise LmforgeError(f"invalid train config: {msg}")

        need(self.batch_size > 0, "batch_size must be positive")
        need(self.seq_len is None or 0 < self.seq_len <= MAX_POSITIONS, f"seq_len must be in 1..{MAX_POSITIONS:,}")
        for name in ("max_steps", "max_tokens", "max_time", "tokens_per_step"):
            v = getattr(self, name)
            need(v is None or v > 0, f"{name} must be positive")
        need(self.lr > 0, "lr must be positive")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]")
        need(self.warmup_steps >= 0, "warmup_steps must be >= 0")
        need(self.schedule in ("cosine", "wsd"), f"unknown schedule {self.schedule!r} (cosine, wsd)")
        need(0 < self.decay_fraction <= 1, "decay_fraction must be in (0, 1]")
        need(self.eval_interval > 0 and self.log_interval > 0, "eval_interval and log_interval must be positive")
        need(self.eval_batches > 0, "eval_batches must be positive")
        need(0 < self.val_fraction < 0.5, "val_fraction must be in (0, 0.5)")
        need(0.0 <= self.label_smoothing < 1.0, "label_smoothing must be in [0, 1)")
        need(
            self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:"),
            f"unknown device {self.device!r}",
        )
        need(self.optimizer in ("adamw", "muon"), f"unknown optimizer {self.optimizer!r} (adamw, muon)")
        need(
            self.precision in ("auto", "fp32", "bf16", "fp16"),
            f"unknown precision {self.precision!r} (auto, fp32, bf16, fp16)",
        )
        need(self.parallel in ("ddp", "fsdp"), f"unknown parallel {self.parallel!r} (ddp, fsdp)")
        need(
            not (self.parallel == "fsdp" and self.optimizer == "muon"),
            "--optimizer muon does not work with --parallel fsdp yet (it orthogonalises whole matrices, FSDP "
            "shards them): add --optimizer adamw, or use --parallel ddp",
        )
        need(self.keep_checkpoints >= 1, "keep_checkpoints must be at least 1")
        need(self.checkpoint_interval >= 0, "checkpoint_interval must be >= 0")
        need(self.train_on in ("assistant", "all"), f"unknown train_on {self.train_on!r} (assistant, all)")
        need(bool(self.text_field), "text_field must not be empty")
        need(self.wandb is None or bool(self.wandb.strip()), "wandb must name a project")


@dataclass
class Config:
    model: ModelConfig | Seq2SeqConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def family(self) -> str:
        return "seq2seq" if isinstance(self.model, Seq2SeqConfig) else "decoder"

    def validate(self) -> None:
        self.model.validate()
        self.train.validate()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, family: str = "decoder") -> Config:
        unknown = set(d) - {"model", "train"}
        if unknown:
            raise LmforgeError(f"unknown config section(s): {', '.join(sorted(unknown))} (expected model, train)")
        return cls(
            model=_build(FAMILIES[family], d.get("model", {}), "model"),
            train=_build(TrainConfig, d.get("train", {}), "train"),
        )


# --- presets --------------------------------------------------------------------------------------

_GPT2 = dict(norm="layernorm", pos="learned", mlp="gelu_tanh", bias=True, tie_embeddings=True)
_LLAMA = dict(
    norm="rmsnorm", norm_eps=1e-5, pos="rope", rope_theta=10000.0, mlp="swiglu", bias=False, tie_embeddings=False
)

# name -> (description, model fields, train fields)
PRESETS: dict[str, tuple[str, dict, dict]] = {
    "tiny": (
        "the default, a few minutes on 2 cores: Llama block (RoPE, RMSNorm, SwiGLU, no biases, untied head, "
        "zero-initialised output projections), Muon + AdamW (lr 6e-3), warmup-stable-decay: the recipe ablation's "
        "best exportable recipe",
        dict(_LLAMA, n_layer=4, n_head=4, d_model=192, d_ff=512, block_size=256, vocab_size=4096, zero_init_proj=True),
        dict(
            batch_size=16, lr=6e-3, warmup_steps=30, eval_interval=100, max_time=240, optimizer="muon", schedule="wsd"
        ),
    ),
    "gpt2-tiny": (
        "GPT-2 at tiny size: the classic recipe (learned positions, LayerNorm, GELU, tied head, AdamW, cosine)",
        dict(_GPT2, n_layer=4, n_head=4, d_model=192, block_size=256, vocab_size=4096),
        dict(batch_size=16, lr=3e-3, warmup_steps=30, eval_interval=100, max_time=240),
    ),
    "gpt2": (
        "GPT-2 small (124M)",
        dict(_GPT2, n_layer=12, n_head=12, d_model=768, block_size=1024, vocab_size=50304),
        dict(
            lr=6e-4, batch_size=8, tokens_per_step=524288, warmup_steps=700, max_steps=19073, tokenizer_vocab_size=50257
        ),
    ),
    "gpt2-medium": (
        "GPT-2 medium (350M)",
        dict(_GPT2, n_layer=24, n_head=16, d_model=1024, block_size=1024, vocab_size=50304),
        dict(
            lr=3e-4, batch_size=4, tokens_per_step=524288, warmup_steps=700, max_steps=19073, tokenizer_vocab_size=50257
        ),
    ),
    "llama-tiny": (
        "Llama style (RoPE, RMSNorm, SwiGLU, GQA), CPU-sized",
        dict(_LLAMA, n_layer=4, n_head=4, n_kv_head=2, d_model=192, d_ff=512, block_size=256, vocab_size=4096),
        dict(batch_size=16, lr=3e-3, warmup_steps=30, eval_interval=100, max_time=240),
    ),
    "moe-tiny": (
        "llama-tiny with 8 experts (top-2) in every layer: same active compute as llama-tiny, ~2x its parameters",
        dict(
            _LLAMA,
            n_layer=4,
            n_head=4,
            n_kv_head=2,
            d_model=192,
            d_ff=512,
            moe_experts=8,
            moe_top_k=2,
            moe_d_ff=256,
            moe_capacity_factor=1.25,
            block_size=256,
            vocab_size=4096,
        ),
        dict(batch_size=16, lr=3e-3, warmup_steps=30, eval_interval=100, max_time=240),
    ),
    "llama-small": (
        "Llama style (RoPE, RMSNorm, SwiGLU, GQA), GPT-2 small sized",
        dict(_LLAMA, n_layer=12, n_head=12, n_kv_head=4, d_model=768, d_ff=2048, block_size=1024, vocab_size=32768),
        dict(
            lr=6e-4, batch_size=8, tokens_per_step=524288, warmup_steps=700, max_steps=19073, tokenizer_vocab_size=32768
        ),
    ),
}


# Encoder–decoder presets (lmforge train --task seq2seq), same layout as PRESETS.
SEQ2SEQ_PRESETS: dict[str, tuple[str, dict, dict]] = {
    "seq2seq-tiny": (
        "encoder–decoder, CPU-sized: the seq2seq default, learns a demo task in a few minutes on 2 cores",
        dict(
            n_encoder_layer=3,
            n_decoder_layer=3,
            n_head=4,
            d_model=128,
            d_ff=512,
            max_len=64,
            dropout=0.0,
            src_vocab_size=1024,
            tgt_vocab_size=1024,
        ),
        dict(
            batch_size=64,
            lr=2e-3,
            warmup_steps=100,
            beta2=0.98,
            weight_decay=0.01,
            eval_interval=200,
            eval_batches=8,
            log_interval=20,
            tokenizer_vocab_size=1024,
            split_digits=True,
            val_fraction=0.02,
            max_time=240,
        ),
    ),
    "transformer-base": (
        "the base model of Attention Is All You Need (6+6 layers, d_model 512, shared 37k vocabulary)",
        dict(n_encoder_layer=6, n_decoder_layer=6, n_head=8, d_model=512, d_ff=2048, max_len=256, dropout=0.1),
        dict(
            batch_size=64,
            tokens_per_step=25000,
            lr=7e-4,
            warmup_steps=4000,
            beta1=0.9,
            beta2=0.98,
            weight_decay=0.0,
            label_smoothing=0.1,
            max_steps=100000,
            tokenizer_vocab_size=37000,
        ),
    ),
}

_PRESET_TABLES = {"decoder": PRESETS, "seq2seq": SEQ2SEQ_PRESETS}

# Training settings of `lmforge finetune` (the model is the base run's): a lower learning rate than
# pretraining, short warmup, frequent evaluation; the budget is replaced by any the user gives.
FINETUNE_TRAIN = dict(
    batch_size=16, lr=1e-3, warmup_steps=20, weight_decay=0.0, eval_interval=50, eval_batches=8, max_time=120
)


FINETUNE_MODEL_KEYS = ("dropout",)  # the model is the base run's; only these of its fields may change


def finetune_config(base: Config) -> Config:
    """The config `lmforge finetune` starts from: the base run's model, FINETUNE_TRAIN for training.

    Raises LmforgeError for a base run that is not a decoder."""
    if base.family != "decoder":
        raise LmforgeError("chat fine-tuning needs a decoder (language model) run, not a seq2seq one")
    return Config(model=base.model, train=_build(TrainConfig, FINETUNE_TRAIN, "train"))


def check_finetune_overrides(d: dict) -> None:
    """Fine-tuning keeps the base run's architecture: model keys other than FINETUNE_MODEL_KEYS are an error."""
    fixed = sorted(set(d.get("model", {})) - set(FINETUNE_MODEL_KEYS))
    if fixed:
        raise LmforgeError(f"fine-tuning keeps the base run's model: --{fixed[0]} cannot be changed")


def preset(name: str, family: str = "decoder") -> Config:
    table = _PRESET_TABLES[family]
    if name not in table:
        if name in SEQ2SEQ_PRESETS:
            raise LmforgeError(f"preset {name!r} is an encoder–decoder preset: use it with --task seq2seq")
        if name in PRESETS:
            raise LmforgeError(f"preset {name!r} is a language-model preset: leave out --task seq2seq and --demo")
        close = difflib.get_close_matches(name, [*PRESETS, *SEQ2SEQ_PRESETS], n=1)
        raise LmforgeError(
            f"unknown preset {name!r}{_did_you_mean(close, '')}; language models: {', '.join(PRESETS)}; "
            f"seq2seq (--task seq2seq): {', '.join(SEQ2SEQ_PRESETS)}"
        )
    _, m, t = table[name]
    return Config(model=_build(FAMILIES[family], m, "model"), train=_build(TrainConfig, t, "train"))


# --- loading and overrides ------------------------------------------------------------------------


def load_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"config file not found: {path}")
    try:
        if path.suffix == ".json":
            d = json.loads(path.read_text(encoding="utf-8"))
        else:
            d = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LmforgeError(f"cannot parse config file {path}: {e}") from None
    if not isinstance(d, dict):
        raise LmforgeError(f"cannot parse config file {path}: not a table of settings")
    return d


def merge(cfg: Config, d: dict) -> Config:
    """Return a copy of `cfg` with the sections/fields in `d` replaced (unknown keys are errors)."""
    out = cfg.to_dict()
    for section, values in d.items():
        if section not in out:
            raise LmforgeError(f"unknown config section {section!r} (expected model, train)")
        if not isinstance(values, dict):
            raise LmforgeError(f"config section {section!r} must be a table")
        out[section].update(values)
    return Config.from_dict(out, cfg.family)


def parse_overrides(args: list[str], family: str = "decoder", cli_options: tuple[str, ...] = ()) -> dict:
    """Turn ['--n_layer', '4', '--train.lr=1e-3', '--max-steps', '10'] into {'model': {...}, 'train': {...}}.

    Values are strings here; they are converted to the field's type by `_build`.
    A bare key is looked up in both sections (the model section of `family`) and must name exactly one field;
    an unknown one gets "did you mean" among the fields, the names other tools give them (--learning-rate),
    and cli_options (the command's own options, e.g. --resume).
    """
    out: dict[str, dict] = {"model": {}, "train": {}}
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--") or len(a) <= 2:
            raise LmforgeError(f"unexpected argument {a!r} (options look like --key value)")
        key = a[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise LmforgeError(f"option --{key} needs a value")
            value = args[i + 1]
            i += 2
        key = key.replace("-", "_")
        if "." in key:
            section, name = key.split(".", 1)
            if section not in out:
                raise LmforgeError(f"unknown config section {section!r} in --{key}")
        else:
            name = key
            owners = [s for s, c in (("model", FAMILIES[family]), ("train", TrainConfig)) if name in _field_names(c)]
            if not owners:
                known = _field_names(FAMILIES[family]) | _field_names(TrainConfig)
                hint = _did_you_mean(_suggest(name, known, cli_options), "--")
                raise LmforgeError(f"unknown option --{key.replace('_', '-')}{hint}")
            if len(owners) > 1:
                raise LmforgeError(f"option --{key} is ambiguous; write --model.{key} or --train.{key}")
            section = owners[0]
        out[section][name] = value
    return {k: v for k, v in out.items() if v}


def _field_names(cls) -> set[str]:
    return {f.name for f in fields(cls)}


# Names other tools (nanoGPT, transformers, litgpt, torchtitan) give our fields, for "did you mean".
ALIASES = {
    "learning_rate": "lr",
    "max_lr": "lr",
    "n_embd": "d_model",
    "hidden_size": "d_model",
    "dim": "d_model",
    "n_layers": "n_layer",
    "num_layers": "n_layer",
    "num_hidden_layers": "n_layer",
    "n_heads": "n_head",
    "num_heads": "n_head",
    "num_attention_heads": "n_head",
    "n_kv_heads": "n_kv_head",
    "num_key_value_heads": "n_kv_head",
    "intermediate_size": "d_ff",
    "ffn_dim": "d_ff",
    "n_positions": "block_size",
    "context_length": "block_size",
    "max_position_embeddings": "block_size",
    "max_seq_len": "block_size",
    "seq_length": "seq_len",
    "max_iters": "max_steps",
    "steps": "max_steps",
    "warmup_iters": "warmup_steps",
    "micro_batch_size": "batch_size",
    "max_grad_norm": "grad_clip",
    "clip_grad": "grad_clip",
    "dtype": "precision",
    "eval_iters": "eval_batches",
    "eval_every": "eval_interval",
    "log_every": "log_interval",
    "save_every": "checkpoint_interval",
    "rms_norm_eps": "norm_eps",
    "layer_norm_epsilon": "norm_eps",
    "tie_word_embeddings": "tie_embeddings",
    "num_experts": "moe_experts",
    "num_local_experts": "moe_experts",
    "num_experts_per_tok": "moe_top_k",
}


def _suggest(name: str, known: set[str], extra: tuple[str, ...] = ()) -> list[str]:
    """Up to three known names close to `name` (difflib), through ALIASES; extra: further names, as written."""
    name = name.replace("-", "_")
    candidates = {k: k for k in known}
    candidates.update({a: f for a, f in ALIASES.items() if f in known})
    candidates.update({e.lstrip("-").replace("-", "_"): e for e in extra})
    close = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.6)
    return list(dict.fromkeys(candidates[c] for c in close))


def _did_you_mean(names: list[str], prefix: str) -> str:
    if not names:
        return ""
    shown = [n if n.startswith("-") else prefix + n for n in names]
    return f" (did you mean {' or '.join(shown)}?)"


def _build(cls, values: dict, section: str):
    if not isinstance(values, dict):
        raise LmforgeError(f"config section {section!r} must be a table")
    known = _field_names(cls)
    unknown = set(values) - known
    if unknown:
        hint = _did_you_mean(_suggest(min(unknown), known), "") if len(unknown) == 1 else ""
        raise LmforgeError(f"unknown {section} config key(s): {', '.join(sorted(unknown))}{hint}")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _convert(v, hints[k], f"{section}.{k}") for k, v in values.items()}
    return cls(**kwargs)


def _convert(value, hint, name):
    """Convert `value` (from TOML, JSON or a CLI string) to the type `hint`, or raise a clear error."""
    args = typing.get_args(hint)
    optional = type(None) in args
    base = (
        next((a for a in args if a is not type(None)), hint)
        if args and (typing.get_origin(hint) in (typing.Union, types.UnionType))
        else hint
    )
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise LmforgeError(f"config value {name} cannot be empty")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if base is int:  # an integer, also written 1e6 or 4096.0; never inf, nan or 1e400 (which is inf)
            if isinstance(value, bool):
                raise ValueError
            number = value
            if isinstance(number, str):
                try:
                    return int(number)
                except ValueError:
                    number = float(number)
            if isinstance(number, float):
                if not math.isfinite(number) or number != int(number):
                    raise ValueError
                return int(number)
            return int(number)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if not math.isfinite(number):
                raise ValueError
            return number
        if base is str:
            if not isinstance(value, str):
                raise ValueError
            return value
        if base is dict or typing.get_origin(base) is dict:
            if isinstance(value, str):
                value = json.loads(value)
            if not isinstance(value, dict):
                raise ValueError
            return value
    except (ValueError, TypeError, OverflowError, json.JSONDecodeError):
        tname = "a finite float" if base is float else getattr(base, "__name__", str(base))
        raise LmforgeError(f"config value {name} must be {tname}, got {value!r}") from None
    return value


def round_up(n: int, multiple: int = 64) -> int:
    return (n + multiple - 1) // multiple * multiple
