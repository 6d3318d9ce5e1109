"""What the training loop trains on: a task provides the data, batches, loss, evaluation and samples of a
model family, so the loop is the same for every family.

    Task          the contract (a `typing.Protocol`): what the loop may ask of a task
    LMTask        next-token prediction on token shards (decoder-only language models)
    Seq2SeqTask   an encoder–decoder on (source, target) pairs
    make_task     the task for a config's model family

A task does not edit the config it is given: it returns the model config it needs (`task.model_config`,
vocabulary sizes filled in from its tokenizer) and the loop builds and saves the model from that.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from pathlib import Path
from typing import Any, Protocol

import torch

from ..config import Config, ModelConfig, Seq2SeqConfig, round_up
from ..data.pairs import (
    Demo,
    PairBatch,
    PairData,
    PairTokenizer,
    demo,
    encode_pairs,
    file_fingerprint,
    read_pairs,
    split_pairs,
)
from ..data.prepare import ensure_data
from ..data.shards import TokenData
from ..data.tokenizer import Tokenizer
from ..errors import LmforgeError
from ..evaluation.perplexity import evaluate
from ..evaluation.seq2seq import evaluate_pairs
from ..inference.beam import translate
from ..inference.engine import generate
from ..io import write_json_atomic
from ..models.loss import lm_loss, predicted_tokens, seq2seq_loss
from ..runs import DATA_INFO, TOKENIZER, read_data_info
from .distributed import barrier
from .precision import flops_per_token


class Task(Protocol):
    """What the training loop asks of a task. `LMTask` and `Seq2SeqTask` provide it."""

    @property
    def model_config(self) -> ModelConfig | Seq2SeqConfig:
        """The model to build: the run's model config with what the task decides filled in (vocabulary sizes).

        The loop builds the model from it and saves it as the run's config."""
        ...

    @property
    def micro_tokens(self) -> int:
        """Nominal predicted tokens per micro-step, all ranks together: sets the accumulation for tokens_per_step."""
        ...

    def save_files(self, run_dir: Path) -> None:
        """Write what a new run directory needs besides config and weights (tokenizer, where the data is)."""
        ...

    def describe(self, model, accum: int) -> list[str]:
        """Two lines for the start of the log: the model, and the training data and batch shape."""
        ...

    def flops_per_token(self) -> float | None:
        """Training FLOPs per token for MFU, or None when the task does not estimate them."""
        ...

    def batch(self, generator: torch.Generator, device: torch.device) -> tuple[Any, int]:
        """(this rank's next micro-batch, on device; the number of tokens it predicts, counted without a device sync).

        Every rank draws from the same generator state, so the draws stay in step across ranks."""
        ...

    def loss(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(SUM of the token losses of `batch` under `model` (a callable module), number of predicted tokens).

        Both are scalar tensors; the count equals what `batch` reported. The loop divides the sum of a whole
        step (every micro-batch, every rank) by the step's total count: a mean over tokens, not over batches."""
        ...

    def evaluate(self, model, device, autocast=contextlib.nullcontext, forward=None) -> dict:
        """Validation metrics ({"val_loss": ..., ...}) on the same held-out data every time.

        `model` is the plain model; `forward`, when given, is the wrapped or compiled module to run."""
        ...

    def format_eval(self, res: dict) -> str:
        """`evaluate`'s result as one line for the log."""
        ...

    def sample(self, model, step: int) -> str:
        """A short output of the plain model to show progress (a generation, a translation)."""
        ...


class LMTask:
    """Next-token prediction on token shards: the decoder-only language model.

    Under data parallelism (rank, world) each process reads its own share of every batch.
    """

    def __init__(
        self, cfg: Config, run_dir: Path, data, resume: bool, cache_root: str | Path | None, log=print, dist_info=None
    ):
        self.data, self.tc = data, cfg.train
        self.rank, self.world = (dist_info.rank, dist_info.world) if dist_info is not None else (0, 1)
        if resume:  # the run's config already holds the vocabulary size
            self.tokenizer = Tokenizer.from_file(run_dir / TOKENIZER)
            shard_dir = _resume_shard_dir(run_dir)
            self.model_config = cfg.model
        else:
            cache = Path(cache_root) if cache_root else run_dir.parent / "cache"
            if self.rank == 0:
                shard_dir, self.tokenizer = ensure_data(data, cfg.train, cache, log)
            if dist_info is not None:
                barrier(dist_info)
            if self.rank != 0:  # the data is ready now; other ranks just open it
                shard_dir, self.tokenizer = ensure_data(data, cfg.train, cache, lambda *_: None)
            self.model_config = dataclasses.replace(cfg.model, vocab_size=round_up(self.tokenizer.vocab_size))
        self.shard_dir = shard_dir
        mc = self.model_config
        self.seq_len = seq_len = self.tc.seq_len or mc.block_size
        if seq_len > mc.block_size:
            raise LmforgeError(f"seq_len {seq_len} exceeds the model's block_size {mc.block_size}")
        self.train_data = TokenData(shard_dir, "train")
        self.val_data = TokenData(shard_dir, "val")
        self.train_data.check(seq_len, mc.vocab_size)
        if self.val_data.total < 2:
            raise LmforgeError(f"validation split in {shard_dir} is empty")
        self.val_data.check_vocab(mc.vocab_size)
        self.micro_tokens = self.tc.batch_size * seq_len * self.world  # tokens per micro-step, all ranks together
        self.byte_lengths = torch.tensor(
            self.tokenizer.token_byte_lengths() + [0] * (mc.vocab_size - self.tokenizer.vocab_size)
        )

    def save_files(self, run_dir: Path) -> None:
        shard_dir = self.shard_dir
        if (shard_dir / TOKENIZER).is_file():
            shutil.copyfile(shard_dir / TOKENIZER, run_dir / TOKENIZER)
        else:
            self.tokenizer.save(run_dir / TOKENIZER)
        write_json_atomic(
            run_dir / DATA_INFO,
            {"shards": str(shard_dir.resolve()), "data": None if self.data is None else str(self.data)},
        )

    def describe(self, model, accum: int) -> list[str]:
        mc, tc = self.model_config, self.tc
        ranks = f" x {self.world} ranks" if self.world > 1 else ""
        return [
            f"model: {model.num_params():,} parameters ({model.num_params(embeddings=False):,} without embeddings), "
            f"{mc.n_layer} layers, d_model {mc.d_model}, context {mc.block_size}",
            f"train: {self.train_data.total:,} tokens; {accum * self.micro_tokens:,} tokens per step "
            f"({tc.batch_size} x {self.seq_len}{ranks} x {accum} accumulation)",
        ]

    def flops_per_token(self) -> float | None:
        return flops_per_token(self.model_config, self.seq_len)

    def batch(self, generator: torch.Generator, device):
        """((x, y) on device, each (batch_size, seq_len); this rank's predicted tokens: every position of y)."""
        x, y = self.train_data.batch(self.tc.batch_size, self.seq_len, generator, self.rank, self.world)
        return (x.to(device, non_blocking=True), y.to(device, non_blocking=True)), y.numel()

    def loss(self, model, batch):
        x, y = batch
        return lm_loss(model, x, y, "sum", self.tc.label_smoothing), predicted_tokens(y)

    def evaluate(self, model, device, autocast=contextlib.nullcontext, forward=None) -> dict:
        """Validation metrics; `forward` is the wrapped/compiled model to run, when there is one."""
        tc = self.tc
        return evaluate(
            forward or model,
            self.val_data,
            tc.batch_size,
            self.seq_len,
            tc.eval_batches,
            self.byte_lengths,
            device,
            autocast,
        )

    def format_eval(self, res: dict) -> str:
        bpb = f", {res['val_bpb']:.3f} bits/byte" if "val_bpb" in res else ""
        return (
            f"val loss {res['val_loss']:.4f}, perplexity {res['val_ppl']:.2f}{bpb}, "
            f"top-1 {100 * res['val_acc']:.1f}%, top-5 {100 * res['val_top5']:.1f}%"
        )

    def sample(self, model, step: int) -> str:
        tc = self.tc
        return generate(
            model,
            self.tokenizer,
            tc.sample_prompt,
            max_new_tokens=tc.sample_tokens,
            temperature=0.8,
            top_k=50,
            seed=step,
        )


def _resume_shard_dir(run_dir: Path) -> Path:
    """The shard directory a decoder run was trained on, from its data.json."""
    shards = read_data_info(run_dir).get("shards")
    if not isinstance(shards, str):
        raise LmforgeError(f"cannot resume {run_dir}: its {DATA_INFO} does not say where the prepared shards are")
    shard_dir = Path(shards)
    if not shard_dir.is_dir():
        raise LmforgeError(f"cannot resume {run_dir}: its prepared data is gone (expected in {shard_dir})")
    return shard_dir


class Seq2SeqTask:
    """The `Task` of an encoder–decoder run: its data, batches, loss, evaluation and samples.

    DATA is a .jsonl/.tsv file of pairs (split into train/val by `val_fraction`) or a `pairs.Demo`
    (its own train/val split; its test split stays unseen for `lmforge eval --demo`). Tokens, for the
    budget, progress and tokens_per_step, are target tokens (with EOS)."""

    def __init__(self, cfg, run_dir: Path, data, resume: bool, log=print):
        tc, mc = cfg.train, cfg.model
        if tc.seq_len is not None:
            raise LmforgeError(
                "seq_len does not apply to --task seq2seq (sequence lengths come from the pairs, at most model.max_len)"
            )
        self.tc, self.log = tc, log
        if resume:
            data = _data_from_info(run_dir)
        if isinstance(data, Demo):
            train_pairs, val_pairs = data.pairs("train"), data.pairs("val")
            self.info = {"demo": data.name}
        elif data is None:
            raise LmforgeError("seq2seq training needs DATA (a .jsonl or .tsv file of pairs) or --demo NAME")
        else:
            train_pairs, val_pairs = split_pairs(read_pairs(data), tc.val_fraction)
            self.info = {"data": str(Path(data).resolve()), "sha256": file_fingerprint(data)}
        if resume:  # the run's config already holds the vocabulary sizes
            self.tokenizer = PairTokenizer.load(run_dir, mc.shared_vocab)
            self.model_config = mc
        else:
            self.tokenizer = PairTokenizer.train(train_pairs, tc.tokenizer_vocab_size, mc.shared_vocab, tc.split_digits)
            self.model_config = dataclasses.replace(
                mc,
                src_vocab_size=round_up(self.tokenizer.source.vocab_size),
                tgt_vocab_size=round_up(self.tokenizer.target.vocab_size),
            )
        src, tgt, keep = encode_pairs(train_pairs, self.tokenizer, mc.max_len)
        if len(keep) < len(train_pairs):
            log(
                f"warning: left out {len(train_pairs) - len(keep)} training pair(s) longer than max_len "
                f"({mc.max_len} tokens)"
            )
        self.train_data = PairData(src, tgt, self.tokenizer, seed=tc.seed)
        self.val_pairs = val_pairs[: tc.eval_batches * tc.batch_size]  # the same pairs at every evaluation
        self.micro_tokens = max(1, round(tc.batch_size * self.train_data.target_tokens / len(self.train_data)))

    def save_files(self, run_dir: Path) -> None:
        """The tokenizer(s) and where the data came from (new runs)."""
        self.tokenizer.save(run_dir)
        write_json_atomic(run_dir / DATA_INFO, self.info)

    def describe(self, model, accum: int) -> list[str]:
        mc, tc = self.model_config, self.tc
        vocab = (
            f"shared vocabulary {mc.tgt_vocab_size}"
            if mc.shared_vocab
            else f"vocabularies {mc.src_vocab_size} -> {mc.tgt_vocab_size}"
        )
        return [
            f"model: {model.num_params():,} parameters ({model.num_params(embeddings=False):,} without embeddings), "
            f"{mc.n_encoder_layer}+{mc.n_decoder_layer} layers, d_model {mc.d_model}, {vocab}, {mc.norm_position}-norm",
            f"train: {len(self.train_data):,} pairs ({self.train_data.target_tokens:,} target tokens), "
            f"{len(self.val_pairs)} for validation; {tc.batch_size} pairs x {accum} accumulation per step",
        ]

    def flops_per_token(self) -> float | None:
        return None  # not estimated for encoder–decoder models yet

    def batch(self, generator: torch.Generator, device) -> tuple[PairBatch, int]:
        b = self.train_data.batch(self.tc.batch_size, generator)
        return b.to(device), b.target_tokens

    def loss(self, model, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return seq2seq_loss(model, batch, self.tc.label_smoothing, "sum"), predicted_tokens(batch.labels)

    def evaluate(self, model, device, autocast=contextlib.nullcontext, forward=None) -> dict:
        """Validation loss and greedy-decoding scores (decoding needs the plain model, so `forward` is unused)."""
        with autocast():
            res = evaluate_pairs(model, self.tokenizer, self.val_pairs, beam_size=1, warn=self.log)
        return {
            "val_loss": res["loss"],
            "val_exact_match": res["exact_match"],
            "val_bleu": res["bleu"],
            "val_chrf": res["chrf"],
        }

    def format_eval(self, res: dict) -> str:
        return (
            f"val loss {res['val_loss']:.4f}, exact match {100 * res['val_exact_match']:.1f}% (greedy), "
            f"BLEU {res['val_bleu']:.1f}, chrF {res['val_chrf']:.1f}"
        )

    def sample(self, model, step: int) -> str:
        source, target = self.val_pairs[step % len(self.val_pairs)]
        output = translate(model, self.tokenizer, [source], beam_size=1, warn=self.log)[0]
        return f"{source!r} -> {output!r} (expected {target!r})"


def _data_from_info(run_dir: Path):
    """The Demo or the pairs file a run was trained on (checked unchanged), from its data.json."""
    info = read_data_info(run_dir)
    if "demo" in info:
        if not isinstance(info["demo"], str):
            raise LmforgeError(f"cannot resume {run_dir}: its {DATA_INFO} names no demo")
        return demo(info["demo"])
    if not isinstance(info.get("data"), str):
        raise LmforgeError(f"cannot resume {run_dir}: its {DATA_INFO} does not say which pairs file it trained on")
    data = Path(info["data"])
    if not data.is_file():
        raise LmforgeError(f"cannot resume {run_dir}: its data file {data} is gone")
    if file_fingerprint(data) != info.get("sha256"):
        raise LmforgeError(f"cannot resume {run_dir}: its data file {data} changed since the run started")
    return data


def make_task(cfg: Config, run_dir: Path, data, resume: bool, cache_root, log, dist_info=None) -> Task:
    """The task for cfg's model family. `cfg` is left as it is: the model to build is `task.model_config`."""
    if cfg.family == "seq2seq":
        if dist_info is not None and dist_info.enabled:
            raise LmforgeError("seq2seq training runs in one process for now (no torchrun)")
        return Seq2SeqTask(cfg, run_dir, data, resume, log)
    return LMTask(cfg, run_dir, data, resume, cache_root, log, dist_info)
