"""Using encoder–decoder models: the loss, greedy and beam-search decoding, evaluation, and the training task.

Decoding runs the encoder once per batch of inputs, projects its output to every decoder layer's
cross-attention keys/values once (`model.new_cache`), then feeds the decoder one token per step with a
KV cache. Both decoders are batched over inputs; beam search keeps `beam_size` hypotheses per input
and scores a finished one by its summed log-probability / length ** length_penalty.
"""

from __future__ import annotations

import contextlib

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import LmforgeError
from .io import write_json_atomic
from .pairs import (IGNORE, Demo, Pair, PairBatch, PairData, PairTokenizer, collate, encode_pairs, file_fingerprint, pad, read_pairs,
                    split_pairs)
from .training import round_up

DATA_INFO = "data.json"


def seq2seq_loss(model, batch: PairBatch, label_smoothing: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the labels under teacher forcing; padded positions are ignored."""
    logits = model(batch.src, batch.tgt_in, batch.src_mask, batch.tgt_mask)
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), batch.labels.view(-1), ignore_index=IGNORE,
                           label_smoothing=label_smoothing, reduction=reduction)


# --- decoding -------------------------------------------------------------------------------------


def _max_new_tokens(model, max_new_tokens: int | None) -> int:
    """Target positions are 0 .. max_len-1 with BOS at 0, so at most max_len tokens (EOS included) can be produced."""
    limit = model.config.max_len
    return limit if max_new_tokens is None else max(1, min(max_new_tokens, limit))


@torch.inference_mode()
def greedy_decode(model, src: torch.Tensor, src_mask: torch.Tensor | None, bos_id: int, eos_id: int,
                  max_new_tokens: int | None = None) -> list[list[int]]:
    """The most likely token at every step, for each input of the batch; EOS ends an output and is not returned."""
    steps = _max_new_tokens(model, max_new_tokens)
    B = src.shape[0]
    cache = model.new_cache(model.encode(src, src_mask), src_mask, steps)
    token = torch.full((B, 1), bos_id, dtype=torch.long, device=src.device)
    done = torch.zeros(B, dtype=torch.bool, device=src.device)
    out = []
    for _ in range(steps):
        token = model.decode(token, cache=cache)[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        out.append(token)
        done |= token[:, 0] == eos_id
        if bool(done.all()):  # the one host sync per step
            break
    rows = torch.cat(out, 1).tolist()
    return [row[: row.index(eos_id)] if eos_id in row else row for row in rows]


@dataclass
class Hypothesis:
    tokens: list[int]  # without BOS and EOS
    score: float  # summed log-probability / length ** length_penalty (length counts the EOS)
    log_prob: float
    finished: bool  # ended with EOS (False: cut at the length limit)


@torch.inference_mode()
def beam_search(model, src: torch.Tensor, src_mask: torch.Tensor | None, bos_id: int, eos_id: int, beam_size: int = 4,
                length_penalty: float = 1.0, max_new_tokens: int | None = None) -> list[list[Hypothesis]]:
    """For each input, up to beam_size hypotheses, best (highest length-normalised score) first.

    Every step extends each live hypothesis by every token and keeps the beam_size best continuations
    that do not end there; a continuation ending in EOS that ranks among the beam_size best is set aside
    as finished (the beam_size best finished ones are kept). An input stops early once it has beam_size
    finished hypotheses and no live one is more probable than the least probable of them: log-probabilities
    only fall as a hypothesis grows, so no later one can be either (stopping at the first beam_size EOS
    instead loses the answer of a confident model to short junk hypotheses). With beam_size 1 this is greedy
    decoding. At the length limit, live hypotheses count as (unfinished) results.
    """
    _check_beam_size(beam_size)
    steps = _max_new_tokens(model, max_new_tokens)
    B, K, device = src.shape[0], beam_size, src.device
    memory = model.encode(src, src_mask).repeat_interleave(K, 0)  # (B*K, S, d_model): every beam of input b reads its memory
    cache = model.new_cache(memory, None if src_mask is None else src_mask.repeat_interleave(K, 0), steps)
    scores = torch.full((B, K), float("-inf"), device=device)
    scores[:, 0] = 0.0  # one live hypothesis (BOS) per input at the start
    token = torch.full((B * K, 1), bos_id, dtype=torch.long, device=device)
    history = [[[] for _ in range(K)] for _ in range(B)]  # tokens of each live hypothesis
    finished: list[list[Hypothesis]] = [[] for _ in range(B)]
    done = [False] * B
    for t in range(steps):
        log_probs = model.decode(token, cache=cache)[:, -1].float().log_softmax(-1)  # (B*K, V)
        V = log_probs.shape[-1]
        candidates = (scores[:, :, None] + log_probs.view(B, K, V)).view(B, K * V)
        top_scores, top_ids = candidates.topk(min(2 * K, K * V), dim=-1)  # 2K: at most K end in EOS, so K live ones remain
        top_scores, top_ids = top_scores.tolist(), top_ids.tolist()  # the one host sync per step
        keep_beam = [[0] * K for _ in range(B)]
        keep_token = [[eos_id] * K for _ in range(B)]
        keep_score = [[float("-inf")] * K for _ in range(B)]
        for b in range(B):
            if done[b]:
                continue
            live = 0
            for rank, (score, idx) in enumerate(zip(top_scores[b], top_ids[b])):
                beam, tok = divmod(idx, V)
                if score == float("-inf"):
                    break
                if tok == eos_id:
                    if rank < K:
                        finished[b].append(Hypothesis(history[b][beam], score / (t + 1) ** length_penalty, score, True))
                    continue
                keep_beam[b][live], keep_token[b][live], keep_score[b][live] = beam, tok, score
                live += 1
                if live == K:
                    break
            finished[b] = sorted(finished[b], key=lambda h: h.score, reverse=True)[:K]
            if len(finished[b]) == K and keep_score[b][0] <= min(h.log_prob for h in finished[b]):
                done[b] = True  # keep_score[b][0] is the best live log-probability
        if all(done):
            break
        history = [[history[b][keep_beam[b][k]] + [keep_token[b][k]] for k in range(K)] for b in range(B)]
        rows = torch.tensor([b * K + k for b in range(B) for k in keep_beam[b]], device=device)
        cache.self_attn.reorder(rows)  # cross-attention keys/values are the same for every beam of an input: they stay
        token = torch.tensor(keep_token, device=device).view(B * K, 1)
        scores = torch.tensor(keep_score, device=device)
    for b in range(B):
        if not done[b]:  # length limit: the live hypotheses are results too
            for k in range(K):
                s = float(scores[b, k])
                if s > float("-inf"):
                    finished[b].append(Hypothesis(history[b][k], s / len(history[b][k]) ** length_penalty, s, False))
    return [sorted(f, key=lambda h: h.score, reverse=True)[:K] for f in finished]


def translate(model, tokenizer: PairTokenizer, sources: list[str], beam_size: int = 4, length_penalty: float = 1.0,
              max_new_tokens: int | None = None, batch_size: int = 64, warn=None) -> list[str]:
    """The best output text for each source (beam_size 1 = greedy). Sources are batched by length."""
    _check_beam_size(beam_size)
    if not sources:
        return []
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    ids = tokenizer.encode_sources(sources)
    limit = model.config.max_len
    too_long = sum(len(s) > limit for s in ids)
    if too_long:
        (warn or _warn)(f"warning: {too_long} source(s) longer than the model's max_len ({limit} tokens) were cut to fit")
        ids = [s if len(s) <= limit else s[: limit - 1] + [tokenizer.src_eos_id] for s in ids]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    outputs: list[str] = [""] * len(ids)
    for i in range(0, len(order), batch_size):
        chunk = order[i: i + batch_size]
        src, src_mask = pad([ids[j] for j in chunk], tokenizer.src_pad_id)
        src, src_mask = src.to(device), src_mask.to(device)
        if beam_size == 1:
            best = greedy_decode(model, src, src_mask, tokenizer.bos_id, tokenizer.eos_id, max_new_tokens)
        else:
            best = [h[0].tokens for h in beam_search(model, src, src_mask, tokenizer.bos_id, tokenizer.eos_id, beam_size,
                                                     length_penalty, max_new_tokens)]
        for j, tokens in zip(chunk, best):
            outputs[j] = tokenizer.decode(tokens)
    model.train(was_training)
    return outputs


def _check_beam_size(beam_size: int) -> None:
    if beam_size < 1:
        raise LmforgeError(f"beam size must be at least 1, got {beam_size}")


def _warn(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr)


# --- evaluation -----------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_pairs(model, tokenizer: PairTokenizer, pairs: list[Pair], beam_size: int = 1, length_penalty: float = 1.0,
                   batch_size: int = 64, warn=None) -> dict:
    """Loss per target token (teacher forcing), exact match, BLEU and chrF (sacrebleu, 0-100) of the decoded outputs.

    Exact match compares output and target with surrounding whitespace stripped. Pairs too long for the
    model are left out (with a warning)."""
    _check_beam_size(beam_size)
    try:
        import sacrebleu
    except ImportError:
        raise LmforgeError("BLEU and chrF need sacrebleu: pip install sacrebleu") from None
    src_ids, tgt_ids, keep = encode_pairs(pairs, tokenizer, model.config.max_len)
    if len(keep) < len(pairs):
        (warn or _warn)(f"warning: left out {len(pairs) - len(keep)} pair(s) longer than the model's max_len ({model.config.max_len} tokens)")
    if not keep:
        raise LmforgeError("no pairs short enough to evaluate")
    pairs = [pairs[i] for i in keep]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    data = PairData(src_ids, tgt_ids, tokenizer)
    nats, count = 0.0, 0
    for i in range(0, len(data), batch_size):
        batch = collate(data.src[i: i + batch_size], data.tgt[i: i + batch_size], tokenizer).to(device)
        nats += seq2seq_loss(model, batch, reduction="sum").item()
        count += batch.target_tokens
    outputs = translate(model, tokenizer, [s for s, _ in pairs], beam_size, length_penalty, batch_size=batch_size, warn=warn)
    model.train(was_training)
    refs = [t for _, t in pairs]
    exact = sum(o.strip() == r.strip() for o, r in zip(outputs, refs)) / len(refs)
    return {"pairs": len(pairs), "loss": nats / count, "exact_match": exact, "bleu": sacrebleu.corpus_bleu(outputs, [refs]).score,
            "chrf": sacrebleu.corpus_chrf(outputs, [refs]).score, "outputs": outputs}


# --- the training task ----------------------------------------------------------------------------


class Seq2SeqTask:
    """What `training.train` needs for an encoder–decoder run: its data, batches, loss, evaluation and samples.

    DATA is a .jsonl/.tsv file of pairs (split into train/val by `val_fraction`) or a `pairs.Demo`
    (its own train/val split; its test split stays unseen for `lmforge eval --demo`). Tokens, for the
    budget, progress and tokens_per_step, are target tokens (with EOS)."""

    def __init__(self, cfg, run_dir: Path, data, resume: bool, log=print):
        tc, mc = cfg.train, cfg.model
        if tc.seq_len is not None:
            raise LmforgeError("seq_len does not apply to --task seq2seq (sequence lengths come from the pairs, at most model.max_len)")
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
            log(f"warning: left out {len(train_pairs) - len(keep)} training pair(s) longer than max_len ({mc.max_len} tokens)")
        self.train_data = PairData(src, tgt, self.tokenizer, seed=tc.seed)
        self.val_pairs = val_pairs[: tc.eval_batches * tc.batch_size]  # the same pairs at every evaluation
        self.micro_tokens = max(1, round(tc.batch_size * self.train_data.target_tokens / len(self.train_data)))

    def save_files(self, run_dir: Path) -> None:
        """The tokenizer(s) and where the data came from (new runs)."""
        self.tokenizer.save(run_dir)
        write_json_atomic(run_dir / DATA_INFO, self.info)

    def describe(self, model, accum: int) -> list[str]:
        mc, tc = self.cfg.model, self.cfg.train
        vocab = f"shared vocabulary {mc.tgt_vocab_size}" if mc.shared_vocab else f"vocabularies {mc.src_vocab_size} -> {mc.tgt_vocab_size}"
        return [f"model: {model.num_params():,} parameters ({model.num_params(embeddings=False):,} without embeddings), "
                f"{mc.n_encoder_layer}+{mc.n_decoder_layer} layers, d_model {mc.d_model}, {vocab}, {mc.norm_position}-norm",
                f"train: {len(self.train_data):,} pairs ({self.train_data.target_tokens:,} target tokens), {len(self.val_pairs)} for validation; "
                f"{tc.batch_size} pairs x {accum} accumulation per step"]

    def batch(self, generator: torch.Generator, device) -> tuple[PairBatch, int]:
        b = self.train_data.batch(self.cfg.train.batch_size, generator)
        return b.to(device), b.target_tokens

    def loss(self, model, batch: PairBatch) -> torch.Tensor:
        return seq2seq_loss(model, batch, self.cfg.train.label_smoothing)

    def evaluate(self, model, device, autocast=contextlib.nullcontext, forward=None) -> dict:
        """Validation loss and greedy-decoding scores (decoding needs the plain model, so `forward` is unused)."""
        with autocast():
            res = evaluate_pairs(model, self.tokenizer, self.val_pairs, beam_size=1, warn=self.log)
        return {"val_loss": res["loss"], "val_exact_match": res["exact_match"], "val_bleu": res["bleu"], "val_chrf": res["chrf"]}

    def format_eval(self, res: dict) -> str:
        return (f"val loss {res['val_loss']:.4f}, exact match {100 * res['val_exact_match']:.1f}% (greedy), "
                f"BLEU {res['val_bleu']:.1f}, chrF {res['val_chrf']:.1f}")

    def sample(self, model, step: int) -> str:
        source, target = self.val_pairs[step % len(self.val_pairs)]
        output = translate(model, self.tokenizer, [source], beam_size=1, warn=self.log)[0]
        return f"{source!r} -> {output!r} (expected {target!r})"


def _data_from_info(run_dir: Path):
    """The Demo or the pairs file a run was trained on (checked unchanged), from its data.json."""
    from .pairs import demo

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
