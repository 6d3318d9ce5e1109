"""Every verb end to end on tiny data, and the bad-input cases: one error line, non-zero exit, nothing half-written."""

import json
import subprocess
import sys

from conftest import TINY_ARGS, run_cli

from lmforge.data.shards import read_shard


def test_tokenizer_prepare_train_generate_eval(tmp_path, capsys, corpus_dir):
    tok = tmp_path / "tok.json"
    code, out, err = run_cli(capsys, "tokenizer", "train", corpus_dir, "--vocab-size", 300, "--out", tok)
    assert code == 0 and tok.is_file(), err
    shards = tmp_path / "shards"
    code, out, err = run_cli(capsys, "prepare", corpus_dir, "--tokenizer", tok, "--out", shards)
    assert code == 0, err
    assert len(read_shard(shards / "train_0000.bin")) > 1000 and len(read_shard(shards / "val_0000.bin")) > 0
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", shards, "--out", run, "--max-steps", 12, *TINY_ARGS)
    assert code == 0, err
    assert "eval step 12" in out and "sample:" in out
    for f in (
        "config.json",
        "tokenizer.json",
        "model.safetensors",
        "metrics.jsonl",
        "checkpoints/step_0000012/trainer_state.pt",
    ):
        assert (run / f).is_file(), f
    code, out, err = run_cli(capsys, "generate", run, "--prompt", "3: the cat", "--max-new-tokens", 20, "--seed", 1)
    assert code == 0 and out.startswith("3: the cat"), err
    code, out2, _ = run_cli(capsys, "generate", run, "--prompt", "3: the cat", "--max-new-tokens", 20, "--seed", 1)
    assert out2 == out  # same seed, same text
    code, out, err = run_cli(capsys, "eval", run, "--data", corpus_dir / "part0.txt")
    assert code == 0, err
    assert "perplexity" in out and "bits/byte" in out


def test_train_default_corpus_path_is_used(tmp_path, capsys, monkeypatch, corpus_dir):
    """With no DATA, train uses the standard library (here a 1-step run with a small tokenizer)."""
    import lmforge.data.corpus as data

    small = sorted(data.stdlib_files(), key=lambda p: p.stat().st_size)[:40]
    monkeypatch.setattr(data, "stdlib_files", lambda: small)
    code, out, err = run_cli(capsys, "train", "--out", tmp_path / "r", "--max-steps", 2, *TINY_ARGS)
    assert code == 0, err
    assert "Python standard library" in out


def test_generate_prompt_too_long_is_truncated(tiny_run, capsys):
    code, out, err = run_cli(
        capsys, "generate", tiny_run, "--prompt", "the cat sees the moon. " * 80, "--max-new-tokens", 5, "--greedy"
    )
    assert code == 0
    assert "warning: prompt" in err


def test_generate_interactive(tiny_run):
    r = subprocess.run(
        [sys.executable, "-m", "lmforge.cli", "generate", str(tiny_run), "--max-new-tokens", "5", "--greedy"],
        input="1: a dog\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("> 1: a dog")


def test_presets(capsys):
    code, out, _ = run_cli(capsys, "presets")
    assert code == 0
    for name in ("tiny", "gpt2", "gpt2-medium", "llama-small", "llama-tiny"):
        assert name in out
    assert "124.4M" in out or "124.5M" in out


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_bad_inputs(tmp_path, capsys, tiny_run, corpus_dir):
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    blank = tmp_path / "blank.txt"
    blank.write_text("   \n\n")
    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "x.dat").write_bytes(b"\x00\xff\x00")
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("[model]\nn_layers = 3\n")
    wrong_type = tmp_path / "wrong.toml"
    wrong_type.write_text("[model]\nn_layer = 'three'\n")
    tok = tmp_path / "tok.json"
    assert run_cli(capsys, "tokenizer", "train", corpus_dir, "--vocab-size", 300, "--out", tok)[0] == 0

    cases = [
        (["train", tmp_path / "missing", "--out", tmp_path / "o1"], "not found"),
        (["train", empty_dir, "--out", tmp_path / "o2"], "no files"),
        (["train", blank, "--out", tmp_path / "o3", "--max-steps", 1], "no usable text"),
        (["tokenizer", "train", binary, "--out", tmp_path / "t.json"], "no usable text"),
        (["tokenizer", "train", corpus_dir, "--vocab-size", 100, "--out", tmp_path / "t.json"], "too small"),
        (["train", "--preset", "huge"], "unknown preset"),
        (["train", "--n_layerz", 3], "unknown option"),
        (["train", "--config", bad_toml], "unknown model config key"),
        (["train", "--config", wrong_type], "must be int"),
        (["train", "--n_layer", "abc"], "must be int"),
        (["train", "--config", tmp_path / "nope.toml"], "not found"),
        (["prepare", blank, "--tokenizer", tok, "--out", tmp_path / "p"], "no usable text"),
        (["prepare", corpus_dir, "--tokenizer", tmp_path / "nope.json", "--out", tmp_path / "p2"], "not found"),
        (["generate", tmp_path / "norun", "--prompt", "x"], "not found"),
        (["generate", empty_dir, "--prompt", "x"], "not a run directory"),
        (["eval", tiny_run, "--data", tmp_path / "missing.txt"], "not found"),
        (["train", corpus_dir, "--out", tiny_run, *TINY_ARGS], "already holds"),
    ]
    for argv, expected in cases:
        code, out, err = run_cli(capsys, *argv)
        line = one_error_line(err)
        assert code != 0 and expected in line, (argv, err)
    assert not (tmp_path / "t.json").exists()


def _copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_corrupt_run_directories(tmp_path, capsys, tiny_run):
    truncated = _copy_run(tiny_run, tmp_path / "trunc")
    w = truncated / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    garbage_cfg = _copy_run(tiny_run, tmp_path / "cfg")
    (garbage_cfg / "config.json").write_text("{not json")
    no_tok = _copy_run(tiny_run, tmp_path / "notok")
    (no_tok / "tokenizer.json").unlink()
    bad_tok = _copy_run(tiny_run, tmp_path / "badtok")
    (bad_tok / "tokenizer.json").write_text("[]")
    small_vocab = _copy_run(tiny_run, tmp_path / "smallvocab")
    cfg = json.loads((small_vocab / "config.json").read_text())
    cfg["model"]["vocab_size"] = 100
    (small_vocab / "config.json").write_text(json.dumps(cfg))
    bad_state = _copy_run(tiny_run, tmp_path / "badstate")
    for ckpt in (bad_state / "checkpoints").glob("step_*"):
        (ckpt / "trainer_state.pt").write_bytes(b"garbage")
    for run, expected in [
        (truncated, "corrupt"),
        (garbage_cfg, "corrupt"),
        (no_tok, "not found"),
        (bad_tok, "cannot read tokenizer"),
        (small_vocab, "has 320 tokens but the model"),
    ]:
        code, _, err = run_cli(capsys, "generate", run, "--prompt", "x")
        assert code != 0 and expected in one_error_line(err), (run, err)
    code, _, err = run_cli(capsys, "train", "--resume", bad_state)
    assert code != 0 and "every checkpoint" in err.strip().splitlines()[-1]
    assert "Traceback" not in err


def test_shard_vocab_mismatch_and_corrupt_shard(tmp_path, capsys, corpus_dir):
    tok = tmp_path / "tok.json"
    run_cli(capsys, "tokenizer", "train", corpus_dir, "--vocab-size", 300, "--out", tok)
    shards = tmp_path / "shards"
    run_cli(capsys, "prepare", corpus_dir, "--tokenizer", tok, "--out", shards)
    f = shards / "train_0000.bin"
    f.write_bytes(f.read_bytes()[:-7])
    code, _, err = run_cli(capsys, "train", shards, "--out", tmp_path / "r", "--max-steps", 1, *TINY_ARGS)
    assert code != 0 and "truncated" in one_error_line(err)
