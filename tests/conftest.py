import os
import random
import socket
import subprocess
import sys
from pathlib import Path

# Tests never download: the Hugging Face hub and datasets libraries stay offline (set before they are imported).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

from lmforge.cli import main
from lmforge.data.tokenizer import Tokenizer

torch.set_num_threads(2)

ROOT = Path(__file__).resolve().parents[1]


def torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    """`torchrun` with nproc CPU processes of one thread each (args: a script or `-m module` and its arguments),
    from the repository root with tests/ importable; asserts success, returns the finished process.

    The rendezvous port is one the system has just handed out as free, so two test sessions on one machine
    (or a port another program holds) do not make a run fail, as a fixed or pid-derived port could."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port", str(port)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}")
    r = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


SUBJECTS = ["the cat", "a dog", "the bird", "my friend", "the robot", "a child"]
VERBS = ["sees", "likes", "finds", "draws", "follows"]
OBJECTS = ["the ball", "a tree", "the moon", "a red box", "the river", "an old map"]


def structured_text(n_lines: int, seed: int = 0) -> str:
    """Simple grammar text: predictable structure, so a tiny model can learn it quickly."""
    rng = random.Random(seed)
    lines = []
    for i in range(n_lines):
        lines.append(f"{i % 10}: {rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}.")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    for k in range(6):
        (d / f"part{k}.txt").write_text(structured_text(400, seed=k), encoding="utf-8")
    return d


@pytest.fixture(scope="session")
def small_tokenizer(corpus_dir) -> Tokenizer:
    texts = [p.read_text() for p in sorted(corpus_dir.glob("*.txt"))]
    return Tokenizer.train(texts, 320)


TINY_ARGS = [  # the classic GPT-2 recipe (the default `tiny` preset is Llama-style; llama_run covers that block)
    "--preset",
    "gpt2-tiny",
    "--n_layer",
    "2",
    "--n_head",
    "2",
    "--d_model",
    "64",
    "--block_size",
    "64",
    "--batch_size",
    "8",
    "--tokenizer_vocab_size",
    "320",
    "--eval_interval",
    "20",
    "--eval_batches",
    "2",
    "--sample_tokens",
    "16",
    "--warmup_steps",
    "5",
    "--log_interval",
    "5",
    "--device",
    "cpu",
    "--precision",
    "fp32",
]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, corpus_dir) -> Path:
    """A run trained for a few steps through the CLI, shared by tests that only read it."""
    root = tmp_path_factory.mktemp("runs")
    out = root / "tiny"
    code = main(["train", str(corpus_dir), "--out", str(out), "--max-steps", "30", *TINY_ARGS])
    assert code == 0
    return out


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


LLAMA_ARGS = ["--pos", "rope", "--norm", "rmsnorm", "--mlp", "swiglu", "--n_kv_head", "1", "--bias", "false"]


@pytest.fixture(scope="session")
def llama_run(tmp_path_factory, corpus_dir) -> Path:
    """A Llama-style run (RoPE, RMSNorm, SwiGLU, multi-query, untied head) trained for a few steps."""
    out = tmp_path_factory.mktemp("runs") / "llama"
    extra = [*LLAMA_ARGS, "--tie_embeddings", "false", "--eval_interval", "30", "--sample_tokens", "0"]
    code = main(["train", str(corpus_dir), "--out", str(out), "--max-steps", "30", *TINY_ARGS, *extra])
    assert code == 0
    return out
