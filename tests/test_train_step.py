"""`train_step` on its own: one optimizer step over accumulated micro-batches, against a plain reference.

Issue 11 (3): a step's loss is the mean over every token it predicts, not a mean of micro-batch means, so
accumulating micro-batches that predict different numbers of tokens equals one batch of them all.
"""

import copy
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from conftest import torchrun

from lmforge.config import ModelConfig, Seq2SeqConfig
from lmforge.data import pairs
from lmforge.models import build_model
from lmforge.models.loss import lm_loss, predicted_tokens, seq2seq_loss
from lmforge.train.loop import Setup, train_step

V = 48
ROOT = Path(__file__).resolve().parents[1]


class ListTask:
    """The two members of a Task that train_step uses, serving fixed decoder micro-batches (x, y) in order."""

    def __init__(self, batches):
        self.batches = list(batches)

    def batch(self, generator, device):
        x, y = self.batches.pop(0)
        return (x.to(device), y.to(device)), int((y != pairs.IGNORE).sum())

    def loss(self, model, batch):
        x, y = batch
        return lm_loss(model, x, y, "sum"), predicted_tokens(y)


class PairListTask(ListTask):
    def batch(self, generator, device):
        b = self.batches.pop(0)
        return b.to(device), b.target_tokens

    def loss(self, model, batch):
        return seq2seq_loss(model, batch, reduction="sum"), predicted_tokens(batch.labels)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(vocab_size=V, block_size=16, n_layer=2, n_head=2, d_model=32))


def sgd(model, lr=0.5):
    return torch.optim.SGD([{"params": list(model.parameters()), "base_lr": lr}], lr=lr)


def windows(n, T=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, V, (n, T + 1), generator=g)
    return seq[:, :-1], seq[:, 1:]


def ragged(seed=3):
    """Decoder micro-batches predicting very different numbers of tokens: lengths and IGNORE'd targets differ."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for rows, T, ignored in [(1, 3, 0), (3, 14, 5), (2, 6, 9), (1, 16, 2)]:
        seq = torch.randint(0, V, (rows, T + 1), generator=g)
        x, y = seq[:, :-1], seq[:, 1:].clone()
        y.view(-1)[torch.randperm(y.numel(), generator=g)[:ignored]] = pairs.IGNORE
        out.append((x, y))
    return out


def one_batch(micro):
    """The micro-batches as one batch, right-padded (padding predicts nothing; causal attention ignores it)."""
    T = max(x.shape[1] for x, _ in micro)
    x = torch.cat([F.pad(x, (0, T - x.shape[1])) for x, _ in micro])
    y = torch.cat([F.pad(y, (0, T - y.shape[1]), value=pairs.IGNORE) for _, y in micro])
    return x, y


def assert_same_params(a, b, atol=1e-6):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=atol, rtol=0, msg=name)


def test_train_step_with_accumulation_equals_one_batch():
    x, y = windows(6)
    a, b = tiny_model(), tiny_model()
    setup_a = Setup(a, [sgd(a)], accum=3)
    res = train_step(setup_a, ListTask([(x[i : i + 2], y[i : i + 2]) for i in (0, 2, 4)]), None, lr_factor=0.5)
    setup_b = Setup(b, [sgd(b)], accum=1)
    ref = train_step(setup_b, ListTask([(x, y)]), None, lr_factor=0.5)
    assert res.tokens == ref.tokens == y.numel()
    assert abs(res.loss.item() - ref.loss.item()) < 1e-6
    assert_same_params(a, b)
    assert setup_a.optimizers[0].param_groups[0]["lr"] == 0.25  # base_lr x lr_factor
    assert all(p.grad is None for p in a.parameters())  # zeroed for the next step


def test_train_step_is_one_sgd_step_with_clipping():
    x, y = windows(4, seed=2)
    model = tiny_model()
    before = copy.deepcopy(model)
    res = train_step(Setup(model, [sgd(model, lr=1.0)], grad_clip=0.1), ListTask([(x, y)]), None, lr_factor=1.0)
    loss = lm_loss(before, x, y)
    loss.backward()
    assert abs(res.loss.item() - loss.item()) < 1e-6
    torch.nn.utils.clip_grad_norm_(before.parameters(), 0.1)
    for p, q in zip(model.parameters(), before.parameters()):
        torch.testing.assert_close(p, q - q.grad, atol=1e-6, rtol=0)


def test_accumulation_weights_tokens_not_micro_batches_lm():
    micro = ragged()
    a, b = tiny_model(), tiny_model()
    res = train_step(Setup(a, [sgd(a)], accum=len(micro)), ListTask(micro), None, 1.0)
    x, y = one_batch(micro)
    ref = train_step(Setup(b, [sgd(b)]), ListTask([(x, y)]), None, 1.0)
    assert res.tokens == ref.tokens == int((y != pairs.IGNORE).sum())
    assert abs(res.loss.item() - ref.loss.item()) < 1e-6
    assert abs(ref.loss.item() - lm_loss(tiny_model(), x, y).item()) < 1e-6  # the plain token mean
    assert_same_params(a, b)


def test_accumulation_weights_tokens_not_micro_batches_seq2seq():
    tok = SimpleNamespace(src_pad_id=0, pad_id=0, bos_id=1, eos_id=2)
    short = ([5, 6], [7])  # 2 target tokens with EOS
    long = ([5, 9, 8, 7, 6], [9, 9, 8, 7, 6, 5, 4, 3, 10])  # 10
    cfg = Seq2SeqConfig(
        src_vocab_size=16, tgt_vocab_size=16, max_len=16, n_encoder_layer=1, n_decoder_layer=1, n_head=2, d_model=16
    )
    cfg.dropout = 0.0
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(build_model(cfg))
    a, b = models
    micro = [pairs.collate([s], [t], tok) for s, t in (short, long)]
    res = train_step(Setup(a, [sgd(a)], accum=2), PairListTask(micro), None, 1.0)
    together = pairs.collate([short[0], long[0]], [short[1], long[1]], tok)
    ref = train_step(Setup(b, [sgd(b)]), PairListTask([together]), None, 1.0)
    assert res.tokens == ref.tokens == 12
    assert abs(res.loss.item() - ref.loss.item()) < 1e-6
    assert_same_params(a, b)


def test_two_processes_accumulating_equal_one_process_one_batch(tmp_path):
    """2 ranks x 2 ragged micro-batches each (DDP, then FSDP2) = one process, one padded batch of all four."""
    micro = ragged()
    torch.save({"micro": micro}, tmp_path / "micro.pt")
    torchrun([str(ROOT / "tests" / "dist_step_worker.py"), str(tmp_path)])
    ref_model = tiny_model()
    ref = train_step(Setup(ref_model, [sgd(ref_model)]), ListTask([one_batch(micro)]), None, 1.0)
    for kind in ("ddp", "fsdp"):
        out = torch.load(tmp_path / f"{kind}.pt", weights_only=True)
        assert out["tokens"] == ref.tokens
        assert abs(out["loss"] - ref.loss.item()) < 1e-6, kind
        for name, p in ref_model.state_dict().items():
            torch.testing.assert_close(out["weights"][name], p, atol=1e-6, rtol=0, msg=f"{kind} {name}")
