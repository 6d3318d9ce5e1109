"""The generation engine: cache layouts, batched == one by one, stopping, sampling, streaming (packed weights:
test_quantize.py)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.inference.engine import Engine, Request, generate, generate_batch, generate_stream, generate_tokens
from lmforge.inference.sampling import SamplingParams, apply_penalties, sample_next_token
from lmforge.models import build_model
from lmforge.runs import load

CONFIGS = {
    "gpt2": dict(),
    "llama": dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False),
    "window": dict(sliding_window=5),  # shorter than the sequences: the cache is a ring buffer
    "rope-window-softcap": dict(pos="rope", sliding_window=7, attn_softcap=20.0),
    "sinusoidal": dict(pos="sinusoidal"),
    "valueres-gqa": dict(pos="rope", n_kv_head=2, value_residual=True),
    "valueres-window": dict(sliding_window=5, value_residual=True),  # a ring of mixed values
}
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11], [12], [13, 14, 15, 16, 17, 18], [20, 21]]


def tiny_model(**kw):
    torch.manual_seed(0)
    return build_model(ModelConfig(vocab_size=97, block_size=64, n_layer=2, n_head=4, d_model=32, **kw)).eval()


@pytest.fixture(scope="module")
def run_model(tiny_run):
    return load(tiny_run)


@pytest.mark.parametrize("name", CONFIGS)
@torch.no_grad()
def test_left_padded_and_ragged_cache_match_full_forward(name):
    model = tiny_model(**CONFIGS[name])
    g = torch.Generator().manual_seed(1)
    conts = [torch.randint(0, 97, (12,), generator=g).tolist() for _ in PROMPTS]
    ref = [model(torch.tensor([p + c]))[0, len(p) - 1 :] for p, c in zip(PROMPTS, conts)]

    # all prompts in one left-padded forward, then one token per row per step
    T = max(map(len, PROMPTS))
    cache = model.new_cache(len(PROMPTS), T + 12)
    cache.start[:] = torch.tensor([T - len(p) for p in PROMPTS])
    outs = [model(torch.tensor([[0] * (T - len(p)) + p for p in PROMPTS]), cache)[:, -1:]]
    outs += [model(torch.tensor([[c[t]] for c in conts]), cache) for t in range(12)]
    padded = torch.cat(outs, 1)

    # each prompt prefilled into its own row (rows of different lengths), then decoded together
    cache = model.new_cache(len(PROMPTS), 40)
    firsts = [model(torch.tensor([p]), cache.rows(b, b + 1))[:, -1:] for b, p in enumerate(PROMPTS)]
    outs = [torch.cat(firsts, 0)] + [model(torch.tensor([[c[t]] for c in conts]), cache) for t in range(12)]
    ragged = torch.cat(outs, 1)
    for b in range(len(PROMPTS)):
        torch.testing.assert_close(padded[b, :13], ref[b][:13], atol=1e-5, rtol=0)
        torch.testing.assert_close(ragged[b, :13], ref[b][:13], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["gpt2", "llama", "window", "valueres-gqa"])
def test_batched_generation_equals_one_by_one(name):
    model = tiny_model(**CONFIGS[name])
    one = [list(generate_tokens(model, p, 20, temperature=0.0, ignore_eos=True)) for p in PROMPTS]
    assert len({tuple(o) for o in one}) > 1
    together = generate_batch(model, None, PROMPTS, SamplingParams(max_new_tokens=20, temperature=0.0, ignore_eos=True))
    assert [c.token_ids for c in together] == one
    # two rows at a time with different limits: rows finish on their own and queued prompts join the running batch
    limits = [20, 5, 13, 20, 9]
    staggered = generate_batch(
        model,
        None,
        PROMPTS,
        [SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True) for n in limits],
        max_batch=2,
    )
    assert [c.token_ids for c in staggered] == [o[:n] for o, n in zip(one, limits)]
    assert all(c.finish_reason == "length" for c in staggered)


def test_end_of_text_stops_only_its_own_row():
    model = tiny_model()
    free = [list(generate_tokens(model, p, 12, temperature=0.0)) for p in PROMPTS]
    j, k = next((j, k) for j in range(len(PROMPTS)) for k in range(1, 12) if free[j][k] not in free[j][:k])
    eos = free[j][k]  # a token prompt j's continuation reaches after k others
    engine = Engine(model, None, max_batch=len(PROMPTS), eos_id=eos)
    results = {}
    for out in engine.run(
        [Request(p, SamplingParams(max_new_tokens=12, temperature=0.0), i) for i, p in enumerate(PROMPTS)]
    ):
        results.setdefault(out.request_id, []).extend(out.token_ids)
    for i, toks in results.items():
        expected = free[i][: free[i].index(eos)] if eos in free[i] else free[i]
        assert toks == expected
    assert len(results[j]) == k
    assert any(eos not in f for f in free)  # some rows never meet it and run to their limit
    assert not engine.rows and engine.free == len(PROMPTS)


def test_stop_strings(run_model):
    model, tok = run_model
    prompt = "3: the cat"
    free = generate_batch(model, tok, [prompt], SamplingParams(max_new_tokens=30, temperature=0.0, ignore_eos=True))[
        0
    ].text
    stop = free.strip()[3:6]  # a piece of the continuation, not at its start
    cut = free.index(stop)
    assert cut > 0
    got = generate_batch(
        model,
        tok,
        [prompt, prompt],
        [
            SamplingParams(max_new_tokens=30, temperature=0.0, stop=[stop], ignore_eos=True),
            SamplingParams(max_new_tokens=30, temperature=0.0, stop=["never there"], ignore_eos=True),
        ],
    )
    assert got[0].text == free[:cut] and got[0].finish_reason == "stop"
    assert got[1].text == free and got[1].finish_reason == "length"
    pieces = list(generate_stream(model, tok, prompt, 30, temperature=0.0, stop=[stop], ignore_eos=True))
    assert "".join(pieces) == free[:cut]


def test_seeded_sampling_is_reproducible(run_model):
    model, tok = run_model
    prompts = ["1: a dog", "2: the bird sees", "5: my"]
    params = SamplingParams(max_new_tokens=25, temperature=1.0, top_k=40, top_p=0.95, min_p=0.02, seed=7)
    a = generate_batch(model, tok, prompts, params)
    b = generate_batch(model, tok, prompts, params)
    alone = generate_batch(model, tok, [prompts[1]], params)[0]
    assert [c.text for c in a] == [c.text for c in b]
    assert a[1].text == alone.text  # a seeded row does not depend on what it is batched with
    others = {
        generate_batch(model, tok, [prompts[0]], SamplingParams(max_new_tokens=25, temperature=1.0, seed=s))[0].text
        for s in range(6)
    }
    assert len(others) > 1


def test_streaming_concatenates_to_the_full_text(run_model):
    model, tok = run_model
    for seed in (1, 2):
        pieces = list(generate_stream(model, tok, "7: the robot", 40, temperature=1.0, seed=seed))
        full = generate_batch(
            model, tok, ["7: the robot"], SamplingParams(max_new_tokens=40, temperature=1.0, seed=seed)
        )[0]
        assert "".join(pieces) == full.text and len(pieces) > 1
        assert generate(model, tok, "7: the robot", 40, temperature=1.0, seed=seed) == "7: the robot" + full.text


@settings(max_examples=60, deadline=None)
@given(st.text(min_size=1, max_size=40))
def test_stream_decoder_never_splits_a_character(small_tokenizer, text):
    ids = small_tokenizer.encode(text)
    dec = small_tokenizer.stream_decoder()
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    if "\ufffd" not in text:
        assert all("\ufffd" not in p for p in pieces)


def test_sampling_filters_per_row():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]] * 3)
    g = torch.Generator().manual_seed(0)
    seen = [set() for _ in range(3)]
    for _ in range(300):
        ids = sample_next_token(
            logits, torch.tensor([1.0, 1.0, 0.0]), torch.tensor([2, 0, 0]), None, g, min_p=torch.tensor([0.0, 0.3, 0.0])
        )
        for s, i in zip(seen, ids.tolist()):
            s.add(i)
    assert seen[0] == {3, 4}  # top-k 2
    assert seen[1] == {3, 4}  # min-p 0.3: p(3) = 0.37 p(4), p(2) = 0.14 p(4)
    assert seen[2] == {4}  # greedy
    probs = logits[0].softmax(-1)
    u = torch.tensor([float(probs[:2].sum()) + 1e-4, 0.0, 0.999999])
    assert sample_next_token(logits, 1.0, uniform=u).tolist() == [2, 0, 4]  # inverse of the cumulative distribution


def test_penalties():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    counts = torch.tensor([[2.0, 0.0, 1.0, 0.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_penalties(logits, counts, seen, 2.0, 0.5, 0.25)
    torch.testing.assert_close(out, torch.tensor([[2.0 / 2 - 1.0 - 0.25, -2.0 * 2, 1.0 - 0.5 - 0.25, 0.5]]))
    model = tiny_model()
    plain = list(generate_tokens(model, [1, 2, 3], 30, temperature=0.0, ignore_eos=True))
    assert len(set(plain)) < len(plain)  # a tiny random model repeats itself...
    fresh = list(generate_tokens(model, [1, 2, 3], 30, temperature=0.0, ignore_eos=True, presence_penalty=100.0))
    assert len(set(fresh)) == len(fresh)  # ...until repeats cost more than any logit difference


@torch.no_grad()
def test_logprobs_of_chosen_and_top_tokens():
    model = tiny_model()
    prompt = [5, 6, 7]
    res = generate_batch(
        model, None, [prompt], SamplingParams(max_new_tokens=6, temperature=1.0, seed=3, logprobs=3, ignore_eos=True)
    )[0]
    full = torch.log_softmax(model(torch.tensor([prompt + res.token_ids]))[0].float(), -1)
    assert len(res.logprobs) == 6
    for t, entry in enumerate(res.logprobs):
        row = full[len(prompt) - 1 + t]
        assert entry.token_id == res.token_ids[t]
        assert math.isclose(entry.logprob, float(row[entry.token_id]), abs_tol=1e-4)
        assert [i for i, _ in entry.top] == row.topk(3).indices.tolist()


def test_cancel_frees_the_row_and_bad_requests_are_refused():
    model = tiny_model()
    engine = Engine(model, None, max_batch=2)
    engine.add(
        [
            Request([1, 2], SamplingParams(max_new_tokens=30, temperature=0.0, ignore_eos=True), "a"),
            Request([3], SamplingParams(max_new_tokens=30, temperature=0.0, ignore_eos=True), "b"),
        ]
    )
    engine.step()
    assert engine.free == 0
    assert engine.cancel("a") and engine.free == 1
    assert [row.req.request_id for row in engine.rows] == ["b"]
    with pytest.raises(LmforgeError, match="free rows"):
        engine.add([Request([1]), Request([2])])
    with pytest.raises(LmforgeError, match="context"):
        engine.add([Request(list(range(64)))])
    with pytest.raises(LmforgeError, match="temperature"):
        engine.add([Request([1], SamplingParams(temperature=-1.0))])
    # the remaining row still decodes exactly as if it had been alone
    rest = []
    while engine.rows:
        rest += [t for out in engine.step() for t in out.token_ids]
    alone = list(generate_tokens(model, [3], 30, temperature=0.0, ignore_eos=True))
    assert alone[-len(rest) :] == rest


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "valueres-gqa"])
def test_compiled_decode_step_matches_eager(name):
    model = tiny_model(**CONFIGS[name])
    eager = generate_batch(model, None, PROMPTS, SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True))
    compiled = generate_batch(
        model,
        None,
        PROMPTS,
        [SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True) for n in (12, 4, 12, 7, 12)],
        max_batch=3,
        compile=True,
    )
    assert [c.token_ids for c in compiled] == [e.token_ids[: len(c.token_ids)] for e, c in zip(eager, compiled)]
    assert [len(c.token_ids) for c in compiled] == [12, 4, 12, 7, 12]
