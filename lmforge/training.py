"""The training loop: data, optimiser, schedule, accumulation, clipping, evaluation, checkpoints.

The loop is the same for every model family; what differs (data, batches, loss, evaluation, samples)
comes from a task object: `LMTask` here for decoder-only language models, `seq2seq.Seq2SeqTask`
for encoder–decoder models.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import data as datamod
from .config import Config
from .errors import LmforgeError
from .generation import generate
from .io import write_json_atomic
from .models import build_model
from .runs import (METRICS, TOKENIZER, TRAINER_STATE, WEIGHTS, load_config, load_trainer_state, load_weights, save_config,
                   save_trainer_state, save_weights)
from .tokenizer import Tokenizer

TOKENIZER_SAMPLE_CHARS = 50_000_000  # text used to learn the BPE merges (the whole default corpus fits)


def pick_device(name: str = "auto") -> torch.device:
    if name != "auto":
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise LmforgeError("device cuda requested but CUDA is not available")
        if name == "mps" and not torch.backends.mps.is_available():
            raise LmforgeError("device mps requested but MPS is not available")
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def round_up(n: int, multiple: int = 64) -> int:
    return (n + multiple - 1) // multiple * multiple


# --- data for a run -------------------------------------------------------------------------------


def ensure_data(spec, train_cfg, cache_root: Path, log=print) -> tuple[Path, Tokenizer]:
    """Return (shard directory, tokenizer) for DATA.

    DATA may be a directory of prepared shards (with its tokenizer.json), or raw text
    (file, directory, glob, or None for the default corpus): then a tokenizer is trained and
    shards prepared under cache_root/<fingerprint>/, reused while the inputs are unchanged.
    """
    if spec is not None and Path(str(spec)).is_dir() and datamod.shard_paths(spec, "train"):
        tok_path = Path(spec) / TOKENIZER
        if not tok_path.is_file():
            raise LmforgeError(f"{spec} has shards but no {TOKENIZER} next to them")
        return Path(spec), Tokenizer.from_file(tok_path)
    files = datamod.discover(spec)
    key_parts = [datamod.corpus_key(spec, files), train_cfg.tokenizer_vocab_size, train_cfg.val_fraction, 1]
    if train_cfg.split_digits:  # only then, so that data prepared before the option existed keeps its key
        key_parts.append("split_digits")
    key = hashlib.sha256(json.dumps(key_parts).encode()).hexdigest()[:16]
    cache = cache_root / f"data-{key}"
    done = cache / "done.json"
    if done.is_file() and (cache / TOKENIZER).is_file():
        log(f"data: reusing tokenizer and shards in {cache}")
        return cache, Tokenizer.from_file(cache / TOKENIZER)
    name = "the Python standard library" if spec is None else str(spec)
    log(f"data: training a {train_cfg.tokenizer_vocab_size}-token BPE tokenizer on {name} ({len(files)} files)")
    t0 = time.time()
    tok = Tokenizer.train(datamod.text_sample(spec, TOKENIZER_SAMPLE_CHARS), train_cfg.tokenizer_vocab_size, split_digits=train_cfg.split_digits)
    if tok.vocab_size <= 257:
        raise LmforgeError(f"no usable text in {name}")
    cache.mkdir(parents=True, exist_ok=True)
    tok.save(cache / TOKENIZER)
    log(f"data: tokenizer ready ({tok.vocab_size} tokens, {time.time() - t0:.1f}s); writing shards")
    stats = datamod.prepare(spec, tok, cache, val_fraction=train_cfg.val_fraction, progress=sys.stderr.isatty())
    write_json_atomic(done, {"train_tokens": stats.train_tokens, "val_tokens": stats.val_tokens, "documents": stats.documents, "bytes": stats.bytes})
    log(f"data: {stats.documents} documents, {stats.bytes / 1e6:.1f} MB -> {stats.train_tokens:,} train + {stats.val_tokens:,} val tokens ({time.time() - t0:.1f}s)")
    return cache, tok


# --- optimisation ---------------------------------------------------------------------------------


def make_optimizer(model, cfg, device) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrix weights only (not on norms, biases or embeddings)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def lr_at(cfg, step: int, progress: float) -> float:
    """Linear warmup over warmup_steps, then cosine decay to lr * min_lr_ratio as progress goes 0 -> 1."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    progress = min(max(progress, 0.0), 1.0)
    cosine = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * warm * cosine


def lm_loss(model, x, y, reduction: str = "mean", label_smoothing: float = 0.0):
    logits = model(x)
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), reduction=reduction, label_smoothing=label_smoothing)


@torch.no_grad()
def evaluate(model, data: datamod.TokenData, batch_size: int, seq_len: int, batches: int, byte_lengths: torch.Tensor | None,
             device) -> dict:
    """Mean loss, perplexity and bits per byte on fixed windows (same windows at every call)."""
    was_training = model.training
    model.eval()
    seq_len = min(seq_len, int(max(data.lengths)) - 1)
    gen = torch.Generator().manual_seed(1234)
    nats, count, nbytes = 0.0, 0, 0
    for _ in range(batches):
        x, y = data.batch(batch_size, seq_len, gen)
        x, y = x.to(device), y.to(device)
        nats += lm_loss(model, x, y, reduction="sum").item()
        count += y.numel()
        if byte_lengths is not None:
            nbytes += int(byte_lengths[y.cpu()].sum())
    model.train(was_training)
    loss = nats / count
    out = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50))}
    if nbytes:
        out["val_bpb"] = nats / math.log(2) / nbytes
    return out


# --- tasks: what the loop trains on ----------------------------------------------------------------


class LMTask:
    """Next-token prediction on token shards: the decoder-only language model."""

    def __init__(self, cfg: Config, run_dir: Path, data, resume: bool, cache_root: str | Path | None, log=print):
        self.cfg, self.data = cfg, data
        if resume:
            self.tokenizer = Tokenizer.from_file(run_dir / TOKENIZER)
            shard_dir = Path(json.loads((run_dir / "data.json").read_text())["shards"]) if (run_dir / "data.json").is_file() else None
            if shard_dir is None or not shard_dir.is_dir():
                raise LmforgeError(f"cannot resume {run_dir}: its prepared data is gone (expected in {shard_dir})")
        else:
            shard_dir, self.tokenizer = ensure_data(data, cfg.train, Path(cache_root) if cache_root else run_dir.parent / "cache", log)
            cfg.model.vocab_size = round_up(self.tokenizer.vocab_size)
        self.shard_dir = shard_dir
        tc = cfg.train
        self.seq_len = seq_len = tc.seq_len or cfg.model.block_size
        if seq_len > cfg.model.block_size:
            raise LmforgeError(f"seq_len {seq_len} exceeds the model's block_size {cfg.model.block_size}")
        self.train_data = datamod.TokenData(shard_dir, "train")
        self.val_data = datamod.TokenData(shard_dir, "val")
        self.train_data.check(seq_len, cfg.model.vocab_size)
        if self.val_data.total < 2:
            raise LmforgeError(f"validation split in {shard_dir} is empty")
        self.micro_tokens = tc.batch_size * seq_len
        self.byte_lengths = torch.tensor(self.tokenizer.token_byte_lengths() + [0] * (cfg.model.vocab_size - self.tokenizer.vocab_size))

    def save_files(self, run_dir: Path) -> None:
        shard_dir = self.shard_dir
        shutil.copyfile(shard_dir / TOKENIZER, run_dir / TOKENIZER) if (shard_dir / TOKENIZER).is_file() else self.tokenizer.save(run_dir / TOKENIZER)
        write_json_atomic(run_dir / "data.json", {"shards": str(shard_dir.resolve()), "data": None if self.data is None else str(self.data)})

    def describe(self, model, accum: int) -> list[str]:
        cfg, tc = self.cfg, self.cfg.train
        return [f"model: {model.num_params():,} parameters ({model.num_params(embeddings=False):,} without embeddings), "
                f"{cfg.model.n_layer} layers, d_model {cfg.model.d_model}, context {cfg.model.block_size}",
                f"train: {self.train_data.total:,} tokens; {accum * self.micro_tokens:,} tokens per step ({tc.batch_size} x {self.seq_len} x {accum} accumulation)"]

    def batch(self, generator: torch.Generator, device):
        """((x, y) on device, number of predicted tokens)."""
        x, y = self.train_data.batch(self.cfg.train.batch_size, self.seq_len, generator)
        return (x.to(device, non_blocking=True), y.to(device, non_blocking=True)), y.numel()

    def loss(self, model, batch):
        return lm_loss(model, *batch, label_smoothing=self.cfg.train.label_smoothing)

    def evaluate(self, model, device) -> dict:
        tc = self.cfg.train
        return evaluate(model, self.val_data, tc.batch_size, self.seq_len, tc.eval_batches, self.byte_lengths, device)

    def format_eval(self, res: dict) -> str:
        bpb = f", {res['val_bpb']:.3f} bits/byte" if "val_bpb" in res else ""
        return f"val loss {res['val_loss']:.4f}, perplexity {res['val_ppl']:.2f}{bpb}"

    def sample(self, model, step: int) -> str:
        tc = self.cfg.train
        return generate(model, self.tokenizer, tc.sample_prompt, max_new_tokens=tc.sample_tokens, temperature=0.8, top_k=50, seed=step)


def make_task(cfg: Config, run_dir: Path, data, resume: bool, cache_root, log):
    """The task object for cfg's model family (see LMTask for what a task provides)."""
    if cfg.family == "seq2seq":
        from .seq2seq import Seq2SeqTask

        return Seq2SeqTask(cfg, run_dir, data, resume, log)
    return LMTask(cfg, run_dir, data, resume, cache_root, log)


# --- the run --------------------------------------------------------------------------------------


@dataclass
class RunResult:
    run_dir: Path
    step: int
    tokens: int
    elapsed: float
    final: dict
    interrupted: bool


class _StopFlag:
    """SIGINT/SIGTERM set a flag the loop checks between steps; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping: saving a checkpoint (Ctrl-C again to abort at once)", file=sys.stderr)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train(cfg: Config, run_dir: str | Path, data=None, resume: bool = False, cache_root: str | Path | None = None,
          stop_after_steps: int | None = None, log=print) -> RunResult:
    """Train (or resume) a run in run_dir on data (None = the default corpus).

    The model family comes from cfg (a decoder LM on text, or seq2seq on a pairs file or `pairs.Demo`).
    stop_after_steps ends the run at that step as if interrupted (checkpoint saved, schedule
    unchanged), so a long run can be done in chunks with resume.
    """
    run_dir = Path(run_dir)
    if resume:
        cfg = load_config(run_dir)
    else:
        if (run_dir / WEIGHTS).exists():
            raise LmforgeError(f"{run_dir} already holds a trained model: use --resume to continue it or --out for a new run")
        cfg.validate()
    task = make_task(cfg, run_dir, data, resume, cache_root, log)
    tc = cfg.train
    if tc.max_steps is None and tc.max_tokens is None and tc.max_time is None:
        raise LmforgeError("no training budget: set --max-steps, --max-tokens or --max-time")

    device = pick_device(tc.device)
    torch.manual_seed(tc.seed)
    model = build_model(cfg.model).to(device)
    optimizer = make_optimizer(model, tc, device)
    data_gen = torch.Generator().manual_seed(tc.seed)
    micro_tokens = task.micro_tokens  # (nominal) tokens per micro-batch
    accum = max(1, math.ceil((tc.tokens_per_step or micro_tokens) / micro_tokens))

    step, tokens, elapsed = 0, 0, 0.0
    if resume:
        state = load_trainer_state(run_dir / TRAINER_STATE)
        meta = load_weights(run_dir / WEIGHTS, model)
        if int(meta.get("step", -1)) != state["step"]:
            raise LmforgeError(f"checkpoint in {run_dir} is inconsistent (weights at step {meta.get('step')}, trainer state at {state['step']})")
        optimizer.load_state_dict(state["optimizer"])
        data_gen.set_state(state["data_rng"])
        _set_rng_state(state["rng"])
        step, tokens, elapsed = state["step"], state["tokens"], state["elapsed"]
        _truncate_metrics(run_dir / METRICS, step)
        log(f"resuming {run_dir} at step {step} ({tokens:,} tokens, {elapsed:.0f}s)")
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        task.save_files(run_dir)
        save_config(run_dir, cfg)

    model_line, train_line = task.describe(model, accum)
    log(f"{model_line}; device {device}")
    log(train_line)

    def progress_of(step, tokens, elapsed):
        parts = [0.0]
        if tc.max_steps:
            parts.append(step / tc.max_steps)
        if tc.max_tokens:
            parts.append(tokens / tc.max_tokens)
        if tc.max_time:
            parts.append(elapsed / tc.max_time)
        return max(parts)

    def checkpoint():
        save_weights(run_dir / WEIGHTS, model, {"step": step})
        save_trainer_state(run_dir / TRAINER_STATE, {
            "step": step, "tokens": tokens, "elapsed": elapsed, "optimizer": optimizer.state_dict(),
            "data_rng": data_gen.get_state(), "rng": _rng_state(),
        })

    def run_eval():
        res = task.evaluate(model, device)
        res.update(step=step, tokens=tokens, elapsed=round(elapsed, 2))
        _append_metrics(run_dir / METRICS, res)
        log(f"eval step {step}: {task.format_eval(res)}")
        if tc.sample_tokens:
            model.eval()
            sample = task.sample(model, step)
            model.train()
            log("sample: " + sample.strip("\n")[:600])
        return res

    model.train()
    last_eval: dict = {}
    interrupted = False
    t_log, tok_log = time.time(), tokens
    with _StopFlag() as stop:
        t_prev = time.time()
        while progress_of(step, tokens, elapsed) < 1.0:
            if stop.requested or (stop_after_steps is not None and step >= stop_after_steps):
                interrupted = True
                break
            lr = lr_at(tc, step, progress_of(step, tokens, elapsed))
            for g in optimizer.param_groups:
                g["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            step_tokens = 0
            for _ in range(accum):
                batch, n_tokens = task.batch(data_gen, device)
                loss = task.loss(model, batch)
                (loss / accum).backward()
                loss_sum += loss.detach()
                step_tokens += n_tokens
            if tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += step_tokens
            now = time.time()
            elapsed += now - t_prev
            t_prev = now
            if step % tc.log_interval == 0 or step == 1:
                loss_v = loss_sum.item() / accum  # the one sync per logged step
                rate = (tokens - tok_log) / max(1e-9, now - t_log)
                t_log, tok_log = now, tokens
                p = progress_of(step, tokens, elapsed)
                eta = elapsed * (1 - p) / p if p > 0 else 0.0
                _append_metrics(run_dir / METRICS, {"step": step, "tokens": tokens, "loss": loss_v, "lr": lr, "tokens_per_s": rate, "elapsed": round(elapsed, 2)})
                log(f"step {step:>6} | loss {loss_v:.4f} | lr {lr:.2e} | {rate:,.0f} tok/s | {100 * p:5.1f}% | ETA {_fmt_time(eta)}")
            done = progress_of(step, tokens, elapsed) >= 1.0
            if step % tc.eval_interval == 0 and not done:
                last_eval = run_eval()
                if not tc.checkpoint_interval:
                    checkpoint()
                t_prev = time.time()  # evaluation time does not count against the budget
            if tc.checkpoint_interval and step % tc.checkpoint_interval == 0:
                checkpoint()
                t_prev = time.time()
        if not interrupted:
            last_eval = run_eval()
        checkpoint()
    log(f"{'interrupted' if interrupted else 'done'}: step {step}, {tokens:,} tokens in {_fmt_time(elapsed)}; saved to {run_dir}")
    return RunResult(run_dir, step, tokens, elapsed, last_eval, interrupted)


def _append_metrics(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint we resume from."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    from .io import write_text_atomic

    write_text_atomic(path, "".join(line + "\n" for line in keep))


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
