"""The training loop: data, optimiser, schedule, accumulation, clipping, evaluation, checkpoints.

The loop is the same for every model family; what differs (data, batches, loss, evaluation, samples)
comes from a task object: `LMTask` here for decoder-only language models, `seq2seq.Seq2SeqTask`
for encoder–decoder models.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Config
from ..errors import LmforgeError
from ..io import write_text_atomic
from ..models import build_model, moe
from ..runs import METRICS, WEIGHTS, load_config, save_config
from .checkpoint import load_latest, save_checkpoint
from .distributed import any_rank, barrier, init_distributed, mean_across_ranks, shutdown, wrap_model
from .optim import build_optimizers, lr_factor
from .precision import PeakFlops, autocast_for, choose_precision, cpu_has_native_bf16, pick_device
from .tasks import make_task


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


class _Metrics:
    """metrics.jsonl always; TensorBoard too when asked for and installed. Only rank 0 writes."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, log):
        self.path = run_dir / METRICS
        self.enabled = enabled
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                log(
                    "warning: --tensorboard needs the tensorboard package (pip install tensorboard); writing metrics.jsonl only"
                )

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        _append_metrics(self.path, record)
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self):
        if self.tb is not None:
            self.tb.close()


def train(
    cfg: Config,
    run_dir: str | Path,
    data=None,
    resume: bool = False,
    cache_root: str | Path | None = None,
    stop_after_steps: int | None = None,
    log=print,
) -> RunResult:
    """Train (or resume) a run in run_dir on data (None = the default corpus).

    The model family comes from cfg (a decoder LM on text, or seq2seq on a pairs file or `pairs.Demo`).
    stop_after_steps ends the run at that step as if interrupted (checkpoint saved, schedule
    unchanged), so a long run can be done in chunks with resume. Under torchrun with several
    processes, each trains on its share of every batch (DDP or FSDP2); rank 0 logs and saves.
    """
    run_dir = Path(run_dir)
    tc_device = pick_device((load_config(run_dir) if resume else cfg).train.device)
    dist_info = init_distributed(tc_device.type)
    if dist_info.enabled and tc_device.type == "cuda":
        tc_device = torch.device("cuda", dist_info.local_rank)
    main = dist_info.is_main
    say = log if main else (lambda *_: None)
    try:
        return _train(cfg, run_dir, data, resume, cache_root, stop_after_steps, say, tc_device, dist_info)
    finally:
        shutdown(dist_info)


def _train(cfg, run_dir: Path, data, resume, cache_root, stop_after_steps, log, device, dist_info) -> RunResult:
    main = dist_info.is_main
    if resume:
        cfg = load_config(run_dir)
    else:
        if (run_dir / WEIGHTS).exists():
            raise LmforgeError(
                f"{run_dir} already holds a trained model: use --resume to continue it or --out for a new run"
            )
        cfg.validate()
    task = make_task(cfg, run_dir, data, resume, cache_root, log, dist_info)
    tc = cfg.train
    if tc.max_steps is None and tc.max_tokens is None and tc.max_time is None:
        raise LmforgeError("no training budget: set --max-steps, --max-tokens or --max-time")

    precision = choose_precision(tc.precision, device)
    if precision == "fp16" and device.type != "cuda":
        raise LmforgeError("fp16 training needs a CUDA device (use bf16 or fp32)")
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        log("warning: this CPU has no native bf16 matrix instructions; bf16 will be much slower than fp32")
    autocast = autocast_for(device, precision)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    torch.manual_seed(tc.seed)
    model = build_model(cfg.model)
    model.activation_checkpointing = tc.activation_checkpointing
    step, tokens, elapsed, best = 0, 0, 0.0, None
    state = None
    if resume:
        state = load_latest(run_dir, model)
    model.to(device)
    wrapped = wrap_model(model, tc.parallel, dist_info, device)
    optimizers = build_optimizers(model, tc, device)
    data_gen = torch.Generator().manual_seed(tc.seed)
    micro_tokens = task.micro_tokens  # (nominal) tokens per micro-step, all ranks together
    accum = max(1, math.ceil((tc.tokens_per_step or micro_tokens) / micro_tokens))

    if state is not None:
        for opt, sd in zip(optimizers, state["optimizers"]):
            _load_optim_state(model, opt, sd, dist_info, tc)
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        data_gen.set_state(state["data_rng"])
        _set_rng_state(state["rng"])
        step, tokens, elapsed, best = state["step"], state["tokens"], state["elapsed"], state.get("best_val_loss")
        if main:
            _truncate_metrics(run_dir / METRICS, step)
        log(f"resuming {run_dir} at step {step} ({tokens:,} tokens, {elapsed:.0f}s)")
    elif main:
        run_dir.mkdir(parents=True, exist_ok=True)
        task.save_files(run_dir)
        save_config(run_dir, cfg)
    barrier(dist_info)

    fwd = torch.compile(wrapped) if tc.compile else wrapped
    flops_tok = task.flops_per_token() if hasattr(task, "flops_per_token") else None
    peak = PeakFlops(device, precision, log) if flops_tok else None  # MFU's denominator, never below what we reach
    metrics = _Metrics(run_dir, main, tc.tensorboard, log)
    model_line, train_line = task.describe(model, accum)
    log(
        f"{model_line}; device {device}, {precision}"
        + (f", {dist_info.world} processes ({tc.parallel})" if dist_info.enabled else "")
        + (", compiled" if tc.compile else "")
    )
    log(f"{train_line}; optimizer {tc.optimizer}")

    def progress_of(step, tokens, elapsed):
        parts = [0.0]
        if tc.max_steps:
            parts.append(step / tc.max_steps)
        if tc.max_tokens:
            parts.append(tokens / tc.max_tokens)
        if tc.max_time:
            parts.append(elapsed / tc.max_time)
        return max(parts)

    def checkpoint(val_loss=None):
        nonlocal best
        if val_loss is not None and (best is None or val_loss < best):
            best = val_loss
        state = {
            "step": step,
            "tokens": tokens,
            "elapsed": elapsed,
            "optimizers": [_full_optim_state(model, o, dist_info, tc) for o in optimizers],
            "scaler": scaler.state_dict() if scaler is not None else {},
            "data_rng": data_gen.get_state(),
            "rng": _rng_state(),
            "best_val_loss": best,
        }
        full_model = _FullStateModel(model, dist_info, tc)
        if main:
            save_checkpoint(run_dir, full_model, state, keep=tc.keep_checkpoints, val_loss=val_loss)
        barrier(dist_info)

    def run_eval():
        res = task.evaluate(model, device, autocast, forward=fwd)
        res.update(step=step, tokens=tokens, elapsed=round(elapsed, 2))
        metrics.write(res)
        log(f"eval step {step}: {task.format_eval(res)}")
        if tc.sample_tokens and not (
            dist_info.enabled and tc.parallel == "fsdp"
        ):  # a sharded model cannot generate alone
            model.eval()
            with autocast():
                sample = task.sample(model, step)
            model.train()
            log("sample: " + sample.strip("\n")[:600])
        return res

    wrapped.train()
    last_eval: dict = {}
    interrupted = False
    t_log, tok_log = time.time(), tokens
    with _StopFlag() as stop:
        t_prev = time.time()
        while progress_of(step, tokens, elapsed) < 1.0:
            if any_rank(stop.requested, dist_info) or (stop_after_steps is not None and step >= stop_after_steps):
                interrupted = True
                break
            factor = lr_factor(tc, step, progress_of(step, tokens, elapsed))
            for opt in optimizers:
                for g in opt.param_groups:
                    g["lr"] = g["base_lr"] * factor
            loss_sum = torch.zeros((), device=device)
            aux_sums = {}
            step_tokens = 0
            for micro in range(accum):
                batch, n_tokens = task.batch(data_gen, device)
                sync = micro == accum - 1
                with _maybe_no_sync(wrapped, sync, dist_info, tc), autocast():
                    loss = task.loss(fwd, batch)
                    aux = moe.aux_losses(model)  # MoE router losses {name: (coef, value)}; {} for dense models
                scaled = (loss + sum(c * v for c, v in aux.values())) / accum
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
                loss_sum += loss.detach()
                step_tokens += n_tokens
                aux_sums = {k: aux_sums.get(k, 0.0) + v.detach() / accum for k, (_, v) in aux.items()}
            if scaler is not None:
                for opt in optimizers:
                    scaler.unscale_(opt)
            if tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            for opt in optimizers:
                scaler.step(opt) if scaler is not None else opt.step()
            if scaler is not None:
                scaler.update()
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            step += 1
            tokens += step_tokens
            now = time.time()
            elapsed += now - t_prev
            t_prev = now
            if step % tc.log_interval == 0 or step == 1:
                loss_v = mean_across_ranks(loss_sum, dist_info).item() / accum  # the one sync per logged step
                rate = (tokens - tok_log) / max(1e-9, now - t_log)
                t_log, tok_log = now, tokens
                p = progress_of(step, tokens, elapsed)
                eta = elapsed * (1 - p) / p if p > 0 else 0.0
                mfu = peak.mfu(rate * flops_tok / dist_info.world) if peak else None
                extra = moe.training_metrics(model, aux_sums)  # router losses and expert load; {} for dense models
                rec = {
                    "step": step,
                    "tokens": tokens,
                    "loss": loss_v,
                    "lr": tc.lr * factor,
                    "tokens_per_s": rate,
                    "elapsed": round(elapsed, 2),
                }
                if mfu is not None:
                    rec["mfu"] = mfu
                metrics.write({**rec, **extra})
                log(
                    f"step {step:>6} | loss {loss_v:.4f} | lr {tc.lr * factor:.2e} | {rate:,.0f} tok/s"
                    + (f" | MFU {100 * mfu:4.1f}%" if mfu is not None else "")
                    + f" | {100 * p:5.1f}% | ETA {_fmt_time(eta)}"
                    + moe.describe(extra)
                )
            done = progress_of(step, tokens, elapsed) >= 1.0
            if step % tc.eval_interval == 0 and not done:
                last_eval = run_eval()
                if not tc.checkpoint_interval:
                    checkpoint(last_eval["val_loss"])
                t_prev = time.time()  # evaluation and checkpoint time do not count against the budget
            if tc.checkpoint_interval and step % tc.checkpoint_interval == 0 and not done:
                checkpoint()
                t_prev = time.time()
        if not interrupted:
            last_eval = run_eval()
        checkpoint(last_eval.get("val_loss") if not interrupted else None)
    metrics.close()
    log(
        f"{'stopped' if interrupted else 'done'}: step {step}, {tokens:,} tokens in {_fmt_time(elapsed)}; saved to {run_dir}"
    )
    return RunResult(run_dir, step, tokens, elapsed, last_eval, interrupted)


def _maybe_no_sync(wrapped, sync: bool, dist_info, tc):
    """Skip DDP's gradient all-reduce on all but the last micro-step of an accumulation."""
    if dist_info.enabled and not sync and tc.parallel == "ddp":
        return wrapped.no_sync()
    if dist_info.enabled and tc.parallel == "fsdp" and hasattr(wrapped, "set_requires_gradient_sync"):
        wrapped.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def _full(t):
    """A plain tensor from an FSDP2 shard (DTensor) by gathering it; plain tensors pass through."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class _FullStateModel:
    """What save_weights needs from a model (config + state_dict), with FSDP shards gathered to full tensors.

    Every rank must build it (gathering is collective); only rank 0 writes it.
    """

    def __init__(self, model, dist_info, tc):
        self.config = model.config
        self._sd = {k: _full(v) for k, v in model.state_dict().items()}

    def state_dict(self):
        return self._sd


def _full_optim_state(model, opt, dist_info, tc):
    sd = opt.state_dict()
    if dist_info.enabled and tc.parallel == "fsdp":
        sd["state"] = {i: {k: _full(v) for k, v in st.items()} for i, st in sd["state"].items()}
    return sd


def _load_optim_state(model, opt, sd, dist_info, tc):
    """Load a full optimizer state; under FSDP2 each state tensor is re-sharded like its parameter."""
    if dist_info.enabled and tc.parallel == "fsdp":
        from torch.distributed.tensor import distribute_tensor

        params = [p for g in opt.param_groups for p in g["params"]]
        state = {}
        for i, st in sd["state"].items():
            p = params[int(i)]
            state[i] = {
                k: distribute_tensor(v, p.device_mesh, p.placements) if hasattr(p, "device_mesh") and v.dim() > 0 else v
                for k, v in st.items()
            }
        sd = {**sd, "state": state}
    opt.load_state_dict(sd)


def _append_metrics(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint we resume from."""
    if not path.is_file():
        return
    keep = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= step
    ]
    write_text_atomic(path, "".join(line + "\n" for line in keep))


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
