"""What a new user trips on ends in one clear line: absurd sizes, unknown names, paths the OS refuses."""

import errno
import shutil
from pathlib import Path

import pytest
from conftest import TINY_ARGS, run_cli

from lmforge import config as C
from lmforge.data import corpus
from lmforge.errors import LmforgeError

OLD_RUN = Path(__file__).parent / "data" / "run-4ad76cb" / "run"  # a small run directory to edit


def one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


# --- sizes no machine can hold ------------------------------------------------------------------

ABSURD = {
    "n_layer": ('"n_layer": 1000000', "fp32 weights"),
    "d_model": ('"d_model": 1048576', "fp32 weights"),
    "vocab_size": ('"vocab_size": 1000000000000', "fp32 weights"),
    "block_size": ('"block_size": 1000000000000', "block_size"),
    "Infinity": ('"n_layer": Infinity', "must be int"),
    "1e400": ('"d_model": 1e400', "must be int"),
    "NaN": ('"norm_eps": NaN', "must be a finite float"),
}


@pytest.mark.parametrize("case", list(ABSURD))
def test_absurd_config_json_is_refused_before_building(case, tmp_path, capsys, monkeypatch):
    run = shutil.copytree(OLD_RUN, tmp_path / "run")
    field, expected = ABSURD[case]
    text = (run / "config.json").read_text()
    key = field.split(":")[0]
    start = text.index(key)
    end = text.index(",", start)
    (run / "config.json").write_text(text[:start] + field + text[end:])

    import lmforge.runs

    def no_building(*a, **k):
        raise AssertionError("a model was built from an invalid config")

    monkeypatch.setattr(lmforge.runs, "build_model", no_building)
    code, out, err = run_cli(capsys, "generate", run, "--prompt", "x", "--max-new-tokens", 2)
    assert code == 1 and expected in one_line(err), err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--n_layer", "1e400"], "must be int, got '1e400'"),
        (["--n_layer", "inf"], "must be int"),
        (["--lr", "inf"], "must be a finite float"),
        (["--lr", "nan"], "must be a finite float"),
        (["--vocab_size", "1e12"], "fp32 weights"),
        (["--d_model", str(2**20)], "fp32 weights"),
        (["--seq_len", "1e12"], "seq_len must be in"),
    ],
)
def test_absurd_sizes_on_the_command_line(argv, expected, tmp_path, capsys):
    code, out, err = run_cli(capsys, "train", "--out", tmp_path / "r", *argv)
    assert code == 1 and expected in one_line(err)
    assert not (tmp_path / "r").exists()


def test_config_files_with_non_finite_numbers(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("[train]\nlr = inf\n")
    with pytest.raises(LmforgeError, match="finite"):
        C.merge(C.preset("tiny"), C.load_file(toml))
    js = tmp_path / "c.json"
    js.write_text('{"model": {"n_layer": 1e400}}')
    with pytest.raises(LmforgeError, match="must be int"):
        C.merge(C.preset("tiny"), C.load_file(js))


def test_footprint_estimate_and_real_presets_pass():
    """The closed-form parameter count is the model's (within norms and biases), and every preset fits."""
    import torch

    from lmforge.models import build_model

    for family, table in (("decoder", C.PRESETS), ("seq2seq", C.SEQ2SEQ_PRESETS)):
        for name in table:
            cfg = C.preset(name, family)
            cfg.validate()
            with torch.device("meta"):
                real = build_model(cfg.model).num_params()
            assert abs(cfg.model.param_estimate() - real) / real < 0.01, name


# --- names that do not exist ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, suggestion",
    [
        (["train", "--learning-rate", "1e-3"], "did you mean --lr?"),
        (["train", "--max_step", "3"], "--max_steps"),
        (["train", "--n_embd", "64"], "--d_model"),
        (["train", "--resum", "runs/x"], "--resume"),
        (["train", "--preset", "tinny"], "did you mean tiny?"),
    ],
)
def test_unknown_names_get_did_you_mean(argv, suggestion, capsys):
    code, out, err = run_cli(capsys, *argv)
    assert code == 1 and suggestion in one_line(err)


def test_unknown_option_of_other_verbs_gets_did_you_mean(capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(capsys, "generate", "runs/x", "--max-tokens", "5")
    assert e.value.code == 2
    assert "did you mean --max-new-tokens?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_cli(capsys, "tokenizer", "train", "data", "--vocab_size", "300")
    assert "--vocab-size" in capsys.readouterr().err


def test_unknown_preset_lists_both_families(capsys):
    code, out, err = run_cli(capsys, "train", "--preset", "huge")
    line = one_line(err)
    assert "llama-tiny" in line and "seq2seq-tiny" in line and "transformer-base" in line
    code, out, err = run_cli(capsys, "train", "--preset", "seq2seq-tiny")
    assert code == 1 and "use it with --task seq2seq" in one_line(err)


# --- paths the OS refuses -------------------------------------------------------------------------


def test_os_errors_on_user_paths_are_one_line(tmp_path, capsys, corpus_dir, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    code, out, err = run_cli(capsys, "tokenizer", "train", corpus_dir, "--vocab-size", 300, "--out", a_file / "t.json")
    assert code == 1 and str(a_file) in one_line(err)  # "File exists" or "Not a directory", as the OS says

    import lmforge.io

    for number, words in ((errno.EROFS, "read-only"), (errno.ENOSPC, "disk is full"), (errno.EACCES, "denied")):

        def refuse(*args, number=number, **kw):
            raise OSError(number, __import__("os").strerror(number), kw.get("dir"))

        monkeypatch.setattr(lmforge.io.tempfile, "mkstemp", refuse)
        out_path = tmp_path / "run-dir" / "t.json"
        code, out, err = run_cli(capsys, "tokenizer", "train", corpus_dir, "--vocab-size", 300, "--out", out_path)
        line = one_line(err)
        assert code == 1 and words in line.lower() and str(out_path) in line, line


def test_programming_errors_still_raise(tmp_path, capsys, corpus_dir, monkeypatch):
    import lmforge.io

    def bug(*a, **k):
        raise OSError("an OSError with no errno is not the user's")

    monkeypatch.setattr(lmforge.io.tempfile, "mkstemp", bug)
    with pytest.raises(OSError, match="not the user's"):
        run_cli(capsys, "tokenizer", "train", corpus_dir, "--vocab-size", 300, "--out", tmp_path / "t.json")


# --- runs, vocabularies, the default corpus ---------------------------------------------------------


def test_run_from_a_config_file_is_named_after_it(tmp_path, capsys, corpus_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "small-llama.toml").write_text('[model]\nnorm = "rmsnorm"\nmlp = "swiglu"\npos = "rope"\n')
    code, out, err = run_cli(
        capsys, "train", corpus_dir, "--config", "small-llama.toml", "--max-steps", 1, "--sample_tokens", 0, *TINY_ARGS
    )
    assert code == 0, err
    assert (tmp_path / "runs" / "small-llama" / "config.json").is_file()
    assert not (tmp_path / "runs" / "tiny").exists()


def test_small_corpus_warns_about_a_small_vocabulary(tmp_path, capsys, corpus_dir):
    code, out, err = run_cli(capsys, "tokenizer", "train", corpus_dir, "--vocab-size", 8000, "--out", tmp_path / "t")
    assert code == 0
    tokens = int(out.split("tokenizer: ")[1].split(" tokens")[0])
    assert tokens < 8000 * 0.9
    assert f"asked for a 8,000-token vocabulary, got {tokens:,}" in err

    from lmforge.data.prepare import ensure_data

    logged = []
    cfg = C.TrainConfig(tokenizer_vocab_size=8000, val_fraction=0.1)
    for _ in range(2):  # training the tokenizer, then reusing it from the cache
        ensure_data(corpus_dir, cfg, tmp_path / "cache", log=logged.append)
        assert sum("warning: asked for a 8,000-token vocabulary" in line for line in logged) == 1
        logged.clear()
    code, out, err = run_cli(capsys, "tokenizer", "train", corpus_dir, "--vocab-size", 300, "--out", tmp_path / "t")
    assert "warning" not in err  # got what it asked for


def test_default_corpus_leaves_out_filler(tmp_path):
    files = {str(p).replace("\\", "/") for p in corpus.stdlib_files()}
    assert not any(f.endswith("encodings/cp1252.py") or f.endswith("pydoc_data/topics.py") for f in files)
    assert any(f.endswith("encodings/utf_8.py") for f in files)  # real codec code stays
    assert any(f.endswith("/os.py") for f in files)
    cases = {
        "generated.py": ("# Auto-generated by Tools/make.py\nX = 1\n", True),
        "table.py": ('"""Codec."""\ndecoding_table = (\n    "\\x00"\n)\n', True),
        "data.py": ("DATA = {\n" + "".join(f"    'k{i}': {i},\n" for i in range(400)) + "}\n", True),
        "code.py": ("def f(x):\n    return x\n" * 300, False),
        "docs.py": ('"""A module that explains how tables are generated by a tool."""\nimport os\n', False),
    }
    for name, (text, filler) in cases.items():
        (tmp_path / name).write_text(text)
        assert corpus.is_filler(tmp_path / name) == filler, name


@pytest.mark.parametrize(
    "device, expected",
    [
        ("foo", "unknown device 'foo'"),
        ("cuda", "CUDA is not available"),
        ("meta", "not supported by lmforge|unknown device 'meta'"),  # the train config's own check says the latter
    ],
)
def test_a_device_this_machine_cannot_use_is_one_line(device, expected, tmp_path, capsys, monkeypatch):
    """--device reaches torch only through machine.pick_device: a name torch does not know, or a device this
    machine lacks, is one line, for every verb that loads a run (generate, eval, serve) or trains one."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a GPU machine
    run = shutil.copytree(OLD_RUN, tmp_path / "run")
    for argv in (
        ["generate", run, "--prompt", "x", "--max-new-tokens", 2],
        ["train", *TINY_ARGS, "--out", tmp_path / "t"],
    ):
        code, out, err = run_cli(capsys, *argv, "--device", device)
        assert code == 1 and any(e in one_line(err) for e in expected.split("|")), err
