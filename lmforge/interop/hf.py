"""Hugging Face interop: convert GPT-2, Llama and Mixtral checkpoints to lmforge run directories and back.

Only tensors are read: safetensors files, or `torch.load(weights_only=True)` for .bin files, so a
checkpoint can never run code. Name mapping per family:

    lmforge                          GPT-2 (GPT2LMHeadModel)            Llama (LlamaForCausalLM)
    tok_emb                          transformer.wte                    model.embed_tokens
    pos_emb                          transformer.wpe                    -
    blocks.i.norm1                   transformer.h.i.ln_1               model.layers.i.input_layernorm
    blocks.i.attn.qkv  [q; k; v]     transformer.h.i.attn.c_attn (T)    model.layers.i.self_attn.{q,k,v}_proj
    blocks.i.attn.proj               transformer.h.i.attn.c_proj (T)    model.layers.i.self_attn.o_proj
    blocks.i.norm2                   transformer.h.i.ln_2               model.layers.i.post_attention_layernorm
    blocks.i.mlp.gate / up / down    - / mlp.c_fc (T) / mlp.c_proj (T)  model.layers.i.mlp.{gate,up,down}_proj
    norm                             transformer.ln_f                   model.norm
    lm_head                          lm_head                            lm_head

(T) = GPT-2's Conv1D stores weights transposed relative to nn.Linear.

Mixtral (MixtralForCausalLM) is Llama attention with a Mixture of Experts in every layer:

    lmforge                          Mixtral (as save_pretrained writes it)
    blocks.i.mlp.router              model.layers.i.block_sparse_moe.gate
    blocks.i.mlp.experts.e.gate      model.layers.i.block_sparse_moe.experts.e.w1
    blocks.i.mlp.experts.e.down      model.layers.i.block_sparse_moe.experts.e.w2
    blocks.i.mlp.experts.e.up        model.layers.i.block_sparse_moe.experts.e.w3

transformers 5 holds the experts fused in memory (model.layers.i.mlp.gate, mlp.experts.gate_up_proj
(E, 2*I, D) = [w1; w3] per expert, mlp.experts.down_proj (E, D, I)); checkpoints in that layout are
read too. Exports use the per-expert layout, which every transformers version loads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import Config, ModelConfig, TrainConfig
from ..data.chat import load_chat_template
from ..data.tokenizer import Tokenizer
from ..errors import LmforgeError
from ..io import atomic_path, write_json_atomic, write_text_atomic
from ..models import build_model
from ..runs import (
    CHAT_TEMPLATE,
    TOKENIZER,
    WEIGHTS,
    load_config,
    load_tokenizer,
    load_weights,
    save_config,
    save_weights,
)

# --- reading a Hugging Face folder ----------------------------------------------------------------


def read_hf_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise LmforgeError(f"{hf_dir} is not a Hugging Face model folder (no config.json)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LmforgeError(f"corrupt {path}: {e}") from None
    if not isinstance(cfg, dict):
        raise LmforgeError(f"corrupt {path}: not a JSON object")
    return cfg


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder: model.safetensors, sharded safetensors, or pytorch_model*.bin (never unpickled)."""
    files = sorted(hf_dir.glob("*.safetensors"))
    loader = _load_safetensors
    if not files:
        files = sorted(hf_dir.glob("pytorch_model*.bin"))
        loader = _load_bin
    if not files:
        raise LmforgeError(f"no weights in {hf_dir} (expected *.safetensors or pytorch_model*.bin)")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(loader(f))
    return out


def _load_safetensors(path: Path) -> dict:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise LmforgeError(f"corrupt weights file {path}: {e}") from None


def _load_bin(path: Path) -> dict:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise LmforgeError(f"cannot read {path} as plain tensors: {str(e).splitlines()[0]}") from None
    if not isinstance(sd, dict):
        raise LmforgeError(f"{path} does not hold a state dict")
    return sd


def read_hf_tokenizer(hf_dir: Path) -> Tokenizer:
    if (hf_dir / "tokenizer.json").is_file():
        return Tokenizer.from_file(hf_dir / "tokenizer.json")
    if (hf_dir / "vocab.json").is_file() and (hf_dir / "merges.txt").is_file():  # GPT-2 style files
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        tok = HFTokenizer(models.BPE.from_file(str(hf_dir / "vocab.json"), str(hf_dir / "merges.txt")))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        return Tokenizer(tok)
    raise LmforgeError(f"no tokenizer in {hf_dir} (expected tokenizer.json, or vocab.json + merges.txt)")


# --- config mapping -------------------------------------------------------------------------------


def _unsupported(what: str):
    raise LmforgeError(f"unsupported Hugging Face model: {what}")


def _family(hf: dict) -> str:
    archs = hf.get("architectures") or []
    kind = hf.get("model_type", "")
    if kind == "gpt2" or "GPT2LMHeadModel" in archs:
        return "gpt2"
    if kind == "llama" or "LlamaForCausalLM" in archs:
        return "llama"
    if kind == "mixtral" or "MixtralForCausalLM" in archs:
        return "mixtral"
    _unsupported(
        f"architecture {', '.join(archs) or kind or 'unknown'} "
        "(supported: GPT2LMHeadModel, LlamaForCausalLM, MixtralForCausalLM)"
    )


def _rope_from_hf(hf: dict, default_theta: float = 10000.0) -> tuple[float, dict | None]:
    """(theta, scaling) from either transformers 4 (rope_theta + rope_scaling) or 5 (rope_parameters) configs."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", default_theta)))
    merged = {**scaling, **params}
    kind = merged.get("rope_type", merged.get("type", "default"))
    if kind in (None, "default"):
        return theta, None
    if kind == "linear":
        return theta, {"type": "linear", "factor": float(merged["factor"])}
    if kind == "llama3":
        return theta, {
            "type": "llama3",
            "factor": float(merged["factor"]),
            "low_freq_factor": float(merged["low_freq_factor"]),
            "high_freq_factor": float(merged["high_freq_factor"]),
            "original_max_position_embeddings": int(merged["original_max_position_embeddings"]),
        }
    _unsupported(f"rope scaling type {kind!r} (supported: linear, llama3)")


def model_config_from_hf(hf: dict) -> ModelConfig:
    family = _family(hf)
    if family == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        mlp = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}.get(act)
        if mlp is None:
            _unsupported(f"GPT-2 activation_function {act!r}")
        if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
            _unsupported(
                "GPT-2 attention scaling options (scale_attn_weights=False or scale_attn_by_inverse_layer_idx)"
            )
        if hf.get("add_cross_attention"):
            _unsupported("GPT-2 with cross-attention")
        return ModelConfig(
            vocab_size=hf["vocab_size"],
            block_size=hf.get("n_positions", 1024),
            n_layer=hf["n_layer"],
            n_head=hf["n_head"],
            d_model=hf["n_embd"],
            d_ff=hf.get("n_inner"),
            norm="layernorm",
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            pos="learned",
            mlp=mlp,
            bias=True,
            tie_embeddings=hf.get("tie_word_embeddings", True),
            dropout=0.0,
        )
    # llama and mixtral (Llama attention + experts)
    name = family.capitalize()
    if hf.get("hidden_act", "silu") != "silu":
        _unsupported(f"{name} hidden_act {hf.get('hidden_act')!r} (only silu)")
    n_head, d = hf["num_attention_heads"], hf["hidden_size"]
    if hf.get("head_dim") not in (None, d // n_head):
        _unsupported(
            f"{name} head_dim {hf['head_dim']} different from hidden_size / num_attention_heads ({d // n_head})"
        )
    if bool(hf.get("attention_bias", False)) != bool(hf.get("mlp_bias", False)):
        _unsupported("Llama with attention_bias different from mlp_bias")
    theta, scaling = _rope_from_hf(hf, 1e6 if family == "mixtral" else 10000.0)
    common = dict(
        vocab_size=hf["vocab_size"],
        n_layer=hf["num_hidden_layers"],
        n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads") or n_head,
        d_model=d,
        d_ff=hf["intermediate_size"],
        norm="rmsnorm",
        pos="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        mlp="swiglu",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        dropout=0.0,
    )
    if family == "llama":
        return ModelConfig(
            **common,
            block_size=hf.get("max_position_embeddings", 2048),
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            bias=bool(hf.get("attention_bias", False)),
        )
    k = hf.get("num_experts_per_tok", 2)
    # transformers' load-balancing loss sums to top_k when balanced, ours to 1: the same penalty needs coef * top_k.
    return ModelConfig(
        **common,
        block_size=hf.get("max_position_embeddings", 4096 * 32),
        norm_eps=hf.get("rms_norm_eps", 1e-5),
        bias=False,
        sliding_window=hf.get("sliding_window"),
        moe_experts=hf.get("num_local_experts", 8),
        moe_top_k=k,
        moe_d_ff=hf["intermediate_size"],
        moe_renormalize=True,
        moe_capacity_factor=None,
        moe_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)) * k,
        moe_z_loss_coef=0.0,
        moe_jitter=float(hf.get("router_jitter_noise", 0.0)),
    )


def _gpt2_like(cfg: ModelConfig) -> bool:
    return (
        cfg.norm == "layernorm"
        and cfg.pos == "learned"
        and cfg.mlp in ("gelu", "gelu_tanh")
        and cfg.bias
        and cfg.norm_bias
        and cfg.kv_heads == cfg.n_head
    )


def _llama_like(cfg: ModelConfig) -> bool:
    return cfg.norm == "rmsnorm" and cfg.pos == "rope" and cfg.mlp == "swiglu"


def export_problems(cfg: ModelConfig) -> list[str]:
    """What in `cfg` no Hugging Face GPT-2 / Llama / Mixtral config can express (empty: it exports)."""
    problems = []
    moe = cfg.moe_experts > 0
    gpt2_like, llama_like = _gpt2_like(cfg), _llama_like(cfg)
    if cfg.qk_norm:
        problems.append("qk_norm")
    if cfg.sliding_window and not moe:  # Mixtral has a window (same convention: W positions, itself included)
        problems.append("sliding_window")
    if cfg.attn_softcap or cfg.logit_softcap:
        problems.append("softcapping")
    if cfg.value_residual:
        problems.append("value_residual (no Hugging Face architecture mixes the first layer's values into the others)")
    if not (gpt2_like or llama_like):
        problems.append(
            f"norm={cfg.norm}, pos={cfg.pos}, mlp={cfg.mlp}, bias={cfg.bias} (GPT-2 needs layernorm/learned/gelu/bias; "
            f"Llama needs rmsnorm/rope/swiglu)"
        )
    if llama_like and cfg.rope_scaling and cfg.rope_scaling.get("type") not in ("linear", "llama3"):
        problems.append(f"rope scaling {cfg.rope_scaling.get('type')!r}")
    if moe:  # Mixtral: Llama attention without biases, renormalised top-k experts in every layer, no shared expert
        if not llama_like or cfg.bias:
            problems.append(
                "a Mixture of Experts without Llama attention (Mixtral needs rmsnorm/rope/swiglu and bias=false)"
            )
        if cfg.moe_every != 1:
            problems.append(f"moe_every={cfg.moe_every} (Mixtral has experts in every layer)")
        if cfg.moe_shared_expert:
            problems.append("moe_shared_expert")
        if not cfg.moe_renormalize:
            problems.append("moe_renormalize=false")
    return problems


def hf_config_from_model(cfg: ModelConfig, eos_id: int | None) -> dict:
    """The transformers config.json for an lmforge model config, or a clear error naming what does not fit."""
    problems = export_problems(cfg)
    moe = cfg.moe_experts > 0
    gpt2_like = _gpt2_like(cfg)
    if problems:
        raise LmforgeError("cannot export to Hugging Face: unsupported " + "; ".join(problems))
    if gpt2_like:
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": cfg.vocab_size,
            "n_positions": cfg.block_size,
            "n_embd": cfg.d_model,
            "n_layer": cfg.n_layer,
            "n_head": cfg.n_head,
            "n_inner": cfg.ff_dim,
            "activation_function": "gelu_new" if cfg.mlp == "gelu_tanh" else "gelu",
            "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout,
            "attn_pdrop": cfg.dropout,
            "tie_word_embeddings": cfg.tie_embeddings,
            "bos_token_id": eos_id,
            "eos_token_id": eos_id,
            "torch_dtype": "float32",
        }
    out = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ff_dim,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "attention_bias": cfg.bias,
        "mlp_bias": cfg.bias,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
    }
    if moe:
        for key in ("attention_bias", "mlp_bias"):
            del out[key]
        out.update(
            architectures=["MixtralForCausalLM"],
            model_type="mixtral",
            intermediate_size=cfg.expert_dim,
            sliding_window=cfg.sliding_window,
            num_local_experts=cfg.moe_experts,
            num_experts_per_tok=cfg.moe_top_k,
            router_aux_loss_coef=cfg.moe_aux_loss_coef / cfg.moe_top_k,
            router_jitter_noise=cfg.moe_jitter,
        )
    if cfg.rope_scaling:
        sc = dict(cfg.rope_scaling)
        sc["rope_type"] = sc.pop("type")
        out["rope_scaling"] = sc
    return out


# --- weight mapping -------------------------------------------------------------------------------


def _gpt2_names(cfg: ModelConfig) -> list[tuple[str, str, bool]]:
    """(lmforge name, HF name, transposed) for every GPT-2 tensor."""
    names = [("tok_emb.weight", "transformer.wte.weight", False), ("pos_emb.weight", "transformer.wpe.weight", False)]
    for i in range(cfg.n_layer):
        h = f"transformer.h.{i}."
        b = f"blocks.{i}."
        names += [
            (b + "norm1.weight", h + "ln_1.weight", False),
            (b + "norm1.bias", h + "ln_1.bias", False),
            (b + "attn.qkv.weight", h + "attn.c_attn.weight", True),
            (b + "attn.qkv.bias", h + "attn.c_attn.bias", False),
            (b + "attn.proj.weight", h + "attn.c_proj.weight", True),
            (b + "attn.proj.bias", h + "attn.c_proj.bias", False),
            (b + "norm2.weight", h + "ln_2.weight", False),
            (b + "norm2.bias", h + "ln_2.bias", False),
            (b + "mlp.up.weight", h + "mlp.c_fc.weight", True),
            (b + "mlp.up.bias", h + "mlp.c_fc.bias", False),
            (b + "mlp.down.weight", h + "mlp.c_proj.weight", True),
            (b + "mlp.down.bias", h + "mlp.c_proj.bias", False),
        ]
    names += [("norm.weight", "transformer.ln_f.weight", False), ("norm.bias", "transformer.ln_f.bias", False)]
    if not cfg.tie_embeddings:
        names.append(("lm_head.weight", "lm_head.weight", False))
    return names


def _llama_names(cfg: ModelConfig) -> list[tuple[str, str, bool]]:
    """(lmforge name, HF name, transposed) for Llama / Mixtral tensors other than the fused qkv."""
    names = [("tok_emb.weight", "model.embed_tokens.weight", False)]
    for i in range(cfg.n_layer):
        h = f"model.layers.{i}."
        b = f"blocks.{i}."
        names += [
            (b + "norm1.weight", h + "input_layernorm.weight", False),
            (b + "norm2.weight", h + "post_attention_layernorm.weight", False),
            (b + "attn.proj.weight", h + "self_attn.o_proj.weight", False),
        ]
        if cfg.is_moe_layer(i):
            m = h + "block_sparse_moe."
            names.append((b + "mlp.router.weight", m + "gate.weight", False))
            for e in range(cfg.moe_experts):
                names += [
                    (b + f"mlp.experts.{e}.{ours}.weight", m + f"experts.{e}.{theirs}.weight", False)
                    for ours, theirs in (("gate", "w1"), ("down", "w2"), ("up", "w3"))
                ]
            continue
        names += [
            (b + "mlp.gate.weight", h + "mlp.gate_proj.weight", False),
            (b + "mlp.up.weight", h + "mlp.up_proj.weight", False),
            (b + "mlp.down.weight", h + "mlp.down_proj.weight", False),
        ]
        if cfg.bias:
            names += [
                (b + "attn.proj.bias", h + "self_attn.o_proj.bias", False),
                (b + "mlp.gate.bias", h + "mlp.gate_proj.bias", False),
                (b + "mlp.up.bias", h + "mlp.up_proj.bias", False),
                (b + "mlp.down.bias", h + "mlp.down_proj.bias", False),
            ]
    names.append(("norm.weight", "model.norm.weight", False))
    if not cfg.tie_embeddings:
        names.append(("lm_head.weight", "lm_head.weight", False))
    return names


def _take(hf_sd: dict, name: str) -> torch.Tensor:
    if name not in hf_sd:
        raise LmforgeError(f"Hugging Face weights are missing tensor {name}")
    return hf_sd[name]


def _unfuse_experts(cfg: ModelConfig, hf_sd: dict) -> dict:
    """Rename transformers 5's fused Mixtral expert tensors to the per-expert layout (other tensors unchanged)."""
    hf_sd = dict(hf_sd)
    E, I, D = cfg.moe_experts, cfg.expert_dim, cfg.d_model  # noqa: E741 (the paper's names)
    for i in range(cfg.n_layer):
        fused, m = f"model.layers.{i}.mlp.", f"model.layers.{i}.block_sparse_moe."
        if fused + "experts.gate_up_proj" not in hf_sd:
            continue
        gate_up, down, router = (
            _take(hf_sd, fused + n) for n in ("experts.gate_up_proj", "experts.down_proj", "gate.weight")
        )
        for n in ("experts.gate_up_proj", "experts.down_proj", "gate.weight"):
            del hf_sd[fused + n]
        if tuple(gate_up.shape) != (E, 2 * I, D) or tuple(down.shape) != (E, D, I):
            raise LmforgeError(
                f"Hugging Face expert tensors of layer {i} have shapes {tuple(gate_up.shape)} and {tuple(down.shape)}, "
                f"config implies {(E, 2 * I, D)} and {(E, D, I)}"
            )
        hf_sd[m + "gate.weight"] = router
        for e in range(E):
            hf_sd[m + f"experts.{e}.w1.weight"], hf_sd[m + f"experts.{e}.w3.weight"] = gate_up[e].split(I)
            hf_sd[m + f"experts.{e}.w2.weight"] = down[e]
    return hf_sd


def state_dict_from_hf(cfg: ModelConfig, family: str, hf_sd: dict) -> dict[str, torch.Tensor]:
    out = {}
    if family == "mixtral":
        hf_sd = _unfuse_experts(cfg, hf_sd)
    names = _gpt2_names(cfg) if family == "gpt2" else _llama_names(cfg)
    for ours, theirs, transposed in names:
        t = _take(hf_sd, theirs)
        out[ours] = t.t().contiguous() if transposed else t
    if family in ("llama", "mixtral"):
        for i in range(cfg.n_layer):
            a = f"model.layers.{i}.self_attn."
            out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([_take(hf_sd, a + f"{p}_proj.weight") for p in "qkv"])
            if cfg.bias:
                out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([_take(hf_sd, a + f"{p}_proj.bias") for p in "qkv"])
    return out


def state_dict_to_hf(cfg: ModelConfig, family: str, sd: dict) -> dict[str, torch.Tensor]:
    out = {}
    names = _gpt2_names(cfg) if family == "gpt2" else _llama_names(cfg)
    for ours, theirs, transposed in names:
        t = sd[ours]
        out[theirs] = t.t().contiguous() if transposed else t.contiguous()
    if family in ("llama", "mixtral"):
        q, kv = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        for i in range(cfg.n_layer):
            a = f"model.layers.{i}.self_attn."
            for suffix in ("weight", "bias") if cfg.bias else ("weight",):
                parts = sd[f"blocks.{i}.attn.qkv.{suffix}"].split([q, kv, kv])
                for p, t in zip("qkv", parts):
                    out[a + f"{p}_proj.{suffix}"] = t.contiguous()
    return out


# --- the two conversions --------------------------------------------------------------------------


def from_hf(hf_dir: str | Path, run_dir: str | Path) -> Path:
    """Convert a Hugging Face GPT-2 / Llama / Mixtral folder into an lmforge run directory."""
    hf_dir, run_dir = Path(hf_dir), Path(run_dir)
    if not hf_dir.is_dir():
        raise LmforgeError(f"Hugging Face folder not found: {hf_dir}")
    if (run_dir / WEIGHTS).exists():
        raise LmforgeError(f"{run_dir} already holds a model; choose another --out")
    hf = read_hf_config(hf_dir)
    family = _family(hf)
    cfg = model_config_from_hf(hf)
    cfg.validate()
    tokenizer = read_hf_tokenizer(hf_dir)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise LmforgeError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is {cfg.vocab_size}"
        )
    sd = state_dict_from_hf(cfg, family, read_hf_weights(hf_dir))
    model = build_model(cfg)
    expected = model.state_dict()
    for k, v in sd.items():
        if v.shape != expected[k].shape:
            raise LmforgeError(
                f"Hugging Face tensor for {k} has shape {tuple(v.shape)}, config implies {tuple(expected[k].shape)}"
            )
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(run_dir / TOKENIZER)
    if chat_template := load_chat_template(
        hf_dir
    ):  # same conventions as a run: chat_template.jinja or tokenizer_config
        write_text_atomic(run_dir / CHAT_TEMPLATE, chat_template)
    save_config(run_dir, Config(model=cfg, train=TrainConfig()))
    save_weights(run_dir / WEIGHTS, model, {"source": f"huggingface:{family}"})
    return run_dir


def to_hf(run_dir: str | Path, hf_dir: str | Path) -> Path:
    """Write a folder transformers takes with no extra arguments: config.json, model.safetensors, tokenizer.json,
    tokenizer_config.json, generation_config.json (AutoTokenizer, AutoModelForCausalLM, pipeline("text-generation"))."""
    run_dir, hf_dir = Path(run_dir), Path(hf_dir)
    cfg = load_config(run_dir).model
    tokenizer = load_tokenizer(run_dir)
    hf_cfg = hf_config_from_model(cfg, tokenizer.eos_id)
    family = hf_cfg["model_type"]
    model = build_model(cfg)
    load_weights(run_dir / WEIGHTS, model)
    sd = state_dict_to_hf(cfg, family, model.state_dict())
    hf_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(hf_dir / "model.safetensors") as tmp:
        save_file(sd, str(tmp), metadata={"format": "pt"})
    write_json_atomic(hf_dir / "config.json", hf_cfg)
    shutil.copyfile(run_dir / TOKENIZER, hf_dir / "tokenizer.json")
    write_json_atomic(hf_dir / "tokenizer_config.json", tokenizer_config(tokenizer, cfg, load_chat_template(run_dir)))
    write_json_atomic(hf_dir / "generation_config.json", generation_config(tokenizer, cfg))
    return hf_dir


def tokenizer_config(tokenizer: Tokenizer, cfg: ModelConfig, chat_template: str | None) -> dict:
    """tokenizer_config.json for AutoTokenizer: the fast tokenizer of tokenizer.json, end-of-text as EOS, BOS and
    padding (lmforge adds no BOS), special-token look-alikes in text encoded as text (as lmforge does), text
    decoded exactly as encoded, the context length, the chat template if any."""
    out = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": tokenizer.eos_token,
        "bos_token": tokenizer.eos_token,
        "pad_token": tokenizer.eos_token,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": True,  # text is text: "<|endoftext|>" typed in a prompt is characters, as in lmforge
        "model_max_length": cfg.block_size,
    }
    if chat_template:
        out["chat_template"] = chat_template
    return out


def generation_config(tokenizer: Tokenizer, cfg: ModelConfig) -> dict:
    """generation_config.json: stop at end-of-text, pad with it, and generate up to the context length by default."""
    return {
        "bos_token_id": tokenizer.eos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.eos_id,
        "max_length": cfg.block_size,
        "do_sample": False,
    }
