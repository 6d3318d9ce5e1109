"""Hugging Face parity: reference models are built from configs with random weights, offline."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import run_cli  # noqa: E402

from lmforge.errors import LmforgeError  # noqa: E402
from lmforge.inference.engine import generate_tokens  # noqa: E402
from lmforge.interop import hf as interop  # noqa: E402
from lmforge.runs import load  # noqa: E402

VOCAB = 384  # >= the test tokenizer's 320 tokens


def gpt2_reference(**kw):
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=64,
        n_layer=2,
        n_head=4,
        initializer_range=0.1,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        **kw,
    )
    return transformers.GPT2LMHeadModel(cfg)


def llama_reference(**kw):
    args = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.1,
        rms_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=0,
    )
    args.update(kw)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**args))


def mixtral_reference(**kw):
    args = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        initializer_range=0.1,
        rms_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=0,
    )
    args.update(kw)
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(**args))


REFERENCES = {
    "gpt2": lambda: gpt2_reference(),
    "gpt2-untied-gelu": lambda: gpt2_reference(tie_word_embeddings=False, activation_function="gelu", n_inner=96),
    "llama-gqa": lambda: llama_reference(),
    "llama-mqa-tied-bias": lambda: llama_reference(
        num_key_value_heads=1, tie_word_embeddings=True, attention_bias=True, mlp_bias=True
    ),
    "llama-rope-linear": lambda: llama_reference(
        rope_scaling={"rope_type": "linear", "factor": 2.0}, rope_theta=5000.0
    ),
    "llama-rope-llama3": lambda: llama_reference(
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        }
    ),
    "mixtral": lambda: mixtral_reference(),
    "mixtral-window-top3-tied": lambda: mixtral_reference(
        sliding_window=7,
        num_local_experts=6,
        num_experts_per_tok=3,
        num_key_value_heads=1,
        tie_word_embeddings=True,
        rope_theta=5000.0,
    ),
}


def save_reference(model, path, small_tokenizer, safe=True):
    model.eval()
    model.save_pretrained(path)
    if not safe:  # the older pytorch_model.bin layout (recent transformers only write safetensors)
        from safetensors.torch import load_file

        (st,) = path.glob("*.safetensors")
        torch.save(load_file(st), path / "pytorch_model.bin")
        st.unlink()
    small_tokenizer.save(path / "tokenizer.json")
    return path


@pytest.mark.parametrize("name", list(REFERENCES))
def test_logits_match_transformers(name, tmp_path, small_tokenizer):
    torch.manual_seed(0)
    ref = REFERENCES[name]().eval()
    save_reference(ref, tmp_path / "hf", small_tokenizer)
    run = interop.from_hf(tmp_path / "hf", tmp_path / "run")
    model, tok = load(run)
    assert tok.vocab_size == small_tokenizer.vocab_size

    x = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(x).logits
        got = model(x)
    assert (got - want).abs().max().item() < 1e-4

    # step-by-step cached decoding agrees with the reference's full forward at every position
    cache = model.new_cache(3, 40)
    with torch.no_grad():
        steps = [model(x[:, :8], cache)] + [model(x[:, t : t + 1], cache) for t in range(8, 40)]
    assert (torch.cat(steps, 1) - want).abs().max().item() < 1e-4

    # greedy generation is identical token for token (reference uses its own cache)
    prompt = x[0, :10]
    ref.generation_config.eos_token_id = None  # run the full length on both sides
    with torch.no_grad():
        theirs = ref.generate(prompt[None], max_new_tokens=24, do_sample=False, pad_token_id=0)[0, 10:].tolist()
    assert len(theirs) == 24
    ours = list(generate_tokens(model, prompt.tolist(), 24, temperature=0.0, eos_id=None))
    assert ours == theirs


def test_bin_weights_are_read_without_pickle(tmp_path, small_tokenizer):
    ref = gpt2_reference().eval()
    save_reference(ref, tmp_path / "hf", small_tokenizer, safe=False)
    assert list((tmp_path / "hf").glob("*.bin")) and not list((tmp_path / "hf").glob("*.safetensors"))
    model, _ = load(interop.from_hf(tmp_path / "hf", tmp_path / "run"))
    x = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        assert (model(x) - ref(x).logits).abs().max().item() < 1e-4


@pytest.mark.parametrize(
    "name", ["gpt2", "llama-rope-llama3", "llama-mqa-tied-bias", "mixtral", "mixtral-window-top3-tied"]
)
def test_round_trip_is_bit_identical(name, tmp_path, small_tokenizer):
    torch.manual_seed(0)
    save_reference(REFERENCES[name](), tmp_path / "hf", small_tokenizer)
    run1 = interop.from_hf(tmp_path / "hf", tmp_path / "run1")
    hf2 = interop.to_hf(run1, tmp_path / "hf2")
    run2 = interop.from_hf(hf2, tmp_path / "run2")
    m1, _ = load(run1)
    m2, _ = load(run2)
    sd1, sd2 = m1.state_dict(), m2.state_dict()
    assert sd1.keys() == sd2.keys()
    for k in sd1:
        assert torch.equal(sd1[k], sd2[k]), k
    # and transformers loads the exported folder and agrees with lmforge
    ref2 = transformers.AutoModelForCausalLM.from_pretrained(hf2).eval()
    x = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        assert (ref2(x).logits - m1(x)).abs().max().item() < 1e-4
    tok2 = transformers.AutoTokenizer.from_pretrained(hf2)
    assert tok2.encode("the cat sees the moon") == load(run1)[1].encode("the cat sees the moon")


def test_unsupported_models_give_clear_errors(tmp_path, small_tokenizer, capsys):
    d = tmp_path / "bert"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    code, _, err = run_cli(capsys, "convert", "--from-hf", d, "--out", tmp_path / "r")
    assert code == 1 and "unsupported Hugging Face model: architecture BertForMaskedLM" in err
    g = save_reference(gpt2_reference(activation_function="relu"), tmp_path / "relu", small_tokenizer)
    with pytest.raises(LmforgeError, match="activation_function 'relu'"):
        interop.from_hf(g, tmp_path / "r2")
    ll = save_reference(
        llama_reference(rope_scaling={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32}),
        tmp_path / "yarn",
        small_tokenizer,
    )
    with pytest.raises(LmforgeError, match="rope scaling type 'yarn'"):
        interop.from_hf(ll, tmp_path / "r3")
    code, _, err = run_cli(capsys, "convert", "--from-hf", tmp_path / "missing", "--out", tmp_path / "r4")
    assert code == 1 and "not found" in err


@pytest.mark.parametrize("option", ["qk_norm", "value_residual"])
def test_export_rejects_options_hf_cannot_express(option, tiny_run, tmp_path, capsys):
    cfg = json.loads((tiny_run / "config.json").read_text())
    cfg["model"][option] = True
    run = tmp_path / option
    run.mkdir()
    (run / "config.json").write_text(json.dumps(cfg))
    for f in ("tokenizer.json", "model.safetensors"):
        (run / f).write_bytes((tiny_run / f).read_bytes())
    code, _, err = run_cli(capsys, "convert", "--to-hf", run, "--out", tmp_path / "hf")
    assert code == 1 and f"unsupported {option}" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "hf").exists()


def test_cli_convert_round_trip(tiny_run, tmp_path, capsys):
    code, out, err = run_cli(capsys, "convert", "--to-hf", tiny_run, "--out", tmp_path / "hf")
    assert code == 0, err
    code, out, err = run_cli(capsys, "convert", "--from-hf", tmp_path / "hf", "--out", tmp_path / "back")
    assert code == 0, err
    code, out, err = run_cli(
        capsys, "generate", tmp_path / "back", "--prompt", "1: the", "--max-new-tokens", 5, "--greedy"
    )
    assert code == 0 and out.startswith("1: the")


def test_mixtral_fused_expert_layout_is_read(tmp_path, small_tokenizer):
    """transformers 5 holds experts as fused 3-D tensors (mlp.experts.gate_up_proj / down_proj); a checkpoint in
    that layout loads too."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    ref = mixtral_reference().eval()
    hf = save_reference(ref, tmp_path / "hf", small_tokenizer)
    (st,) = hf.glob("*.safetensors")
    fused = {k: v.contiguous() for k, v in ref.state_dict().items()}  # the in-memory (fused) names
    assert "model.layers.0.mlp.experts.gate_up_proj" in fused and not any("block_sparse_moe" in k for k in fused)
    save_file(fused, str(st))
    model, _ = load(interop.from_hf(hf, tmp_path / "run"))
    x = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        assert (model(x) - ref(x).logits).abs().max().item() < 1e-4
    # and a wrongly shaped fused tensor is a clear error
    fused["model.layers.1.mlp.experts.down_proj"] = fused["model.layers.1.mlp.experts.down_proj"][:, :, :5].contiguous()
    save_file(fused, str(st))
    with pytest.raises(LmforgeError, match="expert tensors of layer 1 have shapes"):
        interop.from_hf(hf, tmp_path / "run2")


def test_mixtral_config_mapping(tmp_path, small_tokenizer):
    torch.manual_seed(0)
    ref = mixtral_reference(router_aux_loss_coef=0.02, router_jitter_noise=0.01, sliding_window=16)
    run = interop.from_hf(save_reference(ref, tmp_path / "hf", small_tokenizer), tmp_path / "run")
    cfg = load(run)[0].config
    assert (cfg.moe_experts, cfg.moe_top_k, cfg.moe_d_ff, cfg.moe_every, cfg.moe_capacity_factor) == (4, 2, 48, 1, None)
    assert cfg.moe_renormalize and not cfg.moe_shared_expert and cfg.sliding_window == 16 and cfg.rope_theta == 1e6
    # transformers' balance loss is top_k times ours: the same penalty needs top_k times the coefficient
    assert cfg.moe_aux_loss_coef == pytest.approx(0.04) and cfg.moe_jitter == 0.01 and cfg.moe_z_loss_coef == 0.0
    back = json.loads((interop.to_hf(run, tmp_path / "hf2") / "config.json").read_text())
    assert back["router_aux_loss_coef"] == pytest.approx(0.02) and back["sliding_window"] == 16
    assert back["architectures"] == ["MixtralForCausalLM"] and back["num_local_experts"] == 4


def test_exported_folder_works_with_no_extra_arguments(tiny_run, tmp_path, capsys):
    """AutoTokenizer, AutoModelForCausalLM and pipeline("text-generation") take the folder as it is; greedy text
    from the pipeline equals `lmforge generate --greedy`."""
    run = tmp_path / "run"
    run.mkdir()
    for f in ("config.json", "tokenizer.json", "model.safetensors"):
        (run / f).write_bytes((tiny_run / f).read_bytes())
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    (run / "chat_template.jinja").write_text(template)
    hf_dir = interop.to_hf(run, tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ours = load(run)[1]
    assert tok.eos_token == ours.eos_token and tok.pad_token_id == ours.eos_id and tok.model_max_length == 64
    text = "1: the cat sees  the moon.\n\t<|endoftext|>ünï 42"
    assert tok.encode(text) == ours.encode(text) and tok.decode(tok.encode(text)) == text
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "user: hi\nassistant:"
    gen = transformers.GenerationConfig.from_pretrained(hf_dir)
    assert gen.eos_token_id == ours.eos_id and gen.max_length == 64

    pipe = transformers.pipeline("text-generation", model=str(hf_dir), device="cpu")
    for prompt in ("1: the", "4: a child likes"):
        theirs = pipe(prompt, max_new_tokens=20, do_sample=False)[0]["generated_text"]
        code, out, err = run_cli(capsys, "generate", run, "--prompt", prompt, "--max-new-tokens", 20, "--greedy")
        assert code == 0, err
        assert out == theirs + "\n"
    # and the chat template comes back on import
    back = interop.from_hf(hf_dir, tmp_path / "back")
    assert (back / "chat_template.jinja").read_text() == template
