"""GGUF export and import, checked against transformers' GGUF reader (an implementation independent of ours)."""

import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers needs it to load GGUF weights

from conftest import run_cli, structured_text  # noqa: E402

from lmforge.config import Config, ModelConfig, TrainConfig  # noqa: E402
from lmforge.errors import LmforgeError  # noqa: E402
from lmforge.interop import gguf as G  # noqa: E402
from lmforge.models import build_model  # noqa: E402
from lmforge.models.layers import rope_inv_freq  # noqa: E402
from lmforge.runs import load, save_config, save_weights  # noqa: E402

MIXED_TEXT = "1: the cat sees  the moon.\n\tHello, wörld! 12345 x=3.14<|endoftext|>ünïcödé 日本語 😀  \n\n end"


def text_ids(tok, n_rows=3, length=48):
    """Token ids of held-out text of the kind the runs were trained on: (n_rows, length)."""
    ids = tok.encode(structured_text(60, seed=99))
    return torch.tensor([ids[i * length : (i + 1) * length] for i in range(n_rows)])


def transformers_model(path, model_cfg):
    """transformers' model for a GGUF file. Its GPT-2 reader puts the context length in n_ctx, not n_positions
    (the size of the position table), and ignores feed_forward_length: those two are passed in."""
    extra = {}
    if G.gguf_architecture(model_cfg) == "gpt2":
        extra = dict(n_positions=model_cfg.block_size, n_inner=model_cfg.ff_dim)
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, **extra).eval()


def make_run(path, small_tokenizer, seed=0, **model_fields):
    """A run directory with random weights for a model config (no training)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(**{"vocab_size": 384, "block_size": 64, "n_layer": 2, "n_head": 4, "d_model": 64, **model_fields})
    model = build_model(cfg)
    for p in model.parameters():  # larger weights than the default init: confident, distinct predictions
        torch.nn.init.normal_(p, std=0.1) if p.dim() > 1 else torch.nn.init.uniform_(p, 0.5, 1.5)
    path.mkdir(parents=True)
    small_tokenizer.save(path / "tokenizer.json")
    save_config(path, Config(model=cfg, train=TrainConfig()))
    save_weights(path / "model.safetensors", model)
    return path


LLAMA = dict(norm="rmsnorm", pos="rope", mlp="swiglu", bias=False, d_ff=96)


@pytest.mark.parametrize("which", ["tiny_run", "llama_run"])
def test_transformers_reads_the_file(which, request, tmp_path):
    run = request.getfixturevalue(which)
    model, tok = load(run)
    x = text_ids(tok)
    with torch.no_grad():
        ours = model(x)
    sizes = {}
    for dtype in G.DTYPES:
        path = G.to_gguf(run, tmp_path / f"model-{dtype}.gguf", dtype)
        sizes[dtype] = path.stat().st_size
        with torch.no_grad():
            theirs = transformers_model(path, model.config)(x).logits
        diff = (theirs - ours).abs().max().item()
        same_top1 = (theirs.argmax(-1) == ours.argmax(-1)).float().mean().item()
        if dtype == "f32":
            assert diff < 1e-4, diff
        elif dtype == "f16":
            assert diff < 2e-2 and same_top1 >= 0.99, (diff, same_top1)
        else:
            assert same_top1 >= 0.99, same_top1
    assert sizes["f32"] > sizes["f16"] > sizes["q8_0"]
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="model-f32.gguf")
    # lmforge encodes "<|endoftext|>" typed in text as characters; a GGUF reader may parse it as the control token
    # (its choice): asked to split special tokens, transformers' reader gives lmforge's ids
    assert hf_tok.encode(MIXED_TEXT, add_special_tokens=False, split_special_tokens=True) == tok.encode(MIXED_TEXT)
    plain = MIXED_TEXT.replace("<|endoftext|>", " ")
    assert hf_tok.encode(plain, add_special_tokens=False) == tok.encode(plain)
    assert hf_tok.encode("a<|endoftext|>b", add_special_tokens=False)[1] == tok.eos_id
    assert hf_tok.eos_token == tok.eos_token


def _tensor_names_known_to_gguf(path):
    """Every tensor name in the file is one gguf (llama.cpp's own table) lists for the file's architecture."""
    reader = gguf.GGUFReader(str(path))
    arch_name = reader.fields["general.architecture"].contents()
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    known = set()
    for t in gguf.MODEL_TENSORS[arch]:
        known |= {gguf.TENSOR_NAMES[t].format(bid=i) for i in range(8)}
    names = {t.name.rsplit(".", 1)[0] for t in reader.tensors}
    assert names <= known, names - known
    return reader


VARIANTS = {
    "llama-gqa-tied-padded-vocab": dict(LLAMA, n_kv_head=2, tie_embeddings=True),
    "llama-bias": dict(LLAMA, n_kv_head=1, bias=True, tie_embeddings=False),
    "llama-rope-linear": dict(LLAMA, rope_theta=5000.0, rope_scaling={"type": "linear", "factor": 2.0}),
    "llama-rope-llama3": dict(
        LLAMA,
        rope_scaling={
            "type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "mixtral": dict(
        LLAMA | {"d_ff": 32}, n_kv_head=2, moe_experts=4, moe_top_k=2, moe_d_ff=32, moe_capacity_factor=None
    ),
    "gpt2-untied-wide": dict(norm="layernorm", pos="learned", mlp="gelu_tanh", d_ff=96, tie_embeddings=False),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_round_trip_through_gguf(name, tmp_path, small_tokenizer):
    run = make_run(tmp_path / "run", small_tokenizer, **VARIANTS[name])
    model, tok = load(run)
    path = G.to_gguf(run, tmp_path / "model.gguf", "f32")
    reader = _tensor_names_known_to_gguf(path)
    back = G.from_gguf(path, tmp_path / "back")
    model2, tok2 = load(back)
    assert model2.config == model.config
    sd1, sd2 = model.state_dict(), model2.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert tok2.encode(MIXED_TEXT) == tok.encode(MIXED_TEXT) and tok2.eos_id == tok.eos_id
    if name.startswith("llama-gqa"):  # 384 model rows for 320 tokens: padding tokens fill the vocabulary
        tokens = reader.fields["tokenizer.ggml.tokens"].contents()
        assert len(tokens) == 384 and tokens[-1] == "[PAD383]"
        x = torch.randint(0, 384, (2, 40))
        with torch.no_grad():
            assert (transformers_model(path, model.config)(x).logits - model(x)).abs().max().item() < 1e-4


def test_rotary_permutation_is_llama_cpp_layout():
    """Head h, half-split row j goes to interleaved row 2j (first half) or 2(j - head_dim/2) + 1 (second half)."""
    n_heads, head_dim = 3, 8
    rows = torch.arange(n_heads * head_dim, dtype=torch.float32)[:, None]
    permuted = G.permute_rotary(rows, n_heads)[:, 0].long().tolist()
    for h in range(n_heads):
        for j in range(head_dim // 2):
            assert permuted[h * head_dim + 2 * j] == h * head_dim + j
            assert permuted[h * head_dim + 2 * j + 1] == h * head_dim + head_dim // 2 + j
    assert torch.equal(G.unpermute_rotary(G.permute_rotary(rows, n_heads), n_heads), rows)


def test_llama3_scaling_is_recovered_from_rope_freqs():
    """A foreign file carries Llama 3 scaling only as per-frequency divisors; the fit reproduces the frequencies."""
    rule = {
        "type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    cfg = ModelConfig(n_head=32, d_model=2048, pos="rope", rope_theta=500000.0, rope_scaling=rule)
    fitted = G._fit_llama3(G.rope_freq_factors(cfg), cfg.head_dim, cfg.rope_theta)
    want = rope_inv_freq(cfg.head_dim, cfg.rope_theta, rule)
    assert torch.allclose(rope_inv_freq(cfg.head_dim, cfg.rope_theta, fitted), want, rtol=1e-5)
    with pytest.raises(LmforgeError, match="does not look like llama3"):
        G._fit_llama3(torch.ones(cfg.head_dim // 2), cfg.head_dim, cfg.rope_theta)


def test_metadata_and_chat_template(tiny_run, tmp_path):
    run = tmp_path / "chat"
    run.mkdir()
    for f in ("config.json", "tokenizer.json", "model.safetensors"):
        (run / f).write_bytes((tiny_run / f).read_bytes())
    template = "{% for m in messages %}<|endoftext|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    (run / "chat_template.jinja").write_text(template)
    path = G.to_gguf(run, tmp_path / "chat.gguf", "q8_0")
    fields = gguf.GGUFReader(str(path)).fields
    value = lambda k: fields[k].contents()  # noqa: E731
    _, tok = load(run)
    assert value("general.architecture") == "gpt2" and value("gpt2.context_length") == 64
    assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.pre") == "gpt-2"
    assert value("tokenizer.ggml.eos_token_id") == tok.eos_id and value("tokenizer.ggml.add_bos_token") is False
    assert value("tokenizer.chat_template") == template
    assert value("general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.0.attn_qkv.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == types["position_embd.weight"] == gguf.GGMLQuantizationType.F32
    back = G.from_gguf(path, tmp_path / "back")
    assert (back / "chat_template.jinja").read_text() == template


def test_cli_convert_to_and_from_gguf(tiny_run, tmp_path, capsys):
    out = tmp_path / "tiny.gguf"
    code, stdout, err = run_cli(capsys, "convert", "--to-gguf", tiny_run, "--out", out)
    assert code == 0, err
    assert gguf.GGUFReader(str(out)).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_F16
    code, stdout, err = run_cli(capsys, "convert", "--from-gguf", out, "--out", tmp_path / "back")
    assert code == 0, err
    code, stdout, err = run_cli(
        capsys, "generate", tmp_path / "back", "--prompt", "1: the", "--max-new-tokens", 5, "--greedy"
    )
    assert code == 0 and stdout.startswith("1: the")
    code, _, err = run_cli(capsys, "convert", "--from-gguf", tmp_path / "missing.gguf", "--out", tmp_path / "x")
    assert code == 1 and "GGUF file not found" in err
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    code, _, err = run_cli(capsys, "convert", "--from-gguf", tmp_path / "junk.gguf", "--out", tmp_path / "y")
    assert code == 1 and "cannot read" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(qk_norm=True), "qk_norm"),
        (dict(attn_softcap=50.0), "softcapping"),
        (dict(LLAMA, sliding_window=8), "sliding_window=8"),
        (dict(mlp="gelu"), "mlp=gelu"),
        (dict(LLAMA, moe_experts=4, moe_shared_expert=True), "moe_shared_expert"),
        (dict(LLAMA, rope_scaling={"type": "ntk", "factor": 2.0}), "rope scaling 'ntk'"),
        (dict(norm="rmsnorm"), "norm=rmsnorm, pos=learned"),
        (dict(LLAMA, value_residual=True), "value_residual"),
    ],
)
def test_unsupported_models_leave_no_file(fields, message, tmp_path, small_tokenizer, capsys):
    run = make_run(tmp_path / "run", small_tokenizer, **fields)
    code, _, err = run_cli(capsys, "convert", "--to-gguf", run, "--out", tmp_path / "out" / "m.gguf")
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "cannot export to GGUF: unsupported" in err and message in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_bad_dtype_and_existing_run(tiny_run, tmp_path, capsys):
    with pytest.raises(LmforgeError, match="unknown GGUF dtype 'q4_0'"):
        G.to_gguf(tiny_run, tmp_path / "m.gguf", "q4_0")
    path = G.to_gguf(tiny_run, tmp_path / "m.gguf", "f32")
    code, _, err = run_cli(capsys, "convert", "--from-gguf", path, "--out", tiny_run)
    assert code == 1 and "already holds a model" in err


@pytest.mark.slow
def test_llama_cpp_greedy_tokens_match(llama_run, tmp_path):
    """llama-cpp-python (llama.cpp itself) runs the exported file and decodes the same greedy tokens."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model, tok = load(llama_run)
    path = G.to_gguf(llama_run, tmp_path / "m.gguf", "f32")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, verbose=False, logits_all=False)
    prompt = tok.encode("1: the cat sees")
    theirs = []
    for t in llm.generate(prompt, temp=0.0, top_k=1):
        theirs.append(t)
        if len(theirs) == 12:
            break
    from lmforge.inference.engine import generate_tokens

    ours = list(generate_tokens(model, prompt, 12, temperature=0.0, eos_id=None))
    assert theirs == ours
