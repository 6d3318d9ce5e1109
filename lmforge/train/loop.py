"""The training loop, the same for every model family (what differs comes from a `tasks.Task`).

    train()       processes, then `_run`: the story below
    _run          start (config, task, model, wrapping, optimizers, restored state), then while budget
                  remains: train_step -> log -> maybe evaluate -> maybe checkpoint; a final evaluation and checkpoint
    Setup         what a step acts on: the model, its `distributed.Parallel`, the optimizers, precision, accumulation
    start         builds the Setup (and loads the latest checkpoint's weights when resuming)
    train_step    one optimizer step: accumulate micro-batches, clip, step; a plain function, testable alone
    Reporter      the log lines and metrics.jsonl records of steps and evaluations
    validate      an evaluation, and a sample when the model can generate on one rank
    save/restore  the checkpoint round trip: weights, `state.RunState`, optimizer, scaler and RNG states

Budget and clock live on the `RunState` (state.py); every DDP/FSDP detail lives in distributed.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import machine
from ..config import Config
from ..errors import LmforgeError
from ..models import build_model, moe
from ..runs import METRICS, WEIGHTS, load_config, save_config
from .checkpoint import (
    ShardedCheckpointer,
    async_save_unavailable,
    consolidate,
    is_sharded,
    latest_checkpoint,
    load_full,
    load_sharded,
    remove_stale_temporaries,
    save_checkpoint,
)
from .distributed import DistInfo, Parallel, _full, broadcast_object, init_distributed, shutdown, wrap
from .optim import build_optimizers, lr_factor
from .precision import PeakFlops, autocast_for, choose_precision, cpu_has_native_bf16
from .state import (
    MetricsWriter,
    RunState,
    StopFlag,
    fmt_time,
    global_rng_state,
    require_wandb,
    set_global_rng_state,
    truncate_metrics,
)
from .tasks import Task, make_task


@dataclass
class RunResult:
    run_dir: Path
    step: int
    tokens: int
    elapsed: float
    final: dict
    interrupted: bool


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
    Raises LmforgeError for a run that cannot start (no budget, existing weights, missing data).
    """
    run_dir = Path(run_dir)
    device = machine.pick_device((load_config(run_dir) if resume else cfg).train.device)
    dist_info = init_distributed(device.type)
    if dist_info.enabled and device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
    if device.type == "cpu":
        machine.keep_freed_memory()  # no page faults for each step's fresh tensors: 5-13 % faster on CPU
    log = log if dist_info.is_main else (lambda *_: None)
    try:
        return _run(cfg, run_dir, data, resume, cache_root, stop_after_steps, log, device, dist_info)
    finally:
        shutdown(dist_info)


def _run(cfg, run_dir: Path, data, resume, cache_root, stop_after_steps, log, device, dist_info) -> RunResult:
    # start: the config, the task (data, tokenizer), the model it needs, wrapped and with its optimizers
    cfg = load_config(run_dir) if resume else _check_new_run(cfg, run_dir)
    _check_budget(cfg.train)
    task = make_task(cfg, run_dir, data, resume, cache_root, log, dist_info)
    cfg = dataclasses.replace(cfg, model=task.model_config)
    if getattr(task, "tokens_per_step", None):  # fixed for the run, whatever the number of processes later
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, tokens_per_step=task.tokens_per_step))
    tc = cfg.train
    setup, saved = start(cfg, task, run_dir, resume, device, dist_info, log)
    state = RunState(data_rng=torch.Generator().manual_seed(tc.seed))
    if saved is not None:
        state = restore(setup, saved, run_dir, log)
    elif setup.parallel.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        task.save_files(run_dir)
        save_config(run_dir, cfg)
    setup.parallel.barrier()
    report = Reporter(run_dir, task, setup, state, tc, log)

    # the loop: step, log, evaluate now and then, checkpoint now and then, until the budget is spent
    last_eval, interrupted, bad_in_row = {}, False, 0
    # a background checkpoint counts once it is complete: the `with` waits for the last one (or, on an error, never
    # counts it)
    with StopFlag() as stop, setup.checkpointer or contextlib.nullcontext():
        state.start_clock()
        while state.progress(tc) < 1.0:
            if setup.parallel.any(stop.requested) or (stop_after_steps is not None and state.step >= stop_after_steps):
                interrupted = True
                break
            lr = lr_factor(tc, state.step, state.progress(tc))
            result = train_step(setup, task, state.data_rng, lr)
            state.advance(result.tokens)
            bad_in_row = _guard(result, state, report, bad_in_row)  # a skipped step is logged there
            if not result.skipped and (state.step % tc.log_interval == 0 or state.step == 1):
                report.step(state, result, lr)
            if state.progress(tc) >= 1.0:
                break  # the final evaluation and checkpoint follow
            with state.off_the_clock():
                if state.step % tc.eval_interval == 0:
                    last_eval = validate(task, setup, state, report)
                    if not tc.checkpoint_interval:
                        save(setup, state, run_dir, tc, last_eval["val_loss"])
                if tc.checkpoint_interval and state.step % tc.checkpoint_interval == 0:
                    save(setup, state, run_dir, tc)
        if not interrupted:
            last_eval = validate(task, setup, state, report)
        save(setup, state, run_dir, tc, None if interrupted else last_eval.get("val_loss"))
    if setup.parallel.sharded:  # generate/serve/convert read one file: gather the weights once, at the end
        if setup.parallel.is_main:
            consolidate(run_dir, log=lambda *_: None)
        setup.parallel.barrier()
    report.close()
    log(
        f"{'stopped' if interrupted else 'done'}: step {state.step}, {state.tokens:,} tokens in "
        f"{fmt_time(state.elapsed)}; saved to {run_dir}"
    )
    return RunResult(run_dir, state.step, state.tokens, state.elapsed, last_eval, interrupted)


def _check_new_run(cfg: Config, run_dir: Path) -> Config:
    if (run_dir / WEIGHTS).exists():
        raise LmforgeError(
            f"{run_dir} already holds a trained model: use --resume to continue it or --out for a new run"
        )
    cfg.validate()
    return cfg


def _check_budget(tc) -> None:
    if tc.max_steps is None and tc.max_tokens is None and tc.max_time is None:
        raise LmforgeError("no training budget: set --max-steps, --max-tokens or --max-time")
    if tc.wandb:  # every rank, before any work: a missing package is one line, not a hang of the others
        require_wandb()


# --- start ----------------------------------------------------------------------------------------


@dataclass
class Setup:
    """What a training step acts on. `model` is the plain module; `parallel.parallel_model` the one forward and
    backward go through (DDP / FSDP2); `compiled` that one, torch.compile'd when asked for."""

    model: torch.nn.Module
    optimizers: list[torch.optim.Optimizer]
    accum: int = 1  # micro-batches per optimizer step
    grad_clip: float = 0.0  # max global gradient norm; 0 = no clipping
    autocast: Callable = contextlib.nullcontext
    scaler: torch.amp.GradScaler | None = None  # fp16 loss scaling
    parallel: Parallel | None = None  # None: one process
    compiled: Callable | None = None  # None: parallel.parallel_model
    precision: str = "fp32"
    checkpointer: ShardedCheckpointer | None = None  # sharded runs (FSDP): writes their checkpoints, maybe async

    def __post_init__(self):
        if self.parallel is None:
            self.parallel = Parallel(self.model, DistInfo(), next(self.model.parameters()).device)
        if self.compiled is None:
            self.compiled = self.parallel.parallel_model

    @property
    def device(self) -> torch.device:
        return self.parallel.device


def start(cfg: Config, task: Task, run_dir: Path, resume: bool, device, dist_info: DistInfo, log):
    """(Setup, the saved trainer state or None): the model built from the task's config (with the latest
    checkpoint's weights when resuming), moved, wrapped for the processes, and its optimizers."""
    tc = cfg.train
    precision = _precision(tc.precision, device, log)
    torch.manual_seed(tc.seed)
    model = build_model(task.model_config)
    model.activation_checkpointing = tc.activation_checkpointing
    ckpt = None
    if resume:  # rank 0 verifies (hashing every file once) and tells the others which checkpoint to load
        ckpt = broadcast_object(latest_checkpoint(run_dir) if dist_info.is_main else None, dist_info)
    else:
        task.init_model(model)  # the random init stays, or (fine-tuning) the base run's weights
    saved = load_full(ckpt, model) if ckpt is not None and not is_sharded(ckpt) else None
    model.to(device)
    parallel = wrap(model, tc.parallel, dist_info, device)
    optimizers = build_optimizers(model, tc, device)
    if ckpt is not None and is_sharded(ckpt):  # DCP: into the wrapped model and its optimizers, re-sharded
        saved = load_sharded(ckpt, model, optimizers)
    setup = Setup(
        model,
        optimizers,
        accum=max(1, math.ceil((tc.tokens_per_step or task.micro_tokens) / task.micro_tokens)),
        grad_clip=tc.grad_clip,
        autocast=autocast_for(device, precision),
        scaler=torch.amp.GradScaler("cuda") if precision == "fp16" else None,
        parallel=parallel,
        compiled=torch.compile(parallel.parallel_model) if tc.compile else None,
        precision=precision,
    )
    if parallel.sharded:  # collective (a background save's process group is made here)
        setup.checkpointer = ShardedCheckpointer(parallel, tc.async_checkpoint, log)
    elif tc.async_checkpoint:
        log(f"async checkpoints unavailable ({async_save_unavailable(parallel)}); saving synchronously")
    model_line, train_line = task.describe(model, setup.accum)
    log(
        f"{model_line}; device {device}, {precision}"
        + (f", {dist_info.world} processes ({tc.parallel})" if dist_info.enabled else "")
        + (", compiled" if tc.compile else "")
    )
    log(f"{train_line}; optimizer {tc.optimizer}")
    return setup, saved


def _precision(requested: str, device: torch.device, log) -> str:
    precision = choose_precision(requested, device)
    if precision == "fp16" and device.type != "cuda":
        raise LmforgeError("fp16 training needs a CUDA device (use bf16 or fp32)")
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        log("warning: this CPU has no native bf16 matrix instructions; bf16 will be much slower than fp32")
    return precision


# --- the step -------------------------------------------------------------------------------------


# A run stops after this many optimizer steps in a row with a non-finite loss or gradient (each one skipped).
NONFINITE_LIMIT = 3


@dataclass
class StepResult:
    loss: torch.Tensor  # this rank's share of the step's mean token loss: summed over ranks, it is the mean
    tokens: int  # predicted tokens of the step, all ranks together
    aux: dict  # MoE router losses of the step {name: mean over micro-batches}; {} for dense models
    grad_norm: torch.Tensor | None = None  # total gradient norm before clipping (a scalar tensor)
    skipped: bool = False  # the loss or gradient was not finite: the optimizer step was skipped


def train_step(setup: Setup, task: Task, data_gen: torch.Generator, lr_factor: float) -> StepResult:
    """One optimizer step: `setup.accum` micro-batches forward and backward, then clip, step and zero the gradients.

    Every param group's lr is set to its base_lr x lr_factor first. The step's loss is the mean over every
    token it predicts: sum of token losses over all micro-batches and ranks / their total count N. So the
    micro-batches are drawn first and N all-reduced before any backward; each micro-batch backpropagates
    its loss sum x (g / N), where g is the number of ranks the backward averages gradients over (DDP and
    FSDP average; one process: 1), so the gradient is exactly that of the global token mean. MoE router
    losses are per-batch means, added as their mean over micro-batches. Gradients are all-reduced on the
    last micro-batch only.
    """
    s = setup
    for opt in s.optimizers:
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_factor
    micro = draw_step(task, data_gen, s.device, s.accum)  # token ids only: small
    tokens = int(s.parallel.sum(torch.tensor(sum(n for _, n in micro))).item())  # all ranks (int64)
    scale = s.parallel.grad_average / max(1, tokens)
    loss_sum = torch.zeros((), device=s.device)
    aux_sums = {}
    for i, (batch, _) in enumerate(micro):
        with s.parallel.no_sync(i == s.accum - 1), s.autocast():
            nats, _ = task.loss(s.compiled, batch)
            aux = moe.aux_losses(s.model)  # MoE router losses {name: (coef, value)}; {} for dense models
        objective = nats * scale + sum(c * v for c, v in aux.values()) / s.accum
        (s.scaler.scale(objective) if s.scaler is not None else objective).backward()
        loss_sum += nats.detach()
        aux_sums = {k: aux_sums.get(k, 0.0) + v.detach() / s.accum for k, (_, v) in aux.items()}
    grad_norm, skipped = _optimizer_step(s, loss_sum)
    return StepResult(loss_sum / max(1, tokens), tokens, aux_sums, grad_norm, skipped)


def draw_step(task: Task, data_gen: torch.Generator, device, accum: int) -> list:
    """This rank's `accum` micro-batches of one step: the task's own whole-step draw when it has one."""
    if hasattr(task, "step_batches"):
        return task.step_batches(data_gen, device, accum)
    return [task.batch(data_gen, device) for _ in range(accum)]


def _optimizer_step(s: Setup, loss_sum: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Unscale (fp16), clip, step every optimizer unless the loss or gradient is not finite, zero the gradients.

    Returns (the total gradient norm before clipping, whether the step was skipped). The finiteness check
    reads one scalar per step (a device sync) and agrees across ranks. With fp16's grad scaler an infinite
    gradient is routine (the scale was too high: the scaler skips that step and lowers it), so there only a
    non-finite loss counts.
    """
    if s.scaler is not None:
        for opt in s.optimizers:
            s.scaler.unscale_(opt)
    params = [p for p in s.model.parameters() if p.grad is not None]
    if s.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    bad = not torch.isfinite(loss_sum) or (s.scaler is None and not torch.isfinite(_full(grad_norm)))
    skipped = s.parallel.any(bad)
    if not skipped:
        for opt in s.optimizers:
            s.scaler.step(opt) if s.scaler is not None else opt.step()
        if s.scaler is not None:
            s.scaler.update()
    for opt in s.optimizers:
        opt.zero_grad(set_to_none=True)
    return grad_norm.detach(), skipped


def _guard(result: StepResult, state: RunState, report: Reporter, bad_in_row: int) -> int:
    """Count a skipped (non-finite) step, record it, and stop the run after NONFINITE_LIMIT in a row.

    Returns the new count of skipped steps in a row (0 after a good step). The weights are untouched by
    skipped steps, so the run's last checkpoint and model.safetensors stay usable."""
    if not result.skipped:
        return 0
    bad_in_row += 1
    loss = float(report.parallel.sum(result.loss))
    report.skipped(state, loss, float(_full(result.grad_norm)), bad_in_row)
    if bad_in_row >= NONFINITE_LIMIT:
        raise LmforgeError(
            f"training diverged: the loss or gradient was not finite for {bad_in_row} steps in a row "
            f"(up to step {state.step}; those optimizer steps were skipped). Try a lower --lr, a warmup "
            f"(--warmup_steps), gradient clipping (--grad_clip 1.0) or fp32 (--precision fp32)"
        )
    return bad_in_row


# --- log, evaluate, checkpoint ----------------------------------------------------------------------


class Reporter:
    """The log lines and metrics records of a run: steps (loss, lr, throughput, MFU, ETA) and evaluations."""

    def __init__(self, run_dir: Path, task: Task, setup: Setup, state: RunState, tc, log):
        self.tc, self.log, self.parallel = tc, log, setup.parallel
        self.metrics = MetricsWriter(run_dir, setup.parallel.is_main, tc.tensorboard, log, tc.wandb)
        if error := broadcast_object(self.metrics.error, setup.parallel.info):  # all ranks stop, not just rank 0
            raise LmforgeError(error)
        self.flops_per_token = task.flops_per_token()
        # MFU denominator: never below what the run reaches
        self.peak = PeakFlops(setup.device, setup.precision, log) if self.flops_per_token else None
        self._since = (state.tokens, state.elapsed)  # throughput is measured from the last logged step

    def step(self, state: RunState, result: StepResult, lr_factor: float) -> None:
        loss = self.parallel.sum(result.loss).item()  # the step's token mean; the one sync per logged step
        rate = (state.tokens - self._since[0]) / max(1e-9, state.elapsed - self._since[1])  # tokens per training s
        self._since = (state.tokens, state.elapsed)
        p = state.progress(self.tc)
        eta = state.elapsed * (1 - p) / p if p > 0 else 0.0
        mfu = self.peak.mfu(rate * self.flops_per_token / self.parallel.info.world) if self.peak else None
        extra = moe.training_metrics(self.parallel.model, result.aux)  # router losses and load; {} for dense
        lr = self.tc.lr * lr_factor
        rec = {"step": state.step, "tokens": state.tokens, "loss": loss, "lr": lr, "tokens_per_s": rate}
        if result.grad_norm is not None:
            rec["grad_norm"] = float(_full(result.grad_norm))
        rec["elapsed"] = round(state.elapsed, 2)
        if mfu is not None:
            rec["mfu"] = mfu
        self.metrics.write({**rec, **extra})
        self.log(
            f"step {state.step:>6} | loss {loss:.4f} | lr {lr:.2e} | {rate:,.0f} tok/s"
            + (f" | grad norm {rec['grad_norm']:.3g}" if "grad_norm" in rec else "")
            + (f" | MFU {100 * mfu:4.1f}%" if mfu is not None else "")
            + f" | {100 * p:5.1f}% | ETA {fmt_time(eta)}"
            + moe.describe(extra)
        )

    def skipped(self, state: RunState, loss: float, grad_norm: float, in_row: int) -> None:
        """A step whose loss or gradient was not finite: its optimizer step was skipped."""
        self.metrics.write({"step": state.step, "loss": loss, "grad_norm": grad_norm, "skipped": True})
        self.log(
            f"step {state.step:>6} | loss {loss} | grad norm {grad_norm} | not finite: optimizer step skipped "
            f"({in_row} in a row; the run stops at {NONFINITE_LIMIT})"
        )

    def eval(self, state: RunState, res: dict, line: str) -> None:
        self.metrics.write({**res, "step": state.step, "tokens": state.tokens, "elapsed": round(state.elapsed, 2)})
        self.log(f"eval step {state.step}: {line}")

    def close(self) -> None:
        self.metrics.close()


def validate(task: Task, setup: Setup, state: RunState, report: Reporter) -> dict:
    """Evaluate (every rank: a sharded model needs them all), report, and show a sample when the model can
    generate alone. Returns the task's validation metrics."""
    res = task.evaluate(setup.model, setup.device, setup.autocast, forward=setup.compiled)
    report.eval(state, res, task.format_eval(res))
    tc = report.tc
    if tc.sample_tokens and setup.parallel.can_generate:
        setup.model.eval()
        with setup.autocast():
            sample = task.sample(setup.model, state.step)
        setup.model.train()
        report.log("sample: " + sample.strip("\n")[:600])
    return res


def save(setup: Setup, state: RunState, run_dir: Path, tc, val_loss: float | None = None) -> None:
    """Write a checkpoint of the run: sharded under FSDP (every rank writes its part; with async_checkpoint in
    the background, counted once complete), else rank 0 writes the full state (DDP: every rank holds it; one
    process)."""
    state.note_val_loss(val_loss)
    trainer_state = {
        **state.to_dict(),
        "scaler": setup.scaler.state_dict() if setup.scaler is not None else {},
        "rng": global_rng_state(),
    }
    if setup.checkpointer is not None:  # each rank writes its own shards, nothing is gathered; maybe in background
        keep = tc.keep_checkpoints
        setup.checkpointer.save(run_dir, setup.model, setup.optimizers, trainer_state, keep, val_loss)
        return
    trainer_state["optimizers"] = [setup.parallel.full_optimizer_state(o) for o in setup.optimizers]
    full_model = setup.parallel.full_model()
    if setup.parallel.is_main:
        save_checkpoint(run_dir, full_model, trainer_state, keep=tc.keep_checkpoints, val_loss=val_loss)
    setup.parallel.barrier()


def restore(setup: Setup, saved: dict, run_dir: Path, log) -> RunState:
    """Load a checkpoint's trainer state (the weights are in already): optimizers (a sharded checkpoint's are in
    already too), scaler, RNGs, the run state."""
    for opt, sd in zip(setup.optimizers, saved.get("optimizers", [])):
        setup.parallel.load_optimizer_state(opt, sd)
    if setup.scaler is not None and saved.get("scaler"):
        setup.scaler.load_state_dict(saved["scaler"])
    set_global_rng_state(saved["rng"])
    state = RunState.from_dict(saved)
    if setup.parallel.is_main:
        truncate_metrics(run_dir / METRICS, state.step)
        remove_stale_temporaries(run_dir)
    log(f"resuming {run_dir} at step {state.step} ({state.tokens:,} tokens, {state.elapsed:.0f}s)")
    return state
