"""`train_step` on its own: one optimizer step over accumulated micro-batches, against a plain reference."""

import copy

import torch

from lmforge.config import ModelConfig
from lmforge.models import build_model
from lmforge.models.loss import lm_loss
from lmforge.train.loop import Setup, train_step

V = 48


class ListTask:
    """The two members of a Task that train_step uses, serving fixed micro-batches in order."""

    def __init__(self, batches):
        self.batches = list(batches)

    def batch(self, generator, device):
        x, y = self.batches.pop(0)
        return (x.to(device), y.to(device)), y.numel()

    def loss(self, model, batch):
        return lm_loss(model, *batch)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(vocab_size=V, block_size=16, n_layer=2, n_head=2, d_model=32))


def sgd(model, lr=0.5):
    return torch.optim.SGD([{"params": list(model.parameters()), "base_lr": lr}], lr=lr)


def windows(n, T=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, V, (n, T + 1), generator=g)
    return seq[:, :-1], seq[:, 1:]


def test_train_step_with_accumulation_equals_one_batch():
    x, y = windows(6)
    a, b = tiny_model(), tiny_model()
    setup_a = Setup(a, [sgd(a)], accum=3)
    res = train_step(setup_a, ListTask([(x[i : i + 2], y[i : i + 2]) for i in (0, 2, 4)]), None, lr_factor=0.5)
    setup_b = Setup(b, [sgd(b)], accum=1)
    ref = train_step(setup_b, ListTask([(x, y)]), None, lr_factor=0.5)
    assert res.tokens == ref.tokens == y.numel()
    assert abs(res.loss.item() - ref.loss.item()) < 1e-6
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)
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
