"""Encoder–decoder transformer for sequence-to-sequence tasks ("Attention Is All You Need", Vaswani et al. 2017).

    source ids (B, S) -> embedding * sqrt(d_model) + positions -> N x EncoderLayer          -> memory (B, S, d_model)
    target ids (B, T) -> embedding * sqrt(d_model) + positions -> N x DecoderLayer(memory) -> logits (B, T, tgt_vocab)

    EncoderLayer: self-attention over the source, feed-forward
    DecoderLayer: masked (causal) self-attention, cross-attention over the memory, feed-forward

Every sub-layer sits in a residual connection with dropout and a norm: post-LN as in the paper,
x = Norm(x + Dropout(Sublayer(x))), or pre-LN, x = x + Dropout(Sublayer(Norm(x))) (with a final norm
after the last layer of each stack). Masks are boolean, True where attention is allowed: the source
padding mask hides padded source tokens from the encoder and from cross-attention; the decoder sees
only earlier target positions (and no target padding).

For decoding, `new_cache` projects the memory to each layer's cross-attention keys/values once; then
`decode` is fed one token at a time and keeps the self-attention keys/values in a preallocated KVCache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import Seq2SeqConfig
from .layers import MLP, KVCache, make_norm, sinusoidal_table, window_mask


class MultiHeadAttention(nn.Module):
    """Queries from x attend over keys/values: from x itself (self-attention) or from the encoder output
    (cross-attention)."""

    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.q = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.kv = nn.Linear(cfg.d_model, 2 * cfg.d_model, bias=cfg.bias)  # keys and values in one projection
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)

    def keys_values(self, x):
        """(B, S, d_model) -> keys, values, each (B, n_head, S, head_dim)."""
        k, v = self.kv(x).chunk(2, dim=-1)
        return self._split_heads(k), self._split_heads(v)

    def forward(self, x, k, v, mask):
        """x (B, T, d_model) attends over k, v; mask broadcasts to (B, n_head, T, S), True = may attend."""
        q = self._split_heads(self.q(x))  # (B, n_head, T, head_dim)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        B, _, T, _ = y.shape
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))

    def _split_heads(self, x):
        B, T, _ = x.shape
        return x.view(B, T, self.n_head, -1).transpose(1, 2)


class Residual(nn.Module):
    """A sub-layer f in a residual connection with dropout and a norm (post-LN or pre-LN)."""

    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_bias)
        self.drop = nn.Dropout(cfg.dropout)
        self.pre_norm = cfg.norm_position == "pre"

    def forward(self, x, f):
        if self.pre_norm:
            return x + self.drop(f(self.norm(x)))
        return self.norm(x + self.drop(f(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg)
        self.self_attn_res = Residual(cfg)
        self.ff = MLP(cfg)
        self.ff_res = Residual(cfg)

    def forward(self, x, mask):
        x = self.self_attn_res(x, lambda h: self.self_attn(h, *self.self_attn.keys_values(h), mask))
        return self.ff_res(x, self.ff)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = MultiHeadAttention(cfg)
        self.self_attn_res = Residual(cfg)
        self.cross_attn = MultiHeadAttention(cfg)
        self.cross_attn_res = Residual(cfg)
        self.ff = MLP(cfg)
        self.ff_res = Residual(cfg)

    def forward(self, x, self_mask, memory_kv, memory_mask, cache: KVCache | None = None):
        x = self.self_attn_res(x, lambda h: self._self_attention(h, self_mask, cache))
        x = self.cross_attn_res(x, lambda h: self.cross_attn(h, *memory_kv, memory_mask))
        return self.ff_res(x, self.ff)

    def _self_attention(self, h, mask, cache):
        k, v = self.self_attn.keys_values(h)
        if cache is not None:  # store this call's keys/values after the cached ones and attend over all of them
            start, end = cache.pos, cache.pos + h.shape[1]
            if end > cache.size:
                raise ValueError(f"decoder KV cache full: {end} positions > {cache.size}")
            ck, cv = cache.k[self.layer_idx], cache.v[self.layer_idx]
            ck[:, :, start:end] = k
            cv[:, :, start:end] = v
            k, v = ck[:, :, :end], cv[:, :, :end]
        return self.self_attn(h, k, v, mask)


@dataclass
class Seq2SeqCache:
    """What decoding a batch keeps between steps."""

    memory_kv: list[
        tuple[torch.Tensor, torch.Tensor]
    ]  # per decoder layer: cross-attention keys, values (B, n_head, S, head_dim)
    memory_mask: torch.Tensor | None  # (B, 1, 1, S) True at real source tokens, or None when there is no padding
    self_attn: KVCache  # decoder self-attention keys/values, one slot per target position


class Seq2SeqTransformer(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        d = cfg.d_model
        self.emb_scale = math.sqrt(d)
        self.src_emb = nn.Embedding(cfg.src_vocab_size, d)
        self.tgt_emb = self.src_emb if cfg.shared_vocab else nn.Embedding(cfg.tgt_vocab_size, d)
        if cfg.pos == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(cfg.max_len, d), persistent=False)
        else:
            self.src_pos = nn.Embedding(cfg.max_len, d)
            self.tgt_pos = nn.Embedding(cfg.max_len, d)
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_encoder_layer))
        self.decoder = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.n_decoder_layer))
        pre = cfg.norm_position == "pre"  # pre-LN leaves the last layer's output unnormalised: add a final norm
        self.encoder_norm = make_norm(cfg.norm, d, cfg.norm_eps, cfg.norm_bias) if pre else None
        self.decoder_norm = make_norm(cfg.norm, d, cfg.norm_eps, cfg.norm_bias) if pre else None
        self.lm_head = nn.Linear(d, cfg.tgt_vocab_size, bias=False)
        self._init_weights()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tgt_emb.weight

    def _init_weights(self):
        """Xavier-uniform matrices and zero biases (as the reference implementations); embeddings N(0, 1/d_model),
        so that embeddings * sqrt(d_model) have unit scale and a tied output projection gives unit-scale logits."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        std = self.config.d_model**-0.5
        for m in (
            self.src_emb,
            self.tgt_emb,
            self.lm_head,
            getattr(self, "src_pos", None),
            getattr(self, "tgt_pos", None),
        ):
            if m is not None:
                nn.init.normal_(m.weight, mean=0.0, std=std)

    def num_params(self, embeddings: bool = True) -> int:
        params = {id(p): p for p in self.parameters()}  # shared and tied weights count once
        if not embeddings:
            for m in (self.src_emb, self.tgt_emb, getattr(self, "src_pos", None), getattr(self, "tgt_pos", None)):
                if m is not None:
                    params.pop(id(m.weight), None)
        return sum(p.numel() for p in params.values())

    # --- the two stacks -------------------------------------------------------------------------------

    def _embed(self, ids, emb: nn.Embedding, pos_emb: nn.Embedding | None, start: int = 0):
        T = ids.shape[1]
        if start + T > self.config.max_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_len ({self.config.max_len})")
        positions = torch.arange(start, start + T, device=ids.device)
        pos = self.pos_table[positions] if pos_emb is None else pos_emb(positions)
        return self.drop(emb(ids) * self.emb_scale + pos.to(emb.weight.dtype))  # (B, T, d_model)

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Memory (B, S, d_model) for source ids (B, S); src_mask (B, S) is True at real (not padding) tokens."""
        x = self._embed(src, self.src_emb, getattr(self, "src_pos", None))
        mask = _key_mask(src_mask)
        for layer in self.encoder:
            x = layer(x, mask)
        return x if self.encoder_norm is None else self.encoder_norm(x)

    def memory_keys_values(self, memory: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each decoder layer's cross-attention keys and values of the memory."""
        return [layer.cross_attn.keys_values(memory) for layer in self.decoder]

    def new_cache(self, memory: torch.Tensor, src_mask: torch.Tensor | None, max_len: int) -> Seq2SeqCache:
        """Decoding state for a batch: cross-attention keys/values computed once, room for max_len target positions."""
        cfg, B = self.config, memory.shape[0]
        self_attn = KVCache(
            cfg.n_decoder_layer,
            B,
            cfg.n_head,
            cfg.head_dim,
            min(max_len, cfg.max_len),
            device=memory.device,
            dtype=memory.dtype,
        )
        return Seq2SeqCache(self.memory_keys_values(memory), _key_mask(src_mask), self_attn)

    def decode(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor | None = None,
        src_mask: torch.Tensor | None = None,
        tgt_mask: torch.Tensor | None = None,
        cache: Seq2SeqCache | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, tgt_vocab) for target ids (B, T) given the memory, or given a cache (then tgt continues
        the cached positions and memory/src_mask come from the cache). tgt_mask (B, T): True at real tokens."""
        start = 0
        if cache is None:
            memory_kv, memory_mask, kv_cache = self.memory_keys_values(memory), _key_mask(src_mask), None
        else:
            memory_kv, memory_mask, kv_cache = cache.memory_kv, cache.memory_mask, cache.self_attn
            start = kv_cache.pos
        T = tgt.shape[1]
        positions = torch.arange(start, start + T, device=tgt.device)
        self_mask = window_mask(positions, torch.arange(start + T, device=tgt.device), None)  # causal (T, start + T)
        if tgt_mask is not None:
            if cache is not None:
                raise ValueError("tgt_mask is for uncached calls (cached decoding feeds no padding)")
            self_mask = self_mask & tgt_mask[:, None, None, :]  # (B, 1, T, T)
        x = self._embed(tgt, self.tgt_emb, getattr(self, "tgt_pos", None), start)
        for layer, kv in zip(self.decoder, memory_kv):
            x = layer(x, self_mask, kv, memory_mask, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        if self.decoder_norm is not None:
            x = self.decoder_norm(x)
        return self.lm_head(x)

    def forward(self, src, tgt, src_mask=None, tgt_mask=None) -> torch.Tensor:
        """Teacher-forced logits (B, T, tgt_vocab): target ids tgt (B, T) predict their next tokens."""
        return self.decode(tgt, self.encode(src, src_mask), src_mask, tgt_mask)


def _key_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, S) real-token mask -> (B, 1, 1, S), broadcasting over heads and query positions."""
    return None if mask is None else mask[:, None, None, :]
