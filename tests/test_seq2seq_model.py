"""The encoder–decoder model: masks, padding, causality, the decoding cache, greedy and beam search, saved weights."""

from types import SimpleNamespace

import pytest
import torch

from lmforge.config import Seq2SeqConfig
from lmforge.data.pairs import pad
from lmforge.inference.beam import beam_search, greedy_decode
from lmforge.models import Seq2SeqTransformer, build_model
from lmforge.runs import load_weights, save_weights

V, BOS, EOS, PAD = 40, 1, 2, 0

VARIANTS = {
    "post-ln": {},
    "pre-ln, learned positions": dict(norm_position="pre", pos="learned"),
    "separate vocabularies, untied": dict(shared_vocab=False, src_vocab_size=33, tie_embeddings=False),
}


def tiny(**kw) -> Seq2SeqTransformer:
    torch.manual_seed(0)
    args = dict(
        src_vocab_size=V,
        tgt_vocab_size=V,
        n_encoder_layer=2,
        n_decoder_layer=2,
        n_head=4,
        d_model=32,
        d_ff=64,
        max_len=24,
        dropout=0.0,
    )
    args.update(kw)
    return build_model(Seq2SeqConfig(**args)).eval()


def rand_ids(n, low=3, high=33, seed=0):
    return torch.randint(low, high, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("variant", VARIANTS)
def test_padding_invariance(variant):
    """An example alone and inside a padded batch gives the same encoder output and decoder logits at its real
    positions."""
    model = tiny(**VARIANTS[variant])
    src = [rand_ids(5, seed=1), rand_ids(11, seed=2), rand_ids(8, seed=3)]
    tgt = [rand_ids(4, seed=4), rand_ids(9, seed=5), rand_ids(2, seed=6)]
    S, S_mask = pad(src, PAD)
    T, T_mask = pad(tgt, PAD)
    with torch.no_grad():
        memory = model.encode(S, S_mask)
        logits = model(S, T, S_mask, T_mask)
        for i in range(3):
            s, t = torch.tensor([src[i]]), torch.tensor([tgt[i]])
            torch.testing.assert_close(memory[i, : len(src[i])], model.encode(s)[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(logits[i, : len(tgt[i])], model(s, t)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_source_mask_hides_padding(variant):
    model = tiny(**VARIANTS[variant])
    S, S_mask = pad([rand_ids(4, seed=1), rand_ids(12, seed=2)], PAD)
    T = torch.tensor([rand_ids(6, seed=3), rand_ids(6, seed=4)])
    S2 = S.clone()
    S2[0, 4:] = torch.tensor(rand_ids(8, seed=5))  # other tokens where row 0 is padding
    with torch.no_grad():
        for a, b in [
            (model.encode(S, S_mask)[0, :4], model.encode(S2, S_mask)[0, :4]),
            (model(S, T, S_mask)[0], model(S2, T, S_mask)[0]),
        ]:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        # without the mask the padded tokens do change the result, so the check above is not vacuous
        assert not torch.allclose(model(S, T)[0], model(S2, T)[0], atol=1e-3)


def test_decoder_causality():
    model = tiny()
    src = torch.tensor([rand_ids(7, seed=1)])
    tgt = torch.tensor([rand_ids(12, seed=2)])
    with torch.no_grad():
        base = model(src, tgt)
        for t in (0, 5, 11):
            changed = tgt.clone()
            changed[0, t] = 3 if changed[0, t] != 3 else 4
            out = model(src, changed)
            assert torch.equal(out[:, :t], base[:, :t])
            assert not torch.allclose(out[:, t:], base[:, t:])


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_decoding_equals_uncached(variant):
    model = tiny(**VARIANTS[variant])
    S, S_mask = pad([rand_ids(6, seed=1), rand_ids(10, seed=2)], PAD)
    T = torch.tensor([rand_ids(15, seed=3), rand_ids(15, seed=4)])
    with torch.no_grad():
        full = model(S, T, S_mask)
        cache = model.new_cache(model.encode(S, S_mask), S_mask, 20)
        parts = [model.decode(T[:, :4], cache=cache)] + [
            model.decode(T[:, t : t + 1], cache=cache) for t in range(4, 15)
        ]
    assert cache.self_attn.pos == 15
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)


def test_encoder_and_cross_attention_projections_run_once_per_input():
    model = tiny()
    calls = {"encoder": 0, "cross_kv": 0, "self_kv": 0}
    model.encoder[0].register_forward_hook(lambda *_: calls.__setitem__("encoder", calls["encoder"] + 1))
    model.decoder[1].cross_attn.kv.register_forward_hook(
        lambda *_: calls.__setitem__("cross_kv", calls["cross_kv"] + 1)
    )
    model.decoder[1].self_attn.kv.register_forward_hook(lambda *_: calls.__setitem__("self_kv", calls["self_kv"] + 1))
    S, S_mask = pad([rand_ids(6, seed=1), rand_ids(9, seed=2)], PAD)
    out = greedy_decode(model, S, S_mask, BOS, -1, max_new_tokens=10)  # eos -1: never stops early
    assert [len(o) for o in out] == [10, 10]
    assert calls == {"encoder": 1, "cross_kv": 1, "self_kv": 10}
    calls.update(encoder=0, cross_kv=0, self_kv=0)
    beam_search(model, S, S_mask, BOS, -1, beam_size=3, max_new_tokens=10)
    assert calls == {"encoder": 1, "cross_kv": 1, "self_kv": 10}


def eos_prone_model():
    """A random model whose EOS logit is raised so that some greedy outputs stop early and others do not."""
    model = tiny(tie_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight[EOS] += (
            0.35 * model.lm_head.weight.std() * torch.randn(32, generator=torch.Generator().manual_seed(7))
        )
    return model


def test_beam_size_one_equals_greedy():
    model = eos_prone_model()
    src = [rand_ids(n, seed=n) for n in range(1, 21)]
    S, S_mask = pad(src, PAD)
    greedy = greedy_decode(model, S, S_mask, BOS, EOS, max_new_tokens=16)
    beams = beam_search(model, S, S_mask, BOS, EOS, beam_size=1, max_new_tokens=16)
    assert [b[0].tokens for b in beams] == greedy
    lengths = {len(g) for g in greedy}
    assert len(lengths) > 2 and 16 in lengths  # some stopped at EOS at various lengths, some ran to the limit


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
def test_beam_hypotheses_sorted_by_normalised_score(length_penalty):
    """Hypotheses come best first by log p / length ** penalty, and their log p is the model's probability of the
    tokens."""
    model = eos_prone_model()
    src = [rand_ids(n, seed=n) for n in range(2, 10)]
    S, S_mask = pad(src, PAD)
    results = beam_search(model, S, S_mask, BOS, EOS, beam_size=4, length_penalty=length_penalty, max_new_tokens=12)
    assert len(results) == len(src)
    n_finished = 0
    for i, hyps in enumerate(results):
        assert 1 <= len(hyps) <= 4
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(h.tokens) for h in hyps}) == len(hyps)  # distinct hypotheses
        for h in hyps:
            out = h.tokens + [EOS] if h.finished else h.tokens
            with torch.no_grad():
                logits = model(torch.tensor([src[i]]), torch.tensor([[BOS] + out[:-1]]))
            log_prob = logits.log_softmax(-1)[0, torch.arange(len(out)), torch.tensor(out)].sum().item()
            assert abs(h.log_prob - log_prob) < 1e-3
            assert abs(h.score - log_prob / len(out) ** length_penalty) < 1e-3
            n_finished += h.finished
    assert n_finished > 0


class ConfidentModel:
    """Stands in for a trained model that is sure of one answer: after each prefix of ANSWER the next answer token
    has p ~ 1 and EOS p = 1e-4, every other token 1e-6; off the answer, every token is equally likely.
    So at every step, the answer beam's EOS ranks second, ahead of every other continuation."""

    ANSWER = [5, 6, 7, 8, 9]
    config = SimpleNamespace(max_len=12)

    def encode(self, src, src_mask):
        return src.float()[:, :, None]

    def new_cache(self, memory, src_mask, max_len):
        prefixes = SimpleNamespace(rows=torch.zeros(memory.shape[0], 0, dtype=torch.long))
        prefixes.reorder = lambda index: setattr(prefixes, "rows", prefixes.rows[index])
        return SimpleNamespace(self_attn=prefixes)

    def decode(self, token, cache):
        kv = cache.self_attn
        kv.rows = torch.cat([kv.rows, token], 1)
        logp = torch.full((token.shape[0], V), -torch.log(torch.tensor(float(V))).item())
        for i, row in enumerate(kv.rows[:, 1:].tolist()):
            if row == self.ANSWER[: len(row)]:
                nxt = self.ANSWER[len(row)] if len(row) < len(self.ANSWER) else EOS
                logp[i] = torch.log(torch.tensor(1e-6))
                logp[i, EOS] = torch.log(torch.tensor(1e-4))
                logp[i, nxt] = torch.log(torch.tensor(1 - 1e-4 - (V - 2) * 1e-6))
        return logp[:, None, :]


@pytest.mark.parametrize("beam_size", [2, 3, 4])
def test_beam_search_keeps_searching_while_a_live_hypothesis_can_win(beam_size):
    """Early EOS hypotheses must not end the search while the (far better) answer is still live."""
    src = torch.tensor([[3, 4], [4, 3]])
    results = beam_search(ConfidentModel(), src, None, BOS, EOS, beam_size=beam_size, length_penalty=1.0)
    for hyps in results:
        assert hyps[0].tokens == ConfidentModel.ANSWER and hyps[0].finished
        assert hyps[0].log_prob > -0.01 and all(h.score < -1 for h in hyps[1:])
    assert greedy_decode(ConfidentModel(), src, None, BOS, EOS) == [ConfidentModel.ANSWER] * 2


def test_shared_and_tied_weights_saved_once_and_reload(tmp_path):
    for kw in (
        {},
        dict(shared_vocab=False, src_vocab_size=33, tie_embeddings=False),
        dict(pos="learned", tie_embeddings=False),
    ):
        model = tiny(**kw)
        cfg = model.config
        assert (model.src_emb is model.tgt_emb) == cfg.shared_vocab
        assert (model.lm_head.weight is model.tgt_emb.weight) == cfg.tie_embeddings
        path = tmp_path / "w.safetensors"
        save_weights(path, model)
        other = tiny(**kw)
        for p in other.parameters():
            torch.nn.init.zeros_(p)
        load_weights(path, other)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
        assert (other.src_emb is other.tgt_emb) == cfg.shared_vocab and (
            other.lm_head.weight is other.tgt_emb.weight
        ) == cfg.tie_embeddings


def test_parameter_count():
    d, ff, L = 32, 64, 2
    attn = 4 * d * d + 4 * d  # q, kv (2d), proj with biases
    mlp = 2 * d * ff + ff + d
    norm = 2 * d
    enc = L * (attn + mlp + 2 * norm)
    dec = L * (2 * attn + mlp + 3 * norm)
    assert tiny().num_params() == V * d + enc + dec  # one shared, tied embedding; sinusoidal positions have no weights
    assert tiny(norm_position="pre").num_params() == V * d + enc + dec + 2 * norm  # final norms of both stacks
    assert (
        tiny(shared_vocab=False, src_vocab_size=33, tie_embeddings=False).num_params() == 33 * d + 2 * V * d + enc + dec
    )


def test_config_validation():
    from lmforge.errors import LmforgeError

    for bad in (
        dict(norm_position="middle"),
        dict(pos="rope"),
        dict(d_model=30),
        dict(src_vocab_size=10),
        dict(mlp="tanh"),
        dict(max_len=1),
    ):
        with pytest.raises(LmforgeError, match="invalid model config"):
            tiny(**bad)
