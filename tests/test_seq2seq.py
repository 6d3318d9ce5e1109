"""Seq2seq training through the shared loop, learning a demo task, resume, evaluation, and the CLI end to end."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import run_cli
from test_cli import one_error_line

from lmforge import config as C
from lmforge.data import pairs
from lmforge.evaluation.seq2seq import evaluate_pairs
from lmforge.inference.beam import translate
from lmforge.models import Seq2SeqTransformer
from lmforge.models.loss import seq2seq_loss
from lmforge.runs import load
from lmforge.train.loop import train

quiet = lambda *_: None  # noqa: E731

# A very small model for tests that only need the machinery to run.
TINY_S2S_ARGS = [
    "--n_encoder_layer",
    "1",
    "--n_decoder_layer",
    "1",
    "--n_head",
    "2",
    "--d_model",
    "32",
    "--d_ff",
    "64",
    "--max_len",
    "32",
    "--batch_size",
    "16",
    "--tokenizer_vocab_size",
    "300",
    "--eval_interval",
    "4",
    "--eval_batches",
    "1",
    "--log_interval",
    "2",
    "--warmup_steps",
    "2",
    "--device",
    "cpu",
]


def small_config(**train_kw) -> C.Config:
    cfg = C.preset("seq2seq-tiny", "seq2seq")
    cfg.model = C.Seq2SeqConfig(
        n_encoder_layer=1, n_decoder_layer=1, n_head=2, d_model=32, d_ff=64, max_len=32, dropout=0.0
    )
    kw = dict(
        batch_size=16,
        lr=3e-3,
        warmup_steps=2,
        eval_interval=1000,
        eval_batches=1,
        log_interval=1,
        sample_tokens=0,
        tokenizer_vocab_size=300,
        max_time=None,
        device="cpu",
    )
    kw.update(train_kw)
    cfg.train = C.TrainConfig(**{**C.dataclasses.asdict(cfg.train), **kw})
    return cfg


def write_pairs(path, data):
    path.write_text("".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in data), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("pairs") / "rev.jsonl", pairs.demo("reverse").pairs("train")[:3000])


def test_resume_continues_exactly(tmp_path, pairs_file):
    cfg = lambda: small_config(max_steps=12, eval_interval=6)  # noqa: E731
    train(cfg(), tmp_path / "full", data=pairs_file, log=quiet)
    r1 = train(cfg(), tmp_path / "part", data=pairs_file, stop_after_steps=6, log=quiet)
    assert r1.interrupted and r1.step == 6
    r2 = train(None, tmp_path / "part", resume=True, log=quiet)
    assert r2.step == 12 and not r2.interrupted

    def losses(run):
        return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    assert len(losses(tmp_path / "full")) == 12 and losses(tmp_path / "part") == losses(tmp_path / "full")
    m1, _ = load(tmp_path / "full")
    m2, _ = load(tmp_path / "part")
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    # resuming checks the data file is the one the run started with
    with open(pairs_file, "a") as f:
        f.write(json.dumps({"source": "a", "target": "a"}) + "\n")
    with pytest.raises(C.LmforgeError, match="changed since the run started"):
        train(None, tmp_path / "part", resume=True, log=quiet)


def test_loss_ignores_padding_and_label_smoothing_raises_it(tmp_path, pairs_file):
    model = Seq2SeqTransformer(
        C.Seq2SeqConfig(
            src_vocab_size=320,
            tgt_vocab_size=320,
            n_encoder_layer=1,
            n_decoder_layer=1,
            n_head=2,
            d_model=32,
            d_ff=64,
            max_len=32,
            dropout=0.0,
        )
    ).eval()
    tok = pairs.PairTokenizer.train(pairs.read_pairs(pairs_file), 300)
    data = [("a b c d e f g h", "h g f e d c b a"), ("q r", "r q")]
    src, tgt, _ = pairs.encode_pairs(data, tok, 32)
    with torch.no_grad():
        together = seq2seq_loss(model, pairs.collate(src, tgt, tok), reduction="sum")
        alone = sum(seq2seq_loss(model, pairs.collate([s], [t], tok), reduction="sum") for s, t in zip(src, tgt))
        torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-5)
        # label smoothing eps: (1 - eps) * NLL + eps * mean over the vocabulary of -log p, at real positions only
        b = pairs.collate(src, tgt, tok)
        log_p = model(b.src, b.tgt_in, b.src_mask, b.tgt_mask).log_softmax(-1)[b.tgt_mask]
        nll = -log_p.gather(1, b.labels[b.tgt_mask][:, None]).mean()
        expected = 0.9 * nll + 0.1 * -log_p.mean()
        torch.testing.assert_close(seq2seq_loss(model, b, label_smoothing=0.1), expected, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def learned_run(tmp_path_factory):
    """The dates demo, trained for a fixed 200 steps with a small model (about 10 s on 2 cores)."""
    cfg = C.preset("seq2seq-tiny", "seq2seq")
    cfg = C.merge(
        cfg,
        {
            "model": dict(n_encoder_layer=2, n_decoder_layer=2, d_model=64, d_ff=256),
            "train": dict(
                max_steps=200,
                max_time=None,
                batch_size=64,
                lr=3e-3,
                warmup_steps=30,
                eval_interval=1000,
                eval_batches=4,
                sample_tokens=0,
                device="cpu",
            ),
        },
    )
    out = tmp_path_factory.mktemp("learn") / "dates"
    result = train(cfg, out, data=pairs.demo("dates"), log=quiet)
    return out, result


def test_learns_the_dates_demo(learned_run):
    """Chance exact match on converting a date to ISO is ~1 in 73,000 (days in 1900-2099); after 200 steps the small
    model must convert at least half of 300 held-out dates exactly."""
    run, result = learned_run
    model, tok = load(run)
    test = pairs.demo("dates").pairs("test")[:300]
    res = evaluate_pairs(model, tok, test, beam_size=1, warn=quiet)
    assert res["exact_match"] >= 0.5, res
    assert res["chrf"] > 80 and result.final["val_exact_match"] >= 0.5
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["loss"] > 5 * records[-2]["loss"]
    greedy_100 = sum(o == t for o, (_, t) in zip(res["outputs"][:100], test[:100]))
    beam_100 = sum(
        o == t for o, (_, t) in zip(translate(model, tok, [s for s, _ in test[:100]], beam_size=4), test[:100])
    )
    assert beam_100 >= greedy_100 - 2  # beam search is not worse than greedy here


def test_translate_batches_and_keeps_order(learned_run):
    model, tok = load(learned_run[0])
    sources = [s for s, _ in pairs.demo("dates").pairs("test")[:40]]
    batched = translate(model, tok, sources, beam_size=2, batch_size=7)
    one_by_one = [translate(model, tok, [s], beam_size=2)[0] for s in sources]
    assert batched == one_by_one


def test_config_json_records_family_and_loads(learned_run):
    run = learned_run[0]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["family"] == "seq2seq" and cfg["model"]["n_encoder_layer"] == 2
    assert json.loads((run / "data.json").read_text()) == {"demo": "dates"}
    model, tok = load(run)
    assert isinstance(model, Seq2SeqTransformer) and isinstance(tok, pairs.PairTokenizer) and not model.training


def test_cli_train_generate_eval(tmp_path, capsys, pairs_file):
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", "--demo", "sort", "--out", run, "--max-steps", 8, *TINY_S2S_ARGS)
    assert code == 0, err
    assert "eval step 8: val loss" in out and "exact match" in out and "sample: " in out
    held_out = len(pairs.demo("sort").pairs("val"))
    assert f"validation on 16 of the {held_out:,} held-out pairs" in out  # eval_batches 1 x batch_size 16
    for f in (
        "config.json",
        "tokenizer.json",
        "model.safetensors",
        "checkpoints/step_0000008/trainer_state.pt",
        "metrics.jsonl",
        "data.json",
    ):
        assert (run / f).is_file(), f
    code, out, err = run_cli(capsys, "generate", run, "--source", "c b a", "--max-new-tokens", 6)
    assert code == 0 and len(out.splitlines()) == 1, err
    code, out2, _ = run_cli(capsys, "generate", run, "--source", "c b a", "--max-new-tokens", 6)
    assert out2 == out  # beam search is deterministic
    sources = tmp_path / "sources.txt"
    sources.write_text("c b a\n\nz y\nq\n")
    code, out, err = run_cli(capsys, "generate", run, "--source-file", sources, "--beam-size", 1, "--max-new-tokens", 6)
    assert code == 0 and len(out.splitlines()) == 3, err
    code, out2, err = run_cli(capsys, "generate", run, "--source-file", sources, "--greedy", "--max-new-tokens", 6)
    assert code == 0 and out2 == out, err
    test_pairs = write_pairs(tmp_path / "test.jsonl", pairs.demo("sort").pairs("test")[:20])
    code, out, err = run_cli(capsys, "eval", run, "--data", test_pairs, "--beam-size", 2)
    assert code == 0, err
    assert out.startswith("pairs 20 | loss ") and "exact match" in out and "BLEU" in out and "chrF" in out
    code, out, err = run_cli(capsys, "eval", run, "--demo", "sort", "--beam-size", 1)
    assert code == 0 and out.startswith(f"pairs {len(pairs.demo('sort').pairs('test')):,} |"), err
    # train on a pairs file (separate vocabularies) through the CLI too
    run2 = tmp_path / "run2"
    code, out, err = run_cli(
        capsys,
        "train",
        "--task",
        "seq2seq",
        pairs_file,
        "--out",
        run2,
        "--max-steps",
        2,
        "--shared_vocab",
        "false",
        "--tie_embeddings",
        "false",
        "--norm_position",
        "pre",
        *TINY_S2S_ARGS,
    )
    assert code == 0, err
    assert (run2 / "source_tokenizer.json").is_file() and "vocabularies" in out
    code, out, err = run_cli(capsys, "generate", run2, "--source", "a b", "--max-new-tokens", 4)
    assert code == 0, err


def test_generate_interactive(learned_run):
    r = subprocess.run(
        [sys.executable, "-m", "lmforge", "generate", str(learned_run[0]), "--beam-size", "1"],
        input="March 5, 2021\nJan 2 1999\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split("> ")
    assert (
        lines[0] == "" and len(lines) == 4 and all(line.endswith("\n") for line in lines[1:3])
    )  # prompt, output, twice


def test_cli_bad_inputs(tmp_path, capsys, tiny_run, learned_run):
    malformed = tmp_path / "bad.jsonl"
    malformed.write_text('{"source": "a", "target": "b"}\n{"source": "a", "target": "b"\n')
    s2s_run = learned_run[0]
    cases = [
        (["train", "--task", "seq2seq", tmp_path / "missing.jsonl", "--out", tmp_path / "o1"], "data file not found"),
        (["train", "--task", "seq2seq", malformed, "--out", tmp_path / "o2"], "bad.jsonl:2: not valid JSON"),
        (["train", "--demo", "nope", "--out", tmp_path / "o3"], "unknown demo 'nope'"),
        (["train", "--task", "seq2seq", "--out", tmp_path / "o4"], "needs DATA"),
        (["train", "--task", "lm", "--demo", "dates"], "--demo is a seq2seq task"),
        (["train", "--demo", "dates", "--preset", "tiny"], "preset 'tiny' is a language-model preset"),
        (["train", "--demo", "dates", "--n_layer", "3"], "unknown option --n-layer"),
        (["train", "--demo", "dates", "--seq_len", "8", "--out", tmp_path / "o5"], "seq_len does not apply"),
        (["generate", s2s_run, "--prompt", "a b"], "give --source"),
        (["generate", s2s_run, "--source-file", tmp_path / "none.txt"], "source file not found"),
        (["generate", s2s_run, "--source", "a", "--beam-size", "0"], "beam size must be at least 1"),
        (["eval", s2s_run, "--demo", "dates", "--beam-size", "-1"], "beam size must be at least 1"),
        (["train", "--demo", "dates", tmp_path / "x.jsonl"], "give DATA or --demo, not both"),
        (["generate", tiny_run, "--source", "a b"], "is a language model"),
        (["eval", s2s_run, "--data", malformed], "bad.jsonl:2: not valid JSON"),
        (["eval", s2s_run], "needs --data PAIRS"),
        (["eval", s2s_run, "--demo", "nope"], "unknown demo"),
        (["eval", tiny_run, "--demo", "dates"], "--demo is for seq2seq runs"),
    ]
    for argv, expected in cases:
        code, out, err = run_cli(capsys, *argv)
        line = one_error_line(err)
        assert code != 0 and expected in line, (argv, err)
    for d in ("o1", "o2", "o3", "o4", "o5"):
        assert not (tmp_path / d).exists()
