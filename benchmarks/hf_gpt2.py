"""Copy an lmforge GPT-2-style DecoderLM into a transformers GPT2LMHeadModel with identical weights.

Only for the benchmarks (the real import/export lives in lmforge.interop). GPT-2's Conv1D layers
store weights as (in, out), the transpose of nn.Linear; our fused qkv rows are [q; k; v], the
same order as GPT-2's c_attn columns.
"""

import torch
from transformers import GPT2Config, GPT2LMHeadModel


def to_hf_gpt2(model) -> GPT2LMHeadModel:
    c = model.config
    assert c.pos == "learned" and c.norm == "layernorm" and c.mlp in ("gelu", "gelu_tanh") and c.tie_embeddings
    hf = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=c.vocab_size,
            n_positions=c.block_size,
            n_embd=c.d_model,
            n_layer=c.n_layer,
            n_head=c.n_head,
            n_inner=c.ff_dim,
            activation_function="gelu_new" if c.mlp == "gelu_tanh" else "gelu",
            layer_norm_epsilon=c.norm_eps,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=True,
        )
    ).eval()
    ours = model.state_dict()
    sd = {
        "transformer.wte.weight": ours["tok_emb.weight"],
        "transformer.wpe.weight": ours["pos_emb.weight"],
        "transformer.ln_f.weight": ours["norm.weight"],
        "transformer.ln_f.bias": ours["norm.bias"],
    }
    for i in range(c.n_layer):
        o, h = f"blocks.{i}.", f"transformer.h.{i}."
        for a, b in (("norm1", "ln_1"), ("norm2", "ln_2")):
            sd[h + b + ".weight"], sd[h + b + ".bias"] = ours[o + a + ".weight"], ours[o + a + ".bias"]
        for a, b in (
            ("attn.qkv", "attn.c_attn"),
            ("attn.proj", "attn.c_proj"),
            ("mlp.up", "mlp.c_fc"),
            ("mlp.down", "mlp.c_proj"),
        ):
            sd[h + b + ".weight"] = ours[o + a + ".weight"].t().contiguous()  # Conv1D: (in, out)
            sd[h + b + ".bias"] = ours[o + a + ".bias"]
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all(
        k == "lm_head.weight" or k.endswith(".attn.bias") or k.endswith("masked_bias") for k in missing
    ), missing
    hf.tie_weights()
    hf.generation_config.eos_token_id = None  # random weights: never stop early, like ignore_eos on our side
    hf.generation_config.pad_token_id = 0
    return hf


@torch.no_grad()
def check_same(model, hf, tokens: int = 32) -> float:
    """Largest logit difference between the two models on random tokens."""
    x = torch.randint(0, model.config.vocab_size, (2, tokens))
    return float((model(x) - hf(x).logits).abs().max())
