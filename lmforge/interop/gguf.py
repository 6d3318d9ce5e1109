"""GGUF: lmforge runs to single-file models for llama.cpp (and ollama, LM Studio, llama-cpp-python), and back.

A GGUF file is a header of typed key/value metadata (architecture hyperparameters, the tokenizer)
followed by named tensors. We write it with the `gguf` package llama.cpp publishes, under the
names and conventions of llama.cpp's own converter, so llama.cpp runs the file with its stock code:

    lmforge                          gpt2 architecture                llama architecture
    tok_emb                          token_embd                       token_embd
    pos_emb                          position_embd (f32)              -
    blocks.i.norm1                   blk.i.attn_norm                  blk.i.attn_norm
    blocks.i.attn.qkv  [q; k; v]     blk.i.attn_qkv                   blk.i.attn_{q,k,v}  (q, k rows permuted, below)
    blocks.i.attn.proj               blk.i.attn_output                blk.i.attn_output
    blocks.i.norm2                   blk.i.ffn_norm                   blk.i.ffn_norm
    blocks.i.mlp.gate / up / down    - / blk.i.ffn_up / blk.i.ffn_down  blk.i.ffn_{gate,up,down}
    blocks.i.mlp.router              -                                blk.i.ffn_gate_inp (f32)
    blocks.i.mlp.experts.e.gate/...  -                                blk.i.ffn_{gate,up,down}_exps  (E, ., .) stacked
    norm                             output_norm                      output_norm
    lm_head                          output (always written)          output (only when untied)
    rope scaling "llama3"            -                                rope_freqs (f32): per-frequency divisors

Tensors keep PyTorch's (out, in) layout (GGUF lists dimensions innermost first, the writer reverses them).

**Rotary layout.** lmforge (like Hugging Face Llama) rotates the pair (i, i + head_dim/2) of each
head; llama.cpp's `llama` graph rotates adjacent pairs (2i, 2i+1). Their dot products agree if the
rows of W_q and W_k are reordered head by head: row j < head_dim/2 of a head (the first half of
pair j) moves to 2j, row head_dim/2 + j to 2j + 1 — a reshape (heads, 2, head_dim/2, in) ->
(heads, head_dim/2, 2, in). Key heads are permuted with the key head count (grouped-query).

**Precision.** `f32` keeps every tensor; `f16` (default) stores matrices in half precision;
`q8_0` quantises matrices to 8 bits in blocks of 32 with one f16 scale each (the `gguf` package's own
quantiser, the same code llama.cpp's converter runs). Norm weights, biases and other 1-D tensors,
the position table, the MoE router and rope_freqs always stay f32, as llama.cpp's converter keeps
them; a matrix whose rows are not a multiple of 32 long falls back from q8_0 to f16 (as there too).

**Tokenizer.** Byte-level BPE only (what `lmforge tokenizer train` makes): tokenizer.ggml.model
"gpt2", the vocabulary in GPT-2's byte alphabet, the merges, token types (special tokens CONTROL,
other added tokens USER_DEFINED, padding rows UNUSED), end-of-text as EOS and BOS and padding id (lmforge
never prepends BOS: add_bos_token is false), and the pre-tokenizer name llama.cpp uses to split
text before BPE: "gpt-2" (GPT-2's regex), "refact" (digits split one by one, then GPT-2's regex)
or "llama-bpe" (Llama 3's regex). Model vocabularies larger than the tokenizer get "[PADn]" tokens.

Anything llama.cpp's `gpt2` or `llama` graphs cannot compute (softcapping, QK-norm, a sliding
window shorter than the context, exact-erf GELU, a shared expert, ...) is refused with one line
naming it, before anything is written; the file itself is written to a temporary name and renamed.

Import (`from_gguf`) reads `llama` (dense or Mixtral-style experts) and `gpt2` files written by
llama.cpp's tools or by us: weights are dequantised with the `gguf` package, the tokenizer is rebuilt
by transformers' GGUF reader (which also understands SentencePiece vocabularies such as Llama 2's).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from ..config import Config, ModelConfig, TrainConfig
from ..data.chat import load_chat_template
from ..errors import LmforgeError
from ..io import atomic_path, write_text_atomic
from ..models import build_model
from ..models.layers import rope_inv_freq
from ..runs import CHAT_TEMPLATE, TOKENIZER, WEIGHTS, load, save_config, save_weights

DTYPES = ("f32", "f16", "q8_0")
LMFORGE_ROPE_KEY = "lmforge.rope_scaling"  # our own key: the exact scaling rule behind rope_freqs, for import

# Llama 3's pre-tokenizer split pattern as `tokenizers` writes it; llama.cpp calls it "llama-bpe" (llama-vocab.cpp).
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gguf():
    try:
        import gguf
    except ImportError:
        raise LmforgeError("GGUF conversion needs the gguf package: pip install 'lmforge[gguf]'") from None
    return gguf


# --- what a run becomes -----------------------------------------------------------------------------


def gguf_architecture(cfg: ModelConfig) -> str:
    """ "gpt2" or "llama" for a model llama.cpp can run as it is, else LmforgeError naming every obstacle."""
    problems = []
    if cfg.qk_norm:
        problems.append("qk_norm (llama.cpp's gpt2/llama graphs have no QK-norm)")
    if cfg.attn_softcap or cfg.logit_softcap:
        problems.append("softcapping (no field for it in gpt2/llama GGUF files)")
    if cfg.value_residual:
        problems.append("value_residual (llama.cpp's gpt2/llama graphs have no value residual)")
    if cfg.sliding_window is not None and cfg.sliding_window < cfg.block_size - 1:
        problems.append(f"sliding_window={cfg.sliding_window} (gpt2/llama GGUF files have no attention window)")
    gpt2_like = cfg.norm == "layernorm" and cfg.pos == "learned" and cfg.mlp in ("gelu", "gelu_tanh")
    llama_like = cfg.norm == "rmsnorm" and cfg.pos == "rope" and cfg.mlp == "swiglu"
    if gpt2_like:
        if cfg.mlp == "gelu":
            problems.append("mlp=gelu (llama.cpp's gpt2 uses the tanh approximation: mlp=gelu_tanh)")
        if not (cfg.bias and cfg.norm_bias):
            problems.append("bias=false or norm_bias=false (llama.cpp's gpt2 needs every bias)")
        if cfg.kv_heads != cfg.n_head:
            problems.append(f"n_kv_head={cfg.kv_heads} (llama.cpp's gpt2 has one key/value head per query head)")
        if cfg.moe_experts:
            problems.append("a Mixture of Experts in a GPT-2 style model (experts need the llama architecture)")
    elif llama_like:
        if cfg.rope_scaling and cfg.rope_scaling.get("type") not in ("linear", "llama3"):
            problems.append(f"rope scaling {cfg.rope_scaling.get('type')!r} (linear and llama3 are supported)")
        if cfg.moe_experts:
            if cfg.moe_every != 1:
                problems.append(f"moe_every={cfg.moe_every} (llama.cpp's llama has experts in every layer or none)")
            if cfg.moe_shared_expert:
                problems.append("moe_shared_expert (llama.cpp's llama has no shared expert)")
            if not cfg.moe_renormalize:
                problems.append("moe_renormalize=false (llama.cpp's llama renormalises the top-k gates)")
            if cfg.bias:
                problems.append("bias=true with experts (llama.cpp's llama experts have no biases)")
    else:
        problems.append(
            f"norm={cfg.norm}, pos={cfg.pos}, mlp={cfg.mlp} (GGUF gpt2 needs layernorm/learned/gelu_tanh, "
            f"llama needs rmsnorm/rope/swiglu)"
        )
    if problems:
        raise LmforgeError("cannot export to GGUF: unsupported " + "; ".join(problems))
    return "gpt2" if gpt2_like else "llama"


def permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a query/key projection (n_heads * head_dim, ...) from half-split to interleaved rotary pairs.

    Row h*head_dim + j goes to h*head_dim + 2j for j < head_dim/2, and h*head_dim + j - head_dim/2 to
    h*head_dim + 2(j - head_dim/2) + 1 (the layout of llama.cpp's converter, `LlamaModel.permute`)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of permute_rotary: interleaved rotary pairs back to half-split rows."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def rope_freq_factors(cfg: ModelConfig) -> torch.Tensor:
    """(head_dim/2,) divisors llama.cpp applies to each rotary frequency: unscaled / scaled inverse frequency."""
    return rope_inv_freq(cfg.head_dim, cfg.rope_theta, None) / rope_inv_freq(
        cfg.head_dim, cfg.rope_theta, cfg.rope_scaling
    )


def gguf_tensors(cfg: ModelConfig, arch: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The GGUF tensors (float32, PyTorch layout) of an lmforge state dict, by GGUF name, in file order."""
    out = {"token_embd.weight": sd["tok_emb.weight"]}
    if arch == "gpt2":
        out["position_embd.weight"] = sd["pos_emb.weight"]
    q, kv = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    for i in range(cfg.n_layer):
        b, g = f"blocks.{i}.", f"blk.{i}."
        params = ("weight", "bias") if cfg.bias else ("weight",)
        for p in ("weight", "bias") if arch == "gpt2" else ("weight",):  # RMSNorm has no bias
            out[g + f"attn_norm.{p}"] = sd[b + f"norm1.{p}"]
        if arch == "gpt2":
            for p in params:
                out[g + f"attn_qkv.{p}"] = sd[b + f"attn.qkv.{p}"]
        else:
            for p in params:
                wq, wk, wv = sd[b + f"attn.qkv.{p}"].split([q, kv, kv])
                out[g + f"attn_q.{p}"] = permute_rotary(wq, cfg.n_head)
                out[g + f"attn_k.{p}"] = permute_rotary(wk, cfg.kv_heads)
                out[g + f"attn_v.{p}"] = wv
        for p in params:
            out[g + f"attn_output.{p}"] = sd[b + f"attn.proj.{p}"]
        for p in ("weight", "bias") if arch == "gpt2" else ("weight",):
            out[g + f"ffn_norm.{p}"] = sd[b + f"norm2.{p}"]
        if cfg.is_moe_layer(i):
            out[g + "ffn_gate_inp.weight"] = sd[b + "mlp.router.weight"]
            for part in ("gate", "up", "down"):  # (E, I, D) for gate/up, (E, D, I) for down
                experts = [sd[b + f"mlp.experts.{e}.{part}.weight"] for e in range(cfg.moe_experts)]
                out[g + f"ffn_{part}_exps.weight"] = torch.stack(experts)
            continue
        for part in ("up", "down") if arch == "gpt2" else ("gate", "up", "down"):
            for p in params:
                out[g + f"ffn_{part}.{p}"] = sd[b + f"mlp.{part}.{p}"]
    for p in ("weight", "bias") if arch == "gpt2" else ("weight",):
        out[f"output_norm.{p}"] = sd[f"norm.{p}"]
    if arch == "gpt2" or not cfg.tie_embeddings:  # llama.cpp's converter always writes gpt2's output matrix
        out["output.weight"] = sd["lm_head.weight"]
    if arch == "llama" and cfg.rope_scaling and cfg.rope_scaling.get("type") == "llama3":
        out["rope_freqs.weight"] = rope_freq_factors(cfg)
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def _keep_f32(name: str, t: torch.Tensor) -> bool:
    return t.dim() == 1 or name.split(".")[-2] in ("position_embd", "ffn_gate_inp", "rope_freqs")


def _encode(gguf, name: str, t: torch.Tensor, dtype: str):
    """(array, raw GGML type or None) as the writer takes it."""
    a = t.numpy()
    if dtype == "f32" or _keep_f32(name, t):
        return a.astype(np.float32), None
    if dtype == "q8_0" and a.shape[-1] % 32 == 0:
        q8 = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(a.astype(np.float32), q8), q8
    return a.astype(np.float16), None


# --- the tokenizer as GGUF metadata -----------------------------------------------------------------


def _pre_tokenizer_name(tok_json: dict) -> str:
    """llama.cpp's name for the pre-tokenizer of a byte-level BPE tokenizer.json, or LmforgeError."""
    model, pre = tok_json.get("model") or {}, tok_json.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or tok_json.get("normalizer") is not None:
        raise LmforgeError(
            "cannot export to GGUF: only byte-level BPE tokenizers without a normalizer are supported "
            f"(this one: model {model.get('type')}, normalizer {(tok_json.get('normalizer') or {}).get('type')})"
        )

    def is_byte_level(p, regex: bool) -> bool:
        return p.get("type") == "ByteLevel" and not p.get("add_prefix_space") and p.get("use_regex", True) == regex

    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if len(steps) == 1 and is_byte_level(steps[0], True):
        return "gpt-2"
    if len(steps) == 2 and is_byte_level(steps[1], True):
        if steps[0].get("type") == "Digits" and steps[0].get("individual_digits"):
            return "refact"  # llama.cpp: \p{N} split first, then GPT-2's regex
    if len(steps) == 2 and is_byte_level(steps[1], False) and steps[0].get("type") == "Split":
        if (steps[0].get("pattern") or {}).get("Regex") == _LLAMA3_REGEX:
            return "llama-bpe"
    raise LmforgeError(
        "cannot export to GGUF: the tokenizer's pre-tokenizer has no llama.cpp name "
        "(supported: GPT-2's byte-level regex, with or without split digits, and Llama 3's)"
    )


def _add_tokenizer(gguf, writer, tokenizer, vocab_size: int, chat_template: str | None) -> None:
    hf = tokenizer.hf
    tok_json = json.loads(hf.to_str())
    pre = _pre_tokenizer_name(tok_json)
    added = {i: t for i, t in hf.get_added_tokens_decoder().items()}
    tokens, types = [], []
    for i in range(vocab_size):
        piece = hf.id_to_token(i)
        if piece is None:  # model vocabulary rows beyond the tokenizer (rounded up for speed)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(piece)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(piece)
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.eos_id)  # lmforge has no separate BOS; documents start after an EOS
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_pad_token_id(tokenizer.eos_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    if chat_template:
        writer.add_chat_template(chat_template)


# --- export -----------------------------------------------------------------------------------------


def to_gguf(run_dir: str | Path, out: str | Path, dtype: str = "f16") -> Path:
    """Write run_dir's model and tokenizer as one GGUF file llama.cpp loads.

    dtype: "f32", "f16" (matrices in half precision) or "q8_0" (matrices in 8-bit blocks of 32).
    Raises LmforgeError for a missing gguf package, an unknown dtype, a seq2seq run, or a model or
    tokenizer llama.cpp cannot run as it is; nothing is written then.
    """
    run_dir, out = Path(run_dir), Path(out)
    if dtype not in DTYPES:
        raise LmforgeError(f"unknown GGUF dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    gguf = _gguf()
    model, tokenizer = load(run_dir)
    cfg = model.config
    if not isinstance(cfg, ModelConfig):
        raise LmforgeError(f"{run_dir} is a seq2seq run: GGUF export is for decoder-only language models")
    arch = gguf_architecture(cfg)
    tensors = gguf_tensors(cfg, arch, model.state_dict())
    encoded = {name: _encode(gguf, name, t, dtype) for name, t in tensors.items()}
    chat_template = load_chat_template(run_dir)

    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        try:
            _add_hyperparameters(gguf, writer, cfg, arch, run_dir.resolve().name, dtype)
            _add_tokenizer(gguf, writer, tokenizer, cfg.vocab_size, chat_template)
            for name, (array, raw_dtype) in encoded.items():
                writer.add_tensor(name, array, raw_dtype=raw_dtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return out


def _add_hyperparameters(gguf, writer, cfg: ModelConfig, arch: str, name: str, dtype: str) -> None:
    writer.add_name(name)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}.get(
        dtype, gguf.LlamaFileType.MOSTLY_Q8_0
    )
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layer)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.kv_heads)
    if arch == "gpt2":
        writer.add_feed_forward_length(cfg.ff_dim)
        writer.add_layer_norm_eps(cfg.norm_eps)
        return
    writer.add_feed_forward_length(cfg.expert_dim if cfg.moe_experts else cfg.ff_dim)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    if cfg.moe_experts:
        writer.add_expert_count(cfg.moe_experts)
        writer.add_expert_used_count(cfg.moe_top_k)
    if cfg.rope_scaling:
        if cfg.rope_scaling["type"] == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))
        writer.add_string(LMFORGE_ROPE_KEY, json.dumps(cfg.rope_scaling))


# --- import -----------------------------------------------------------------------------------------


def _fields(reader) -> dict:
    """Every metadata value of a GGUFReader, as Python values (strings, numbers, lists)."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
            continue
        try:
            value = field.contents()
        except Exception:  # a type this gguf version cannot decode: not one we read
            continue
        out[key] = value
    return out


def _f32(value) -> float:
    """A float32 metadata value as the shortest decimal that reads back to it (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


def model_config_from_gguf(meta: dict, tensors: dict[str, torch.Tensor]) -> ModelConfig:
    """The lmforge ModelConfig of a gpt2 or llama GGUF file's metadata (raises LmforgeError otherwise)."""
    arch = meta.get("general.architecture")
    if arch not in ("gpt2", "llama"):
        raise LmforgeError(f"unsupported GGUF architecture {arch!r} (supported: llama, gpt2)")

    def key(name, default=None):
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise LmforgeError(f"GGUF file lacks {arch}.{name}")
        return value

    if "token_embd.weight" not in tensors:
        raise LmforgeError("GGUF file lacks tensor token_embd.weight")
    common = dict(
        vocab_size=tensors["token_embd.weight"].shape[0],
        block_size=int(key("context_length")),
        n_layer=int(key("block_count")),
        n_head=int(key("attention.head_count")),
        d_model=int(key("embedding_length")),
        tie_embeddings="output.weight" not in tensors
        or torch.equal(tensors["output.weight"], tensors["token_embd.weight"]),
        dropout=0.0,
    )
    if arch == "gpt2":
        return ModelConfig(
            **common,
            d_ff=int(key("feed_forward_length")),
            norm="layernorm",
            norm_eps=_f32(key("attention.layer_norm_epsilon")),
            pos="learned",
            mlp="gelu_tanh",
            bias=True,
        )
    n_head, d = common["n_head"], common["d_model"]
    head_dim = d // n_head
    if int(meta.get("llama.rope.dimension_count", head_dim)) != head_dim:
        raise LmforgeError("unsupported GGUF model: rotary embedding on only part of each head")
    if int(meta.get("llama.attention.key_length", head_dim)) != head_dim:
        raise LmforgeError("unsupported GGUF model: head size different from embedding_length / head_count")
    theta = _f32(meta.get("llama.rope.freq_base", 10000.0))
    kv_heads = int(meta.get("llama.attention.head_count_kv", n_head))
    cfg = ModelConfig(
        **common,
        n_kv_head=kv_heads if kv_heads != n_head else None,
        d_ff=int(key("feed_forward_length")),
        norm="rmsnorm",
        norm_eps=_f32(key("attention.layer_norm_rms_epsilon")),
        pos="rope",
        rope_theta=theta,
        rope_scaling=_rope_scaling_from_gguf(meta, head_dim, theta, tensors.get("rope_freqs.weight")),
        mlp="swiglu",
        bias="blk.0.attn_q.bias" in tensors,
    )
    experts = int(meta.get("llama.expert_count", 0))
    if experts:
        cfg.moe_experts = experts
        cfg.moe_top_k = int(key("expert_used_count"))
        cfg.moe_d_ff = cfg.d_ff
        cfg.moe_capacity_factor = None
        cfg.moe_renormalize = True
    cfg.validate()
    return cfg


def _rope_scaling_from_gguf(meta: dict, head_dim: int, theta: float, factors: torch.Tensor | None) -> dict | None:
    if LMFORGE_ROPE_KEY in meta:  # written by us: the exact rule
        scaling = json.loads(meta[LMFORGE_ROPE_KEY])
    elif meta.get("llama.rope.scaling.type") == "linear":
        scaling = {"type": "linear", "factor": _f32(meta["llama.rope.scaling.factor"])}
    elif meta.get("llama.rope.scaling.type") not in (None, "none"):
        raise LmforgeError(f"unsupported GGUF rope scaling {meta['llama.rope.scaling.type']!r} (linear only)")
    elif factors is not None:
        scaling = _fit_llama3(factors, head_dim, theta)
    else:
        return None
    if factors is not None:  # the tensor is what llama.cpp uses: our rule must give the same frequencies
        want = rope_inv_freq(head_dim, theta, None) / factors.float()
        if not torch.allclose(rope_inv_freq(head_dim, theta, scaling), want, rtol=1e-4, atol=0):
            raise LmforgeError("GGUF rope_freqs does not match a llama3 frequency scaling; cannot import it")
    return scaling


def _fit_llama3(factors: torch.Tensor, head_dim: int, theta: float) -> dict:
    """Llama 3 RoPE scaling parameters that reproduce per-frequency divisors (llama.cpp's rope_freqs tensor).

    Llama 3 divides the frequency of wavelength w by `factor` when w > old/low, by 1 when w < old/high,
    and by 1 / ((1 - s)/factor + s) with s = (old/w - low) / (high - low) in between. Only s as a
    function of w matters, so low = 1 is taken and old, high are solved from two in-between frequencies."""
    f = factors.double()
    wavelen = 2 * math.pi / rope_inv_freq(head_dim, theta, None).double()
    factor = float(f.max())
    mid = ((f > 1 + 1e-6) & (f < factor - 1e-6)).nonzero().flatten().tolist()
    if factor <= 1 or len(mid) < 2:
        raise LmforgeError("GGUF rope_freqs does not look like llama3 scaling (too few scaled frequencies)")
    s = [(1 / float(f[i]) - 1 / factor) / (1 - 1 / factor) for i in mid[:2]]
    w = [float(wavelen[i]) for i in mid[:2]]
    # s_i = (old / w_i - 1) / (high - 1): linear in old and (high - 1)
    a = np.array([[1 / w[0], -s[0]], [1 / w[1], -s[1]]])
    old, span = np.linalg.solve(a, np.array([1.0, 1.0]))
    return {
        "type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": float(1 + span),
        "original_max_position_embeddings": float(old),
    }


def state_dict_from_gguf(cfg: ModelConfig, arch: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """lmforge parameters from dequantised GGUF tensors (the inverse of gguf_tensors)."""

    def take(name):
        if name not in tensors:
            raise LmforgeError(f"GGUF file lacks tensor {name}")
        return tensors[name]

    sd = {"tok_emb.weight": take("token_embd.weight")}
    if arch == "gpt2":
        sd["pos_emb.weight"] = take("position_embd.weight")
    norm_params = ("weight", "bias") if arch == "gpt2" else ("weight",)
    params = ("weight", "bias") if cfg.bias else ("weight",)
    for i in range(cfg.n_layer):
        b, g = f"blocks.{i}.", f"blk.{i}."
        for p in norm_params:
            sd[b + f"norm1.{p}"] = take(g + f"attn_norm.{p}")
            sd[b + f"norm2.{p}"] = take(g + f"ffn_norm.{p}")
        for p in params:
            if arch == "gpt2":
                sd[b + f"attn.qkv.{p}"] = take(g + f"attn_qkv.{p}")
            else:
                wq = unpermute_rotary(take(g + f"attn_q.{p}"), cfg.n_head)
                wk = unpermute_rotary(take(g + f"attn_k.{p}"), cfg.kv_heads)
                sd[b + f"attn.qkv.{p}"] = torch.cat([wq, wk, take(g + f"attn_v.{p}")])
            sd[b + f"attn.proj.{p}"] = take(g + f"attn_output.{p}")
        if cfg.is_moe_layer(i):
            sd[b + "mlp.router.weight"] = take(g + "ffn_gate_inp.weight")
            for part in ("gate", "up", "down"):
                stacked = take(g + f"ffn_{part}_exps.weight")
                for e in range(cfg.moe_experts):
                    sd[b + f"mlp.experts.{e}.{part}.weight"] = stacked[e]
            continue
        for part in ("up", "down") if arch == "gpt2" else ("gate", "up", "down"):
            for p in params:
                sd[b + f"mlp.{part}.{p}"] = take(g + f"ffn_{part}.{p}")
    for p in norm_params:
        sd[f"norm.{p}"] = take(f"output_norm.{p}")
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = take("output.weight")
    return sd


def _read_tensors(gguf, reader) -> dict[str, torch.Tensor]:
    out = {}
    for t in reader.tensors:
        try:
            array = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise LmforgeError(
                f"GGUF tensor {t.name} is stored as {t.tensor_type.name}, which the gguf package cannot dequantise"
            ) from None
        out[t.name] = torch.from_numpy(np.array(array, dtype=np.float32)).reshape(
            tuple(int(n) for n in reversed(t.shape))
        )
    return out


def _tokenizer_from_gguf(path: Path, meta: dict):
    """The file's tokenizer, rebuilt by transformers' GGUF reader, as an lmforge Tokenizer."""
    from ..data.tokenizer import Tokenizer

    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise LmforgeError("importing GGUF files needs transformers: pip install 'lmforge[gguf]'") from None
    try:
        hf_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        raise LmforgeError(f"cannot read the tokenizer of {path}: {str(e).splitlines()[0]}") from None
    backend = hf_tok.backend_tokenizer
    eos_id = meta.get("tokenizer.ggml.eos_token_id")
    eos = backend.id_to_token(int(eos_id)) if eos_id is not None else None
    return Tokenizer(backend, eos)


def from_gguf(gguf_file: str | Path, run_dir: str | Path) -> Path:
    """Convert a llama (dense or Mixtral-style) or gpt2 GGUF file into an lmforge run directory.

    Quantised tensors are dequantised to float32 (the `gguf` package's dequantisers). Raises
    LmforgeError for a missing or unreadable file, another architecture, or a run directory that
    already holds a model.
    """
    path, run_dir = Path(gguf_file), Path(run_dir)
    if not path.is_file():
        raise LmforgeError(f"GGUF file not found: {path}")
    if (run_dir / WEIGHTS).exists():
        raise LmforgeError(f"{run_dir} already holds a model; choose another --out")
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LmforgeError(f"cannot read {path} as GGUF: {reason}") from None
    meta = _fields(reader)
    tensors = _read_tensors(gguf, reader)
    cfg = model_config_from_gguf(meta, tensors)
    sd = state_dict_from_gguf(cfg, meta["general.architecture"], tensors)
    tokenizer = _tokenizer_from_gguf(path, meta)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise LmforgeError(
            f"GGUF tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is {cfg.vocab_size}"
        )
    model = build_model(cfg)
    expected = model.state_dict()
    missing = set(expected) - set(sd) - ({"lm_head.weight"} if cfg.tie_embeddings else set())
    if missing:
        raise LmforgeError(f"GGUF file lacks tensors for {', '.join(sorted(missing)[:3])}")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise LmforgeError(
                f"GGUF tensor for {k} has shape {tuple(v.shape)}, metadata implies {tuple(expected[k].shape)}"
            )
    model.load_state_dict(sd, strict=False)
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(run_dir / TOKENIZER)
    if meta.get("tokenizer.chat_template"):
        write_text_atomic(run_dir / CHAT_TEMPLATE, meta["tokenizer.chat_template"])
    save_config(run_dir, Config(model=cfg, train=TrainConfig()))
    save_weights(run_dir / WEIGHTS, model, {"source": f"gguf:{meta['general.architecture']}"})
    return run_dir
