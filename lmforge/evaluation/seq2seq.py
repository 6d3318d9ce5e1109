"""Seq2seq evaluation: teacher-forced loss, exact match, BLEU and chrF (sacrebleu) of decoded outputs."""

from __future__ import annotations

import torch

from ..data.pairs import Pair, PairData, PairTokenizer, collate, encode_pairs
from ..errors import LmforgeError
from ..inference.beam import _check_beam_size, _warn, translate
from ..models.loss import seq2seq_loss


@torch.no_grad()
def evaluate_pairs(
    model,
    tokenizer: PairTokenizer,
    pairs: list[Pair],
    beam_size: int = 1,
    length_penalty: float = 1.0,
    batch_size: int = 64,
    warn=None,
) -> dict:
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
        (warn or _warn)(
            f"warning: left out {len(pairs) - len(keep)} pair(s) longer than the model's max_len "
            f"({model.config.max_len} tokens)"
        )
    if not keep:
        raise LmforgeError("no pairs short enough to evaluate")
    pairs = [pairs[i] for i in keep]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    data = PairData(src_ids, tgt_ids, tokenizer)
    nats, count = 0.0, 0
    for i in range(0, len(data), batch_size):
        batch = collate(data.src[i : i + batch_size], data.tgt[i : i + batch_size], tokenizer).to(device)
        nats += seq2seq_loss(model, batch, reduction="sum").item()
        count += batch.target_tokens
    outputs = translate(
        model, tokenizer, [s for s, _ in pairs], beam_size, length_penalty, batch_size=batch_size, warn=warn
    )
    model.train(was_training)
    refs = [t for _, t in pairs]
    exact = sum(o.strip() == r.strip() for o, r in zip(outputs, refs)) / len(refs)
    return {
        "pairs": len(pairs),
        "loss": nats / count,
        "exact_match": exact,
        "bleu": sacrebleu.corpus_bleu(outputs, [refs]).score,
        "chrf": sacrebleu.corpus_chrf(outputs, [refs]).score,
        "outputs": outputs,
    }
