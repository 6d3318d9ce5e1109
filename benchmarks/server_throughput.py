"""Server throughput: total generated tokens/s with 1, 4 and 16 concurrent streaming clients.

Starts `lmforge serve` (a subprocess, on loopback) on a GPT-2-small-shaped model (12 layers,
d_model 768, random weights) with an 8,192-token BPE vocabulary trained here on a slice of the
Python standard library, then lets N clients (the official `openai` package, one thread each)
stream completions of --tokens tokens at the same time. Dynamic batching is what makes the total
grow with N. Best of --repeats rounds per level.

    flock /tmp/lmforge-cpu.lock python benchmarks/server_throughput.py
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from openai import OpenAI  # noqa: E402

from lmforge.config import Config, preset  # noqa: E402
from lmforge.data.corpus import stdlib_files  # noqa: E402
from lmforge.data.tokenizer import Tokenizer  # noqa: E402
from lmforge.models import build_model  # noqa: E402
from lmforge.runs import WEIGHTS, save_config, save_weights  # noqa: E402


def make_run(path: Path, vocab: int) -> None:
    files = sorted(stdlib_files(), key=lambda p: p.stat().st_size)[-60:]
    tok = Tokenizer.train((p.read_text(encoding="utf-8", errors="ignore") for p in files), vocab)
    cfg: Config = preset("gpt2")
    cfg.model.vocab_size = (tok.vocab_size + 63) // 64 * 64
    torch.manual_seed(0)
    model = build_model(cfg.model)
    path.mkdir(parents=True, exist_ok=True)
    save_config(path, cfg)
    tok.save(path / "tokenizer.json")
    save_weights(path / WEIGHTS, model)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def round_of(client: OpenAI, n: int, tokens: int, prompts: list[str]) -> tuple[float, int, list[float]]:
    """n clients stream at once; (wall seconds, tokens received, time to first token per client)."""
    counts, ttft = [0] * n, [0.0] * n
    start = threading.Barrier(n + 1)

    def one(i):
        start.wait()
        t0 = time.perf_counter()
        stream = client.completions.create(
            model="bench",
            prompt=prompts[i % len(prompts)],
            max_tokens=tokens,
            temperature=0.8,
            seed=i,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].text and not ttft[i]:
                ttft[i] = time.perf_counter() - t0
            if chunk.usage:
                counts[i] = chunk.usage.completion_tokens

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, sum(counts), ttft


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--quantize", default="none")
    args = ap.parse_args()
    prompts = [
        "import os\nimport sys\n\ndef main(",
        "class Parser:\n    def __init__(self",
        "# Copyright 2001 Python Software Foundation\n",
        "def test_round_trip(self):\n        data = ",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "bench"
        make_run(run, args.vocab)
        port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "lmforge",
            "serve",
            str(run),
            "--port",
            str(port),
            "--max-batch",
            "16",
            "--quantize",
            args.quantize,
        ]
        env = {k: v for k, v in os.environ.items() if k != "LMFORGE_API_KEY"}
        server = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        try:
            for _ in range(600):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                    break
                except OSError:
                    if server.poll() is not None:
                        raise SystemExit(server.stderr.read().decode()) from None
                    time.sleep(0.1)
            client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
            round_of(client, 2, 8, prompts)  # warm up
            print(
                f"GPT-2 small shape, {args.vocab}-token vocabulary, random weights, --quantize {args.quantize}, "
                f"{args.tokens} new tokens per request, {torch.get_num_threads()} threads"
            )
            print(
                f"{'clients':>8} {'total tok/s':>12} {'x 1 client':>11} {'per-client tok/s':>17} "
                f"{'median first token':>19}"
            )
            base = None
            for n in [int(c) for c in args.clients.split(",")]:
                best = None
                for _ in range(args.repeats):
                    wall, toks, ttft = round_of(client, n, args.tokens, prompts)
                    if best is None or toks / wall > best[1] / best[0]:
                        best = (wall, toks, ttft)
                wall, toks, ttft = best
                rate = toks / wall
                base = base or rate
                print(
                    f"{n:>8} {rate:>12.1f} {rate / base:>10.2f}x {rate / n:>17.1f} "
                    f"{statistics.median(ttft) * 1e3:>16.0f} ms"
                )
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
