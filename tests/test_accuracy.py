"""Issue 17: top-1 and top-5 next-token accuracy beside loss, perplexity and bits per byte."""

import json

import torch
import torch.nn.functional as F
from conftest import run_cli
from torch import nn

from lmforge.config import ModelConfig
from lmforge.data.pairs import IGNORE
from lmforge.data.shards import ShardWriter, TokenData
from lmforge.evaluation.perplexity import TokenScores, evaluate, token_scores
from lmforge.models import build_model


def test_accuracy_of_hand_built_logits_is_a_direct_count():
    g = torch.Generator().manual_seed(0)
    B, T, V = 4, 16, 9
    logits = torch.randn(B, T, V, generator=g)  # continuous: no ties
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, :4] = IGNORE
    targets[2, -3:] = IGNORE
    top1 = top5 = n = 0
    for b in range(B):
        for t in range(T):
            if targets[b, t] == IGNORE:
                continue
            n += 1
            rank = int((logits[b, t] > logits[b, t, targets[b, t]]).sum())  # logits above the target's
            top1 += rank == 0
            top5 += rank < 5
    assert 0 < top1 < top5 < n  # the case is not degenerate
    nats, count, hits1, hits5 = token_scores(logits, targets)
    assert (int(count), int(hits1), int(hits5)) == (n, top1, top5)
    torch.testing.assert_close(nats / count, F.cross_entropy(logits.view(-1, V), targets.view(-1)))
    # split over batches, the sums (not a mean of per-batch means) give the same numbers
    scores = TokenScores()
    for b in range(B):
        scores.add(logits[b : b + 1], targets[b : b + 1])
    m = scores.metrics("val_")
    assert m["val_acc"] == top1 / n and m["val_top5"] == top5 / n
    assert abs(m["val_loss"] - float(nats / count)) < 1e-6


class CopyModel(nn.Module):
    """Built by hand for sequences A + A: position t predicts the token L - 1 places back, x[t + 1 - L]."""

    def __init__(self, vocab: int, L: int):
        super().__init__()
        self.vocab, self.L = vocab, L

    def forward(self, x):  # (B, T) -> (B, T, V)
        back = torch.roll(x, self.L - 1, dims=1)  # back[:, t] = x[:, t + 1 - L] for t >= L - 1
        return 10.0 * F.one_hot(back, self.vocab).float()


def test_a_copying_model_scores_100_percent_on_a_copy_task():
    V, L = 50, 7
    g = torch.Generator().manual_seed(1)
    first = torch.randint(0, V, (16, L), generator=g)
    seq = torch.cat([first, first], dim=1)  # (B, 2L): every sequence is A followed by A again
    x, y = seq[:, :-1], seq[:, 1:].clone()
    y[:, : L - 1] = IGNORE  # the first copy cannot be predicted: not scored
    scores = TokenScores()
    scores.add(CopyModel(V, L)(x), y)
    m = scores.metrics()
    assert scores.tokens == 16 * L and m["acc"] == 1.0 and m["top5"] == 1.0
    # and the unscored positions are truly left out: scored, they would be mostly wrong
    scores_all = TokenScores()
    scores_all.add(CopyModel(V, L)(x), seq[:, 1:])
    assert scores_all.metrics()["acc"] < 0.7


class Successor(nn.Module):
    """Built by hand: after token a comes (a + 1) mod V."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return 20.0 * F.one_hot((x + 1) % self.vocab, self.vocab).float() + self.dummy


def write_split(directory, split, tokens, vocab):
    w = ShardWriter(directory / f"{split}_0000.bin", vocab)
    w.write(tokens)
    w.close()


def test_validation_accuracy_of_a_perfect_and_an_untrained_model(tmp_path):
    V = 64
    write_split(tmp_path, "val", [i % V for i in range(5000)], V)
    res = evaluate(Successor(V), TokenData(tmp_path, "val"), 4, 32, 3, torch.ones(V, dtype=torch.long), "cpu")
    assert res["val_acc"] == 1.0 and res["val_top5"] == 1.0 and res["val_loss"] < 1e-3
    # an untrained model on uniformly random tokens: each target is the argmax with chance 1 / V
    g = torch.Generator().manual_seed(2)
    rand = tmp_path / "random"
    rand.mkdir()
    write_split(rand, "val", torch.randint(0, V, (20000,), generator=g).tolist(), V)
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=V, block_size=64, n_layer=1, n_head=2, d_model=32))
    res = evaluate(model, TokenData(rand, "val"), 16, 64, 8, None, "cpu")  # 8192 predicted tokens
    sd1, sd5 = (1 / V * (1 - 1 / V) / 8192) ** 0.5, (5 / V * (1 - 5 / V) / 8192) ** 0.5
    assert abs(res["val_acc"] - 1 / V) < 5 * sd1, res
    assert abs(res["val_top5"] - 5 / V) < 5 * sd5, res
    assert "val_bpb" not in res


def test_eval_training_metrics_and_plot_show_accuracy(tiny_run, corpus_dir, tmp_path, capsys):
    code, out, err = run_cli(capsys, "eval", tiny_run, "--data", corpus_dir)
    assert code == 0, err
    top1 = float(out.split("top-1 ")[1].split("%")[0])
    top5 = float(out.split("top-5 ")[1].split("%")[0])
    assert 0 < top1 <= top5 <= 100
    evals = [r for r in map(json.loads, (tiny_run / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]
    assert evals and all(0 <= r["val_acc"] <= r["val_top5"] <= 1 for r in evals)
    code, _, err = run_cli(capsys, "plot", tiny_run, "--out", tmp_path / "plots")
    assert code == 0, err
    assert (tmp_path / "plots" / "val_acc_vs_step.png").is_file()
    assert (tmp_path / "plots" / "val_top5_vs_tokens.png").is_file()
