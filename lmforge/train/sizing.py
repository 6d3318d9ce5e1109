"""How big a training run is, before it runs: `lmforge train ... --dry-run`.

    DistEnv          the processes a run would have: world size, backend, local ranks (torchrun's environment
                     variables, or a world size asked for with --world-size without launching anything)
    size_run         the run's numbers (a `Sizing`): parameters (total and active), bytes per rank of weights,
                     autocast copies, gradients, optimizer state and activations; tokens per step and
                     accumulation; checkpoint sizes
    activation_bytes the activation formula (bytes kept for the backward pass of one micro-batch)
    format_sizing    the lines the CLI prints

The model is built on PyTorch's meta device (shapes, no storage), so a 70B configuration costs nothing;
nothing reads or tokenizes the data and nothing is written. Memory figures are estimates of what stays
allocated during a training step (what the allocator and the communication libraries add on top is not
counted); parameter counts and the tokens of a step are exact.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import Config, ModelConfig, round_up
from ..errors import LmforgeError
from .checkpoint import without_tied_aliases

FP32 = 4  # bytes: master weights, gradients and optimizer state stay fp32 under autocast


@dataclass
class DistEnv:
    """The processes of a run, as this process sees them (or as asked for)."""

    world: int = 1
    rank: int = 0
    local_world: int = 1  # processes per node
    backend: str = "none"  # gloo (CPU) | nccl (CUDA) | none (one process)
    source: str = "one process"  # where the numbers come from

    @property
    def nodes(self) -> int:
        return math.ceil(self.world / max(1, self.local_world))


def dist_env(device_type: str, world_size: int | None = None, environ=None) -> DistEnv:
    """The distributed environment for a run on device_type ("cpu", "cuda", ...).

    world_size (--world-size N) asks "what if N processes" without launching them: one node of N local ranks
    (or LOCAL_WORLD_SIZE of them, if set). Otherwise torchrun's WORLD_SIZE, RANK, LOCAL_WORLD_SIZE are read;
    plain `python` (no WORLD_SIZE) is one process. The backend is what `distributed.init_distributed`
    would pick: NCCL on CUDA, gloo otherwise. Raises LmforgeError for a world size below 1.
    """
    env = os.environ if environ is None else environ
    backend = "nccl" if device_type == "cuda" else "gloo"
    if world_size is not None:
        if world_size < 1:
            raise LmforgeError(f"--world-size must be at least 1 (got {world_size})")
        local = int(env.get("LOCAL_WORLD_SIZE", world_size))
        how = f"asked for with --world-size {world_size}, not launched"
        return DistEnv(world_size, 0, min(local, world_size), backend if world_size > 1 else "none", how)
    world = int(env.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    local = int(env.get("LOCAL_WORLD_SIZE", world))
    return DistEnv(world, int(env.get("RANK", "0")), local, backend, "torchrun's environment")


@dataclass
class Sizing:
    """The numbers of a run. Bytes are per rank unless named otherwise."""

    params: int  # total (tied weights once)
    active_params: int  # used for each token (MoE: only the top_k experts of each layer)
    env: DistEnv
    device: str
    precision: str  # fp32 | bf16 | fp16 (autocast)
    parallel: str  # one process | ddp | fsdp
    optimizer: str
    weights: int  # fp32 parameters this rank holds (FSDP: its shard)
    autocast_copies: int  # bf16/fp16 copies of the matmul weights, kept from forward to backward
    gradients: int  # fp32 (DDP: plus its communication buckets, one more copy)
    optimizer_state: int  # AdamW: exp_avg + exp_avg_sq; Muon: one momentum for hidden matrices
    activations: int | None  # one micro-batch's, at its peak (None: not estimated for this family)
    fsdp_buffers: int  # FSDP: the unsharded parameters and gradients of the units being computed
    async_staging: int  # async_checkpoint (FSDP): the host copy of this rank's shards while a save is in flight
    micro_batch: int  # sequences per micro-batch on a rank
    seq_len: int
    tokens_per_step: int | None  # all ranks together (None: depends on the data, seq2seq)
    accum: int | None  # micro-batches per optimizer step
    checkpoint_full: int  # one process / DDP: model.safetensors + trainer_state.pt
    checkpoint_sharded: int  # FSDP (DCP): all shard files together (a tied weight once)
    checkpoint_shard: int  # FSDP: one rank's shard file (rank 0's)
    model_line: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        parts = (self.weights, self.autocast_copies, self.gradients, self.optimizer_state, self.fsdp_buffers)
        return sum(parts) + self.async_staging + (self.activations or 0)


def size_run(cfg: Config, env: DistEnv, device: torch.device, precision: str, vocab_note: str = "") -> Sizing:
    """The Sizing of training cfg (its model config already holding the run's vocabulary) with env's processes.

    device and precision are the resolved ones (`precision.choose_precision`). Under FSDP (more than one
    process, parallel "fsdp") weights, gradients and optimizer state are divided over the ranks as FSDP2
    shards them: dim 0 of every parameter, padded to a multiple of the world size (rank 0's share is counted).
    """
    from ..models import build_model

    mc, tc = cfg.model, cfg.train
    with torch.device("meta"):
        model = build_model(mc)
    params = model.num_params()
    active = model.num_active_params() if hasattr(model, "num_active_params") else params
    world = env.world
    parallel = tc.parallel if world > 1 else "one process"
    sharded = parallel == "fsdp"
    unique = {id(p): p for p in model.parameters()}.values()
    per_rank = sum(_shard_numel(p, world if sharded else 1) for p in unique)
    optim_numel = _optimizer_state_numel(model, tc.optimizer, world if sharded else 1)
    copies = autocast_copy_bytes(model, precision, tc.activation_checkpointing)
    notes = [vocab_note] if vocab_note else []

    seq_len = (tc.seq_len or mc.block_size) if isinstance(mc, ModelConfig) else mc.max_len
    if isinstance(mc, ModelConfig):
        from .tasks import _windows_per_step

        windows = _windows_per_step(tc.tokens_per_step, seq_len, tc.batch_size, world)
        accum = math.ceil(windows / (tc.batch_size * world))
        micro = math.ceil(windows / world / accum)  # the largest micro-batch of a step
        tokens_per_step = windows * seq_len
        activations = activation_bytes(mc, micro, seq_len, precision, tc.activation_checkpointing)
        notes += _approximations(mc)
    else:
        micro, tokens_per_step, accum, activations = tc.batch_size, None, None, None
        notes.append("seq2seq: tokens per step, accumulation and activations depend on the pairs (not read here)")

    # a sharded checkpoint stores each tensor once: a tied weight under its first name only
    named = list(without_tied_aliases(model.state_dict(), model).values())
    sharded_numel = sum(t.numel() for t in named)
    shard_numel = sum(_shard_numel(t, world) for t in named) if sharded else 0
    grads = per_rank * FP32 * (2 if parallel == "ddp" else 1)
    fsdp = _fsdp_buffers(model) if sharded else 0
    full_optim = _optimizer_state_numel(model, tc.optimizer, 1) * FP32
    shard_optim = optim_numel * FP32
    return Sizing(
        params=params,
        active_params=active,
        env=env,
        device=str(device),
        precision=precision,
        parallel=parallel,
        optimizer=tc.optimizer,
        weights=per_rank * FP32,
        autocast_copies=copies,
        gradients=grads,
        optimizer_state=shard_optim,
        activations=activations,
        fsdp_buffers=fsdp,
        async_staging=(per_rank * FP32 + shard_optim) if sharded and tc.async_checkpoint else 0,
        micro_batch=micro,
        seq_len=seq_len,
        tokens_per_step=tokens_per_step,
        accum=accum,
        checkpoint_full=params * FP32 + full_optim,
        checkpoint_sharded=sharded_numel * FP32 + full_optim,
        checkpoint_shard=shard_numel * FP32 + shard_optim if sharded else 0,
        model_line=_model_line(mc),
        notes=notes,
    )


def _shard_numel(p: torch.Tensor, world: int) -> int:
    """Elements of p on rank 0 when FSDP2 shards dim 0 over world ranks (chunks of ceil(rows / world) rows)."""
    if world <= 1 or p.dim() == 0:
        return p.numel()
    rows = p.shape[0]
    return min(rows, math.ceil(rows / world)) * (p.numel() // max(1, rows))


def _optimizer_state_numel(model, optimizer: str, world: int) -> int:
    """fp32 elements of optimizer state on one rank: AdamW keeps two per parameter (exp_avg, exp_avg_sq);
    Muon one momentum per hidden-matrix element, the rest of the parameters AdamW's two."""
    from .optim import split_parameters

    groups = split_parameters(model)
    adam = [p for name in ("embed", "head", "other") for p in groups[name]]
    hidden = sum(_shard_numel(p, world) for p in groups["hidden"])
    rest = sum(_shard_numel(p, world) for p in adam)
    return (hidden + 2 * rest) if optimizer == "muon" else 2 * (hidden + rest)


def _matmul_weights(model) -> list[torch.Tensor]:
    """The weights autocast casts for matrix multiplies: every nn.Linear weight (a tied head's once)."""
    seen = {}
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            seen[id(m.weight)] = m.weight
    return list(seen.values())


def _fsdp_buffers(model) -> int:
    """FSDP2's unsharded working set (fp32): the root unit's parameters (embeddings, head, final norm: gathered
    for the forward and again for the backward), two blocks' parameters (the one computing and the next,
    prefetched) and one block's unsharded gradients before they are reduce-scattered. An estimate."""
    blocks = list(model.blocks) if hasattr(model, "blocks") else []
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    root = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if id(p) not in in_blocks)
    block = max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0)
    return (root + 3 * block) * FP32


def activation_bytes(
    mc: ModelConfig, batch: int, seq_len: int, precision: str, checkpointing: bool = False, peak: bool = True
) -> int:
    """Bytes a decoder LM keeps for its backward pass for one micro-batch of `batch` x `seq_len` tokens, at the
    peak (the start of the backward), per rank.

    Method: count the tensors each operation saves for its backward, as Korthikanti et al. 2022 do for
    Megatron ("Reducing Activation Recomputation in Large Transformer Models", sec. 4.1: 34 s b h bytes per
    layer + 5 a s^2 b for attention scores), but for this model's code: scaled_dot_product_attention keeps no
    (T x T) scores (only q, k, v, its output and a log-sum-exp per head), the residual stream stays fp32 under
    autocast, and an elementwise product with a constant (RoPE's cos and sin) saves only the constant.
    Per token and layer, with d = d_model, f = the feed-forward width, h and kv heads of size hd,
    a = 2 bytes under bf16/fp16 autocast (4 in fp32), r = 4 (the fp32 residual stream):

        norms      LayerNorm r d + 8 (its input; mean and rstd); RMSNorm r d + 4 (normalised output, 1/rms)
        attention  a d (QKV input) + a d (attention output) + 4 h (log-sum-exp)
                   + a h hd for each of q, k, v that reaches attention as a new tensor (q and k rotated by
                   RoPE; k and v repeated to h heads for grouped-query), + a (h + 2 kv) hd for the QKV
                   output if any of them is still a view of it
        MLP        a (d + 2 f); gated (SwiGLU, GeGLU) a (2 d + 4 f) under autocast (the input is cast once
                   per projection), a (d + 4 f) in fp32
        MoE        k x that MLP at the expert width + (r + a) k d (dispatched inputs, weighted outputs)
                   + 8 E (router logits and probabilities, fp32), + one MLP for a shared expert
        value      (value_residual) every layer keeps its QKV output (the mixing saves v and v_1, views of it),
        residual   and the mixed v of the later layers reaches attention as a new tensor

    once per token: the final norm, the head's input (a d), the fp32 softmax kept by the loss (4 V),
    token ids and targets (17 bytes); with RoPE, the cos and sin tables (4 hd per position); and at the
    start of the backward (peak=True; peak=False counts what the forward saves), under autocast the logits'
    gradient in 16 bits (a V; the fp32 gradient overwrites the saved softmax) and, with activation
    checkpointing (where a layer keeps only its input, r d, and with value residual the first layer's QKV
    output, v_1's storage), the one layer being recomputed. Checked against the tensors real forward
    passes save, in tests/test_sizing.py. Approximated (see `_approximations`): QK-norm, attention softcap;
    not counted: dropout masks. Autocast's copies of the
    weights are not activations: see `autocast_copy_bytes`.
    """
    a = 2 if precision in ("bf16", "fp16") else 4
    r = FP32
    d, h, kv, hd = mc.d_model, mc.n_head, mc.kv_heads, mc.head_dim
    norm = (r * d + 4) if mc.norm == "rmsnorm" else (r * d + 8)
    rope, grouped = mc.pos == "rope", kv < h
    qkv_out = a * (h + 2 * kv) * hd

    def attention(mixed: bool) -> int:  # mixed: values mixed with v_1 (value residual, layers after the first)
        new = (rope, rope or grouped, grouped or mixed)  # q, k, v: a new tensor (not a view of the QKV output)
        kept = mc.value_residual or not all(new)  # the QKV output itself stays (a view of it is saved)
        return a * 2 * d + 4 * h + a * h * hd * sum(new) + (qkv_out if kept else 0)

    extra = 0
    if mc.qk_norm:  # approximation: both norms' fp32 inputs and outputs
        extra += (r + 2 * a) * (h + kv) * hd
    if mc.attn_softcap is not None:  # approximation: the explicit (T x T) scores, a few fp32 copies
        extra += 3 * 4 * h * seq_len
    gated = mc.mlp in ("swiglu", "geglu")

    def mlp(width: int) -> int:
        return a * ((2 if gated and a < 4 else 1) * d + (4 if gated else 2) * width)

    dense = mlp(mc.ff_dim)
    moe = 0
    if mc.moe_experts:
        k, e = mc.moe_top_k, mc.moe_experts
        moe = k * mlp(mc.expert_dim) + (r + a) * k * d + 8 * e + (mlp(mc.expert_dim) if mc.moe_shared_expert else 0)
    layers = [
        2 * norm + attention(mc.value_residual and i > 0) + extra + (moe if mc.is_moe_layer(i) else dense)
        for i in range(mc.n_layer)
    ]
    head = norm + a * d + 4 * mc.vocab_size + 17
    if peak and a < 4:
        head += a * mc.vocab_size
    if checkpointing:
        per_token = mc.n_layer * r * d + (qkv_out if mc.value_residual else 0) + (max(layers) if peak else 0) + head
    else:
        per_token = sum(layers) + head
    tables = 2 * seq_len * (hd // 2) * 4 if rope else 0
    return batch * seq_len * per_token + tables


def autocast_copy_bytes(model, precision: str, checkpointing: bool = False) -> int:
    """Bytes of the bf16/fp16 copies autocast makes of the weights of matrix multiplies (each nn.Linear weight,
    a tied head's once), kept from the forward to the backward: the whole model in 16 bits, also under FSDP
    (each rank casts the gathered full weights). With activation checkpointing only the blocks' copies of the
    one block being recomputed exist at a time. fp32: 0."""
    if precision not in ("bf16", "fp16"):
        return 0
    blocks = list(getattr(model, "blocks", []))
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    weights = _matmul_weights(model)
    outside = sum(w.numel() for w in weights if id(w) not in in_blocks)
    per_block = [sum(m.weight.numel() for m in b.modules() if isinstance(m, torch.nn.Linear)) for b in blocks]
    inside = max(per_block, default=0) if checkpointing else sum(per_block)
    return 2 * (outside + inside)


def _approximations(mc: ModelConfig) -> list[str]:
    out = []
    if mc.qk_norm or mc.attn_softcap is not None:
        out.append("activations approximate: qk_norm / attn_softcap are estimated, not counted exactly")
    if mc.dropout > 0:
        out.append("activations: dropout masks are not counted")
    return out


def _model_line(mc) -> str:
    if isinstance(mc, ModelConfig):
        moe = f", {mc.moe_experts} experts (top {mc.moe_top_k})" if mc.moe_experts else ""
        return f"{mc.n_layer} layers, d_model {mc.d_model}, {mc.n_head} heads, context {mc.block_size}{moe}"
    return f"seq2seq {mc.n_encoder_layer}+{mc.n_decoder_layer} layers, d_model {mc.d_model}, max_len {mc.max_len}"


# --- what the CLI asks ----------------------------------------------------------------------------


def dry_run(cfg: Config, data=None, world_size: int | None = None, resume: Path | None = None, log=print) -> Sizing:
    """Size the run `lmforge train` would start (or resume) and print it, building, reading and writing nothing.

    The vocabulary: a resumed run's config holds it; a directory of prepared shards has its tokenizer.json (read,
    it is small); for raw text lmforge would train a tokenizer of tokenizer_vocab_size tokens, rounded up to a
    multiple of 64 (fewer if the text is small). Under torchrun only rank 0 prints.
    Raises LmforgeError for an invalid config or world size."""
    from .precision import choose_precision

    cfg.validate()
    cfg, vocab_note = _with_vocabulary(cfg, data, resume)
    device, unavailable = _device(cfg.train.device)
    env = dist_env(device.type, world_size)
    if unavailable and cfg.train.precision == "auto":
        precision = "bf16"  # what a current GPU would pick
    else:
        precision = choose_precision(cfg.train.precision, device)
    sizing = size_run(cfg, env, device, precision, vocab_note)
    if unavailable:
        sizing.device += " (not available on this machine)"
    if env.rank == 0:
        for line in format_sizing(sizing):
            log(line)
    return sizing


def _device(name: str) -> tuple[torch.device, bool]:
    """(the device a run would use, whether it is only hypothetical here: asked for but not available)."""
    from ..machine import pick_device

    try:
        return pick_device(name), False
    except LmforgeError as absent:
        try:  # a device torch knows, absent here (sizing a GPU run on a laptop)
            return torch.device(name), True
        except (RuntimeError, TypeError):  # a name torch does not know: pick_device's own error
            raise absent from None


def _with_vocabulary(cfg: Config, data, resume) -> tuple[Config, str]:
    mc, tc = cfg.model, cfg.train
    if resume is not None or not isinstance(mc, ModelConfig):
        if not isinstance(mc, ModelConfig) and resume is None:
            vocab = round_up(tc.tokenizer_vocab_size)
            mc = dataclasses.replace(mc, src_vocab_size=vocab, tgt_vocab_size=vocab)
            note = f"vocabularies from tokenizer_vocab_size {tc.tokenizer_vocab_size} (rounded up to 64)"
            return dataclasses.replace(cfg, model=mc), note
        return cfg, ""
    from ..data.prepare import TOKENIZER, shard_paths

    if data is not None and Path(str(data)).is_dir() and shard_paths(data, "train"):
        from ..data.tokenizer import Tokenizer

        tok = Tokenizer.from_file(Path(data) / TOKENIZER)
        note = f"vocabulary from {Path(data) / TOKENIZER} ({tok.vocab_size} tokens, rounded up to 64)"
        return dataclasses.replace(cfg, model=dataclasses.replace(mc, vocab_size=round_up(tok.vocab_size))), note
    vocab = round_up(tc.tokenizer_vocab_size)
    note = f"vocabulary {vocab}: the {tc.tokenizer_vocab_size}-token tokenizer lmforge trains, rounded up to 64"
    return dataclasses.replace(cfg, model=dataclasses.replace(mc, vocab_size=vocab)), note


def _gb(n: int) -> str:
    return f"{n / 1e9:,.2f} GB" if n >= 1e9 else f"{n / 1e6:,.1f} MB"


def format_sizing(s: Sizing) -> list[str]:
    """The dry run's report, a line per fact."""
    e = s.env
    if e.world > 1:
        nodes = f"{e.nodes} node{'s' if e.nodes > 1 else ''} x {e.local_world} local ranks"
        procs = f"{e.world} ({e.source}): {nodes}, backend {e.backend}, {s.parallel}"
    else:
        procs = f"1 ({e.source}: no torchrun environment; --world-size N sizes N processes without launching them)"
    half = s.precision in ("bf16", "fp16")
    shard = f", 1/{e.world} shard" if s.parallel == "fsdp" else ""
    opt = "exp_avg + exp_avg_sq" if s.optimizer == "adamw" else "momentum (hidden matrices), AdamW's two (the rest)"
    lines = [
        "dry run: the model on the meta device, no data read, no run directory written",
        f"model       {s.params:,} parameters, {s.active_params:,} active per token; {s.model_line}",
        f"processes   {procs}",
        f"device      {s.device}, {s.precision}" + (" autocast (fp32 master weights)" if half else ""),
    ]
    if s.tokens_per_step is not None:
        ranks = f" x {e.world} ranks" if e.world > 1 else ""
        lines.append(
            f"step        {s.tokens_per_step:,} tokens = up to {s.micro_batch} x {s.seq_len} tokens{ranks} "
            f"x {s.accum} accumulation"
        )
    rows = [
        ("weights", s.weights, f"fp32{shard}"),
        (f"{s.precision} copies", s.autocast_copies, "autocast's casts of the matmul weights, whole on every rank")
        if half
        else None,
        (
            "gradients",
            s.gradients,
            f"fp32{shard}" + (" + DDP's buckets (a second copy)" if s.parallel == "ddp" else ""),
        ),
        ("optimizer", s.optimizer_state, f"{s.optimizer}: {opt}{shard}"),
        ("FSDP buffers", s.fsdp_buffers, "unsharded: the root unit, 2 blocks' weights, 1 block's gradients")
        if s.parallel == "fsdp"
        else None,
        ("async save", s.async_staging, "host copy of this rank's shards while a save is in flight")
        if s.async_staging
        else None,
        ("activations", s.activations, f"up to {s.micro_batch} x {s.seq_len} tokens, at the start of the backward")
        if s.activations is not None
        else None,
    ]
    lines.append("memory per rank (estimate):")
    for row in filter(None, rows):
        lines.append(f"  {row[0]:<13} {_gb(row[1]):>10}  {row[2]}")
    lines.append(f"  {'total':<13} {_gb(s.total):>10}" + ("" if s.activations is not None else "  + activations"))
    weights = s.params * FP32
    if s.parallel == "fsdp":
        shards = f"{e.world} shard files of {_gb(s.checkpoint_shard)}"
        lines.append(f"checkpoint  {_gb(s.checkpoint_sharded)} sharded (weights + optimizer state): {shards}")
        lines.append(f"            RUN/model.safetensors {_gb(weights)}, consolidated when training ends")
    else:
        state = f"trainer_state.pt {_gb(s.checkpoint_full - weights)}"
        lines.append(f"checkpoint  {_gb(s.checkpoint_full)}: model.safetensors {_gb(weights)} + {state}")
        lines.append(f"            RUN/model.safetensors {_gb(weights)}, refreshed at every checkpoint")
    lines += [f"note        {n}" for n in s.notes]
    return lines
