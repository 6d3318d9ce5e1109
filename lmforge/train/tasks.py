"""What the training loop trains on: a task provides the data, batches, loss, evaluation and samples of a
model family. `LMTask`: next-token prediction on token shards (decoder-only); `Seq2SeqTask`: an
encoder–decoder on pairs."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import torch

from ..config import Config, round_up
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
from ..evaluation.perplexity import ByteCounts, evaluate
from ..evaluation.seq2seq import evaluate_pairs
from ..inference.beam import translate
from ..inference.engine import generate
from ..io import write_json_atomic
from ..models.loss import lm_loss, seq2seq_loss
from ..runs import TOKENIZER
from .distributed import barrier
from .precision import flops_per_token


class LMTask:
    """Next-token prediction on token shards: the decoder-only language model.

    Under data parallelism (rank, world) each process reads its own share of every batch.
    """

    def __init__(
        self, cfg: Config, run_dir: Path, data, resume: bool, cache_root: str | Path | None, log=print, dist_info=None
    ):
        self.cfg, self.data = cfg, data
        self.rank, self.world = (dist_info.rank, dist_info.world) if dist_info is not None else (0, 1)
        if resume:
            self.tokenizer = Tokenizer.from_file(run_dir / TOKENIZER)
            shard_dir = (
                Path(json.loads((run_dir / "data.json").read_text())["shards"])
                if (run_dir / "data.json").is_file()
                else None
            )
            if shard_dir is None or not shard_dir.is_dir():
                raise LmforgeError(f"cannot resume {run_dir}: its prepared data is gone (expected in {shard_dir})")
        else:
            cache = Path(cache_root) if cache_root else run_dir.parent / "cache"
            if self.rank == 0:
                shard_dir, self.tokenizer = ensure_data(data, cfg.train, cache, log)
            if dist_info is not None:
                barrier(dist_info)
            if self.rank != 0:  # the data is ready now; other ranks just open it
                shard_dir, self.tokenizer = ensure_data(data, cfg.train, cache, lambda *_: None)
            cfg.model.vocab_size = round_up(self.tokenizer.vocab_size)
        self.shard_dir = shard_dir
        tc = cfg.train
        self.seq_len = seq_len = tc.seq_len or cfg.model.block_size
        if seq_len > cfg.model.block_size:
            raise LmforgeError(f"seq_len {seq_len} exceeds the model's block_size {cfg.model.block_size}")
        self.train_data = TokenData(shard_dir, "train")
        self.val_data = TokenData(shard_dir, "val")
        self.train_data.check(seq_len, cfg.model.vocab_size)
        if self.val_data.total < 2:
            raise LmforgeError(f"validation split in {shard_dir} is empty")
        self.micro_tokens = tc.batch_size * seq_len * self.world  # tokens per micro-step, all ranks together
        self.byte_lengths = ByteCounts.of(self.tokenizer, cfg.model.vocab_size)

    def save_files(self, run_dir: Path) -> None:
        shard_dir = self.shard_dir
        shutil.copyfile(shard_dir / TOKENIZER, run_dir / TOKENIZER) if (
            shard_dir / TOKENIZER
        ).is_file() else self.tokenizer.save(run_dir / TOKENIZER)
        write_json_atomic(
            run_dir / "data.json",
            {"shards": str(shard_dir.resolve()), "data": None if self.data is None else str(self.data)},
        )

    def describe(self, model, accum: int) -> list[str]:
        cfg, tc = self.cfg, self.cfg.train
        ranks = f" x {self.world} ranks" if self.world > 1 else ""
        return [
            f"model: {model.num_params():,} parameters ({model.num_params(embeddings=False):,} without embeddings), "
            f"{cfg.model.n_layer} layers, d_model {cfg.model.d_model}, context {cfg.model.block_size}",
            f"train: {self.train_data.total:,} tokens; {accum * self.micro_tokens:,} tokens per step "
            f"({tc.batch_size} x {self.seq_len}{ranks} x {accum} accumulation)",
        ]

    def flops_per_token(self) -> float | None:
        return flops_per_token(self.cfg.model, self.seq_len)

    def batch(self, generator: torch.Generator, device):
        """((x, y) on device, number of predicted tokens across all ranks)."""
        x, y = self.train_data.batch(self.cfg.train.batch_size, self.seq_len, generator, self.rank, self.world)
        return (x.to(device, non_blocking=True), y.to(device, non_blocking=True)), y.numel() * self.world

    def loss(self, model, batch):
        return lm_loss(model, *batch, label_smoothing=self.cfg.train.label_smoothing)

    def evaluate(self, model, device, autocast=contextlib.nullcontext, forward=None) -> dict:
        """Validation metrics; `forward` is the wrapped/compiled model to run, when there is one."""
        tc = self.cfg.train
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
        return f"val loss {res['val_loss']:.4f}, perplexity {res['val_ppl']:.2f}{bpb}"

    def sample(self, model, step: int) -> str:
        tc = self.cfg.train
        return generate(
            model,
            self.tokenizer,
            tc.sample_prompt,
            max_new_tokens=tc.sample_tokens,
            temperature=0.8,
            top_k=50,
            seed=step,
        )


DATA_INFO = "data.json"


class Seq2SeqTask:
    """What `training.train` needs for an encoder–decoder run: its data, batches, loss, evaluation and samples.

    DATA is a .jsonl/.tsv file of pairs (split into train/val by `val_fraction`) or a `pairs.Demo`
    (its own train/val split; its test split stays unseen for `lmforge eval --demo`). Tokens, for the
    budget, progress and tokens_per_step, are target tokens (with EOS)."""

    def __init__(self, cfg, run_dir: Path, data, resume: bool, log=print):
        tc, mc = cfg.train, cfg.model
        if tc.seq_len is not None:
            raise LmforgeError(
                "seq_len does not apply to --task seq2seq (sequence lengths come from the pairs, at most model.max_len)"
            )
        self.cfg, self.log = cfg, log
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
        if resume:
            self.tokenizer = PairTokenizer.load(run_dir, mc.shared_vocab)
        else:
            self.tokenizer = PairTokenizer.train(train_pairs, tc.tokenizer_vocab_size, mc.shared_vocab, tc.split_digits)
            mc.src_vocab_size = round_up(self.tokenizer.source.vocab_size)
            mc.tgt_vocab_size = round_up(self.tokenizer.target.vocab_size)
        src, tgt, keep = encode_pairs(train_pairs, self.tokenizer, mc.max_len)
        if len(keep) < len(train_pairs):
            log(
                f"warning: left out {len(train_pairs) - len(keep)} training pair(s) longer than max_len ({mc.max_len} tokens)"
            )
        self.train_data = PairData(src, tgt, self.tokenizer, seed=tc.seed)
        self.val_pairs = val_pairs[: tc.eval_batches * tc.batch_size]  # the same pairs at every evaluation
        self.held_out = len(val_pairs)
        self.micro_tokens = max(1, round(tc.batch_size * self.train_data.target_tokens / len(self.train_data)))

    def save_files(self, run_dir: Path) -> None:
        """The tokenizer(s) and where the data came from (new runs)."""
        self.tokenizer.save(run_dir)
        write_json_atomic(run_dir / DATA_INFO, self.info)

    def describe(self, model, accum: int) -> list[str]:
        mc, tc = self.cfg.model, self.cfg.train
        vocab = (
            f"shared vocabulary {mc.tgt_vocab_size}"
            if mc.shared_vocab
            else f"vocabularies {mc.src_vocab_size} -> {mc.tgt_vocab_size}"
        )
        return [
            f"model: {model.num_params():,} parameters ({model.num_params(embeddings=False):,} without embeddings), "
            f"{mc.n_encoder_layer}+{mc.n_decoder_layer} layers, d_model {mc.d_model}, {vocab}, {mc.norm_position}-norm",
            f"train: {len(self.train_data):,} pairs ({self.train_data.target_tokens:,} target tokens), "
            f"{tc.batch_size} pairs x {accum} accumulation per step; "
            f"validation on {_validation_pairs(len(self.val_pairs), self.held_out)}",
        ]

    def batch(self, generator: torch.Generator, device) -> tuple[PairBatch, int]:
        b = self.train_data.batch(self.cfg.train.batch_size, generator)
        return b.to(device), b.target_tokens

    def loss(self, model, batch: PairBatch) -> torch.Tensor:
        return seq2seq_loss(model, batch, self.cfg.train.label_smoothing)

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
    path = run_dir / DATA_INFO
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise LmforgeError(f"cannot resume {run_dir}: unreadable {path} ({e})") from None
    if "demo" in info:
        return demo(info["demo"])
    data = Path(info.get("data", ""))
    if not data.is_file():
        raise LmforgeError(f"cannot resume {run_dir}: its data file {data} is gone")
    if file_fingerprint(data) != info.get("sha256"):
        raise LmforgeError(f"cannot resume {run_dir}: its data file {data} changed since the run started")
    return data


def _validation_pairs(used: int, held_out: int) -> str:
    if used == held_out:
        return f"{used:,} held-out pairs"
    return f"{used:,} of the {held_out:,} held-out pairs (eval_batches x batch_size; raise them to use more)"


def make_task(cfg: Config, run_dir: Path, data, resume: bool, cache_root, log, dist_info=None):
    """The task object for cfg's model family (see LMTask for what a task provides)."""
    if cfg.family == "seq2seq":
        if dist_info is not None and dist_info.enabled:
            raise LmforgeError("seq2seq training runs in one process for now (no torchrun)")
        return Seq2SeqTask(cfg, run_dir, data, resume, log)
    return LMTask(cfg, run_dir, data, resume, cache_root, log, dist_info)
