"""What the training loop trains on: a task provides the data, batches, loss, evaluation and samples of a
model family, so the loop is the same for every family.

    Task          the contract (a `typing.Protocol`): what the loop may ask of a task
    LMTask        next-token prediction on token shards (decoder-only language models)
    Seq2SeqTask   an encoder–decoder on (source, target) pairs
    SFTTask       chat fine-tuning of a decoder run on conversations (lmforge finetune)
    make_task     the task for a config's model family (and data)

A task does not edit the config it is given: it returns the model config it needs (`task.model_config`,
vocabulary sizes filled in from its tokenizer) and the loop builds and saves the model from that.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import shutil
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ..config import Config, ModelConfig, Seq2SeqConfig, round_up
from ..data.chat import load_chat_template
from ..data.chat_data import (
    DEFAULT_TEMPLATE,
    ChatSource,
    add_template_tokens,
    examples,
    pack,
)
from ..data.pairs import (
    IGNORE,
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
from ..evaluation.chat import evaluate_chats
from ..evaluation.perplexity import ByteCounts, TokenScores, evaluate
from ..evaluation.seq2seq import evaluate_pairs
from ..inference.beam import translate
from ..inference.engine import generate
from ..io import atomic_path, write_json_atomic
from ..models import build_model
from ..models.loss import lm_loss, predicted_tokens, seq2seq_loss, token_cross_entropy
from ..runs import (
    CHAT_TEMPLATE,
    DATA_INFO,
    TOKENIZER,
    WEIGHTS,
    load_config,
    load_tokenizer,
    load_weights,
    read_data_info,
)
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

    def init_model(self, model) -> None:
        """Set a new run's freshly built model's weights (fine-tuning: the base run's); others keep the random init."""
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

    # optional: step_batches(generator, device, accum) -> [batch(...) results] draws a whole step's micro-batches
    # at once (LMTask: world-size independent windows); without it the loop calls `batch` accum times

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
        # the windows of one optimizer step, all ranks and micro-steps together: fixed for the whole run, so a
        # run resumed on another number of processes trains on the same tokens per step (accumulation adapts)
        self.windows_per_step = _windows_per_step(self.tc.tokens_per_step, seq_len, self.tc.batch_size, self.world)
        if resume and self.windows_per_step * seq_len != (self.tc.tokens_per_step or self.windows_per_step * seq_len):
            raise LmforgeError(
                f"cannot resume {run_dir} on {self.world} processes: its steps of {self.tc.tokens_per_step:,} tokens "
                f"({self.tc.tokens_per_step // seq_len} windows of {seq_len}) do not split evenly over them"
            )
        self.tokens_per_step = self.windows_per_step * seq_len
        self.byte_lengths = ByteCounts.of(self.tokenizer, mc.vocab_size)

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

    def init_model(self, model) -> None:
        pass  # pretraining starts from the random init

    def describe(self, model, accum: int) -> list[str]:
        mc, tc = self.model_config, self.tc
        ranks = f" x {self.world} ranks" if self.world > 1 else ""
        return [
            f"model: {model.num_params():,} parameters ({model.num_params(embeddings=False):,} without embeddings), "
            f"{mc.n_layer} layers, d_model {mc.d_model}, context {mc.block_size}",
            f"train: {self.train_data.total:,} tokens; {self.tokens_per_step:,} tokens per step "
            f"({self.windows_per_step} windows of {self.seq_len}: up to {tc.batch_size}{ranks} x {accum} accumulation)",
        ]

    def flops_per_token(self) -> float | None:
        return flops_per_token(self.model_config, self.seq_len)

    def batch(self, generator: torch.Generator, device):
        """((x, y) on device, each (batch_size, seq_len); this rank's predicted tokens: every position of y)."""
        x, y = self.train_data.batch(self.tc.batch_size, self.seq_len, generator, self.rank, self.world)
        return (x.to(device, non_blocking=True), y.to(device, non_blocking=True)), y.numel()

    def step_batches(self, generator: torch.Generator, device, accum: int) -> list:
        """This rank's `accum` micro-batches of one optimizer step, as `batch` returns them.

        The step's `windows_per_step` windows are drawn once (the same on every rank, whatever the number of
        ranks), rank r takes the r-th contiguous share, and splits it into `accum` micro-batches of nearly
        equal size (at most batch_size each). The step's loss is a token mean, so uneven micro-batches are exact.
        """
        starts = self.train_data.draw_starts(self.windows_per_step, self.seq_len, generator)
        share = self.windows_per_step // self.world
        mine = starts[self.rank * share : (self.rank + 1) * share]
        out = []
        for part in np.array_split(mine, accum):
            x, y = self.train_data.windows(part, self.seq_len)
            out.append(((x.to(device, non_blocking=True), y.to(device, non_blocking=True)), y.numel()))
        return out

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


def _windows_per_step(tokens_per_step: int | None, seq_len: int, batch_size: int, world: int) -> int:
    """Windows of seq_len tokens per optimizer step: tokens_per_step / seq_len when that splits evenly over the
    ranks (what a run's config holds once started), else rounded up to whole micro-steps of batch_size x world."""
    micro = batch_size * world
    if tokens_per_step is None:
        return micro
    if tokens_per_step % seq_len == 0 and (tokens_per_step // seq_len) % world == 0:
        return tokens_per_step // seq_len
    return math.ceil(tokens_per_step / (micro * seq_len)) * micro


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
        self.held_out = len(val_pairs)
        self.micro_tokens = max(1, round(tc.batch_size * self.train_data.target_tokens / len(self.train_data)))

    def save_files(self, run_dir: Path) -> None:
        """The tokenizer(s) and where the data came from (new runs)."""
        self.tokenizer.save(run_dir)
        write_json_atomic(run_dir / DATA_INFO, self.info)

    def init_model(self, model) -> None:
        pass  # training starts from the random init

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
            f"{tc.batch_size} pairs x {accum} accumulation per step; "
            f"validation on {_validation_pairs(len(self.val_pairs), self.held_out)}",
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


class SFTTask:
    """Supervised fine-tuning on conversations: a decoder run learns to answer in a chat template.

    New runs start from the base run's weights and tokenizer and keep the base's chat template; otherwise (the
    base has none, or --chat-template gives one) the default or given template's markers are added to the
    tokenizer as special tokens (the embedding and head grow to fit: existing rows unchanged, new rows the mean
    of the existing tokens' rows). Conversations are encoded with
    `chat_data.encode_conversation` (loss on the assistant's tokens, or all with train_on="all"), cut to seq_len
    tokens, and packed several to a row with attention and positions reset at each conversation
    (`segments`), or one to a row when pack is off. Tokens, for the budget, progress and tokens_per_step, are
    the trained (predicted) tokens."""

    def __init__(self, cfg: Config, run_dir: Path, source: ChatSource | None, resume: bool, log=print, dist_info=None):
        tc = cfg.train
        self.tc, self.log = tc, log
        self.rank, self.world = (dist_info.rank, dist_info.world) if dist_info is not None else (0, 1)
        if cfg.family != "decoder":
            raise LmforgeError("chat fine-tuning needs a decoder (language model) run, not a seq2seq one")
        if resume:  # the run holds its own tokenizer and template; the config its vocabulary size
            source = _chat_source_from_info(run_dir)
            self.tokenizer = Tokenizer.from_file(run_dir / TOKENIZER)
            self.template = load_chat_template(run_dir)
            self.model_config, self.base_tokens = cfg.model, None
        else:
            self.tokenizer = load_tokenizer(source.base)
            self.base_tokens = self.tokenizer.vocab_size
            self.template = source.template or load_chat_template(source.base)
            if source.template is not None or self.template is None:  # lmforge's template or the user's, not the base's
                self.template = self.template or DEFAULT_TEMPLATE
                if added := add_template_tokens(self.tokenizer, self.template, source.markers):
                    log(f"added {len(added)} special token(s) for the chat template's markers: {' '.join(added)}")
            vocab = cfg.model.vocab_size
            if self.tokenizer.vocab_size > vocab:
                vocab = round_up(self.tokenizer.vocab_size)
            self.model_config = dataclasses.replace(cfg.model, vocab_size=vocab)
        self.source = source
        mc = self.model_config
        self.seq_len = seq_len = tc.seq_len or mc.block_size
        if seq_len > mc.block_size:
            raise LmforgeError(f"seq_len {seq_len} exceeds the model's block_size {mc.block_size}")
        train, val = source.conversations(tc.val_fraction, tc.seed, log)
        if not val:
            raise LmforgeError("chat fine-tuning needs at least two conversations (one is held out for validation)")
        random.Random(tc.seed).shuffle(train)  # the packing order
        train_ex, truncated, dropped = examples(train, self.template, self.tokenizer, tc.train_on, seq_len)
        if truncated:
            log(f"warning: truncated {truncated} conversation(s) longer than seq_len ({seq_len} tokens)")
        if dropped:
            log(f"warning: left out {dropped} conversation(s) with no trained token within seq_len")
        if not train_ex:
            raise LmforgeError("no training conversation has a token to train on")
        val_ex, _, _ = examples(val, self.template, self.tokenizer, tc.train_on, seq_len)
        pad = self.tokenizer.eos_id
        self.train_windows = pack(train_ex, seq_len, pad, tc.pack)
        self.val_windows = pack(val_ex[: tc.eval_batches * tc.batch_size * 8], seq_len, pad, tc.pack)
        self.val_conversations = [c for c in val if c[-1]["role"] == "assistant"][:SAMPLE_REPLIES]
        self.n_conversations = len(train_ex)
        per_row = self.train_windows.predicted / len(self.train_windows)
        self.micro_tokens = max(1, round(tc.batch_size * per_row)) * self.world

    def save_files(self, run_dir: Path) -> None:
        """The tokenizer (with any role tokens added), the chat template, and what the run was fine-tuned on."""
        self.tokenizer.save(run_dir / TOKENIZER)
        with atomic_path(run_dir / CHAT_TEMPLATE) as tmp:
            Path(tmp).write_text(self.template, encoding="utf-8")
        src = self.source
        if src.demo is not None:
            chat = {"demo": src.demo}
        else:
            chat = {"data": str(Path(src.data).resolve()), "sha256": file_fingerprint(src.data)}
        write_json_atomic(run_dir / DATA_INFO, {"chat": chat, "base": str(Path(src.base).resolve())})

    def init_model(self, model) -> None:
        """The base run's weights, with rows for the added tokens (see load_base_weights)."""
        load_base_weights(model, self.source.base, self.base_tokens, self.tokenizer.vocab_size)

    def describe(self, model, accum: int) -> list[str]:
        mc, tc, w = self.model_config, self.tc, self.train_windows
        return [
            f"model: {model.num_params():,} parameters, {mc.n_layer} layers, d_model {mc.d_model}, "
            f"context {mc.block_size}, vocabulary {mc.vocab_size} (fine-tuning {self.source.base})",
            f"train: {self.n_conversations:,} conversations in {len(w):,} rows of {self.seq_len} "
            f"({'packed' if tc.pack else 'padded'}), {w.predicted:,} trained tokens ({tc.train_on}); "
            f"{tc.batch_size} rows x {accum} accumulation per step",
        ]

    def flops_per_token(self) -> float | None:
        return None  # tokens here are trained tokens, a varying share of the tokens processed

    def batch(self, generator: torch.Generator, device):
        """((x, y, segments or None) on device, each (rows, width); this rank's trained tokens (y != IGNORE))."""
        index = torch.randint(len(self.train_windows), (self.tc.batch_size * self.world,), generator=generator)
        x, y, seg = self.train_windows.rows(index[self.rank :: self.world])
        n = int((y != IGNORE).sum())
        seg = seg.to(device, non_blocking=True) if self.tc.pack else None  # one conversation per row: causal is enough
        return (x.to(device, non_blocking=True), y.to(device, non_blocking=True), seg), n

    def loss(self, model, batch):
        x, y, seg = batch
        logits = model(x, segments=seg)
        return token_cross_entropy(logits, y, "sum", self.tc.label_smoothing), predicted_tokens(y)

    def evaluate(self, model, device, autocast=contextlib.nullcontext, forward=None) -> dict:
        """Loss and next-token accuracy on the held-out conversations' trained tokens (the same rows every time)."""
        forward = forward or model
        scores = TokenScores()
        was_training = model.training
        model.eval()
        w, bs = self.val_windows, self.tc.batch_size
        with torch.no_grad(), autocast():
            for i in range(0, len(w), bs):
                x, y, seg = w.rows(torch.arange(i, min(i + bs, len(w))))
                logits = forward(x.to(device), segments=seg.to(device) if self.tc.pack else None)
                scores.add(logits, y.to(device))
        model.train(was_training)
        n = max(1, scores.tokens)
        return {"val_loss": scores.nats / n, "val_ppl": math.exp(min(scores.nats / n, 50)), "val_acc": scores.top1 / n}

    def format_eval(self, res: dict) -> str:
        return (
            f"val loss {res['val_loss']:.4f} (trained tokens), perplexity {res['val_ppl']:.2f}, "
            f"top-1 {100 * res['val_acc']:.1f}%"
        )

    def sample(self, model, step: int) -> str:
        """Greedy replies to the held-out conversations' last user turn: how many are exactly right, and one."""
        convs = self.val_conversations
        res = evaluate_chats(model, self.tokenizer, self.template, convs, self.tc.sample_tokens)
        k = step % len(convs)
        expected, got = res["replies"][k]
        return (
            f"{round(res['exact'] * len(convs))}/{len(convs)} held-out replies exactly right; "
            f"{convs[k][-2]['content']!r} -> {got!r} (expected {expected!r})"
        )


SAMPLE_REPLIES = 32  # held-out conversations answered at each evaluation


def load_base_weights(model, base_dir: Path, old_tokens: int, new_tokens: int) -> None:
    """Copy the base run's weights into model, whose vocabulary may have grown (ids old_tokens..new_tokens-1 added).

    Rows of existing ids in the token embedding and LM head stay as they were; rows of the added tokens, and of
    any padding rows the model gained, start as the mean of the existing tokens' rows (so a new token begins as
    an average token: no outlier in the embedding, a typical logit in the head)."""
    base = build_model(load_config(base_dir).model)
    load_weights(Path(base_dir) / WEIGHTS, base)
    old = base.state_dict()
    with torch.no_grad():
        for name, param in model.state_dict().items():
            src = old[name]
            if src.shape == param.shape and name not in ("tok_emb.weight", "lm_head.weight"):
                param.copy_(src)
                continue
            if name not in ("tok_emb.weight", "lm_head.weight") or src.shape[1:] != param.shape[1:]:
                raise LmforgeError(f"the base run's {name} {tuple(src.shape)} does not fit {tuple(param.shape)}")
            param[: len(src)] = src
            mean = src[:old_tokens].mean(dim=0)
            param[old_tokens:new_tokens] = mean
            param[len(src) :] = mean


def _chat_source_from_info(run_dir: Path) -> ChatSource:
    """What a fine-tuning run trained on (its data file checked unchanged), from its data.json."""
    info = read_data_info(run_dir)
    chat = info["chat"]
    if "demo" in chat:
        return ChatSource(Path(info["base"]), demo=chat["demo"])
    data = Path(chat.get("data", ""))
    if not data.is_file():
        raise LmforgeError(f"cannot resume {run_dir}: its chat data {data} is gone")
    if file_fingerprint(data) != chat.get("sha256"):
        raise LmforgeError(f"cannot resume {run_dir}: its chat data {data} changed since the run started")
    return ChatSource(Path(info["base"]), data=data)


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


def _validation_pairs(used: int, held_out: int) -> str:
    if used == held_out:
        return f"{used:,} held-out pairs"
    return f"{used:,} of the {held_out:,} held-out pairs (eval_batches x batch_size; raise them to use more)"


def make_task(cfg: Config, run_dir: Path, data, resume: bool, cache_root, log, dist_info=None) -> Task:
    """The task for cfg's model family (chat fine-tuning for a `ChatSource`, or a run that was fine-tuned).

    `cfg` is left as it is: the model to build is `task.model_config`."""
    if isinstance(data, ChatSource) or (resume and "chat" in read_data_info(run_dir)):
        return SFTTask(cfg, run_dir, data, resume, log, dist_info)
    if cfg.family == "seq2seq":
        if dist_info is not None and dist_info.enabled:
            raise LmforgeError("seq2seq training runs in one process for now (no torchrun)")
        return Seq2SeqTask(cfg, run_dir, data, resume, log)
    return LMTask(cfg, run_dir, data, resume, cache_root, log, dist_info)
