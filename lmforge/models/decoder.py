"""Decoder-only transformer language model (GPT-2 and its modern descendants).

One code path, chosen by `ModelConfig`: GPT-2 (learned positions, LayerNorm, GELU, tied
head) by default; Llama-style with pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head < n_head;
Mixtral-style with moe_experts > 0 (feed-forward layers replaced by routed experts, models/moe.py);
value_residual mixes the first layer's attention values into every later layer's (layers.Attention).

    tokens (B, T)
      -> token embedding (+ learned or sinusoidal positions)   (B, T, d_model)
      -> n_layer x Block: x + Attn(Norm(x)); x + MLP(Norm(x))  (pre-norm residual; MLP or MoE)
      -> final Norm -> LM head                                  (B, T, vocab_size)
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig
from . import moe
from .layers import (
    MLP,
    Attention,
    KVCache,
    make_norm,
    rope_cos_sin,
    rope_inv_freq,
    segment_mask,
    segment_positions,
    sinusoidal_table,
)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.norm1 = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_bias)
        self.attn = Attention(cfg, layer_idx)
        self.norm2 = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_bias)
        self.mlp = moe.MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope=None, cache=None, mask=None, v_first=None):
        """x (B, T, d_model) -> (x, v_first): v_first, the first layer's attention values, passes on to the next
        block (value residual, layers.Attention; None without it)."""
        a, v_first = self.attn(self.norm1(x), rope, cache, mask, v_first)
        if not self.training:  # dropout is the identity: skip its calls (they are a visible share of a decode step)
            x = x + a
            return x + self.mlp(self.norm2(x)), v_first
        x = x + self.drop(a)
        x = x + self.drop(self.mlp(self.norm2(x)))
        return x, v_first


class DecoderLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model) if cfg.pos == "learned" else None
        if cfg.pos == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(cfg.block_size, cfg.d_model), persistent=False)
        if cfg.pos == "rope":
            self.register_buffer(
                "inv_freq", rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling), persistent=False
            )
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_bias)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.activation_checkpointing = False  # recompute block activations in backward (saves memory)
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled down by sqrt(2 * n_layer) so the residual stream keeps its size;
        # zero_init_proj: start them at zero instead, so every block begins as the identity (modded-nanogpt).
        for block in self.blocks:
            for lin in (block.attn.proj, *(m.down for m in block.mlp.modules() if isinstance(m, MLP))):
                if cfg.zero_init_proj:
                    nn.init.zeros_(lin.weight)
                else:
                    nn.init.normal_(lin.weight, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=self.config.init_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=self.config.init_std)

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied weights are counted once
        if not embeddings:
            n -= self.tok_emb.weight.numel() + (self.pos_emb.weight.numel() if self.pos_emb is not None else 0)
        return n

    def num_active_params(self) -> int:
        """Parameters used for each token: of a MoE layer's experts, only the top_k a token is routed to count."""
        return self.num_params() - moe.num_inactive_params(self)

    def new_cache(self, batch: int, max_len: int, device=None, dtype=None) -> KVCache:
        cfg = self.config
        p = self.tok_emb.weight
        return KVCache(
            cfg.n_layer,
            batch,
            cfg.kv_heads,
            cfg.head_dim,
            max_len,
            cfg.sliding_window,
            device=device or p.device,
            dtype=dtype or p.dtype,
        )

    def forward(
        self,
        idx: torch.Tensor,
        cache: KVCache | None = None,
        last_only: bool = False,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids idx (B, T); with a cache, idx continues each row's cached tokens.

        segments (B, T), no cache: rows packed with several sequences (layers.segment_positions): positions
        restart and attention stays within each sequence, as if each ran alone."""
        B, T = idx.shape
        cfg = self.config
        limit = (
            cfg.block_size if self.pos_emb is not None or cfg.pos == "sinusoidal" else None
        )  # positions that have an embedding
        mask = None
        if cache is None:
            if limit is not None and T > limit:
                raise ValueError(f"sequence of {T} tokens exceeds the context window ({limit})")
            positions = torch.arange(T, device=idx.device)
            if segments is not None:  # (B, T) positions; a block-diagonal causal mask (B, 1, T, T)
                positions, mask = segment_positions(segments), segment_mask(segments, cfg.sliding_window)
        else:  # (T,), or (B, T) when rows sit at different positions (left padding, rows of different lengths)
            positions = cache.begin(T, idx.device, limit)
        x = self.tok_emb(idx)  # (B, T, d_model)
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        elif cfg.pos == "sinusoidal":
            x = x + self.pos_table[positions].to(x.dtype)
        x = self.drop(x)
        rope = rope_cos_sin(self.inv_freq, positions, x.dtype) if cfg.pos == "rope" else None
        v_first = None  # value residual: the first layer's values (B, n_kv_head, T, head_dim), for the later layers
        for block in self.blocks:
            if self.activation_checkpointing and self.training and cache is None:
                x, v_first = checkpoint(block, x, rope, None, mask, v_first, use_reentrant=False)
            else:
                x, v_first = block(x, rope, cache, mask, v_first)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(self.norm(x))
        if cfg.logit_softcap is not None:
            logits = cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap)
        return logits
