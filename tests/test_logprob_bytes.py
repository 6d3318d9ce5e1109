"""Token bytes and logprob token names (issue 11 section 2), for byte-level BPE and SentencePiece-style tokenizers.

The promise: joining the `bytes` of a choice's logprobs rebuilds its content byte for byte, streamed
or not, completions and chat; tokens holding part of a character get distinct "bytes:\\xNN" names, so a
request for n alternatives gets n.
"""

import http.client
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_serving import running
from tokenizers import AddedToken, decoders, models, normalizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from lmforge.config import ModelConfig
from lmforge.data.tokenizer import Tokenizer
from lmforge.inference.openai_api import TokenStrings
from lmforge.inference.server import create_app
from lmforge.models import build_model

UNICODE_TEXT = "ça va très bien 😊 merci\nnaïve café 日本語 🙂 ok\ndata 数据 数据分析 Ελληνικά русский ✓ …\n"
# Text drawn from scripts of every UTF-8 length, so replies and prompts cut characters across tokens.
ALPHABET = st.sampled_from(list("abc xyz\nçéïЖжλπ日本語数据分析😊🙂✓…"))
TEXT = st.text(ALPHABET, min_size=1, max_size=24)
SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
HTTP_SETTINGS = settings(SETTINGS, max_examples=5)  # each example is a request through a live server


def byte_level_tokenizer() -> Tokenizer:
    return Tokenizer.train([UNICODE_TEXT * 20], 300)


def sentencepiece_tokenizer() -> Tokenizer:
    """Llama-2's layout: BPE over `▁`-marked words with byte_fallback `<0xNN>` pieces for what it has not learnt."""
    base = HFTokenizer(models.BPE())
    base.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    base.train_from_iterator([UNICODE_TEXT * 20], trainers.BpeTrainer(vocab_size=330, show_progress=False))
    learned = json.loads(base.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for piece in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    hf.normalizer = base.normalizer
    hf.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    hf.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    return Tokenizer(hf, "</s>")


FAMILIES = {"byte-level": byte_level_tokenizer, "sentencepiece": sentencepiece_tokenizer}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return request.param, FAMILIES[request.param]()


@given(text=st.text(min_size=1, max_size=40))
@SETTINGS
def test_token_bytes_rebuild_any_text(family, text):
    name, tok = family
    ids = tok.encode(text)
    joined = b"".join(tok.token_bytes(i) for i in ids)
    # SentencePiece marks the text's start with a space that decoding drops again
    assert joined == (b" " if name == "sentencepiece" else b"") + text.encode("utf-8")
    assert joined.decode("utf-8").removeprefix(" " if name == "sentencepiece" else "") == tok.decode(ids)


def test_every_token_has_a_name_of_its_own(family):
    name, tok = family
    names = TokenStrings(tok)
    strings = [names.text(i) for i in range(tok.vocab_size)]
    assert len(set(strings)) == tok.vocab_size  # so top_logprobs dict keys never collide
    partial = [i for i in range(tok.vocab_size) if not _is_utf8(tok.token_bytes(i))]
    assert len(partial) > 100  # both families have the 128 non-ASCII single bytes at least
    for i in partial:
        b = tok.token_bytes(i)
        assert strings[i] == "bytes:" + "".join(f"\\x{c:02x}" for c in b) and names.bytes(i) == list(b)
    if name == "sentencepiece":
        assert tok.token_bytes(tok.hf.token_to_id("<0x41>")) == b"A" and names.text(tok.hf.token_to_id("<0x41>")) == (
            "bytes:\\x41"
        )
        word = next(p for p in tok.hf.get_vocab() if p.startswith("▁") and len(p) > 2 and p[1:].isalpha())
        assert names.text(tok.hf.token_to_id(word)) == " " + word[1:]


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# --- through the server ---------------------------------------------------------------------------


class ScriptedModel(torch.nn.Module):
    """A random tiny decoder whose logits are pushed (+40) towards a script of tokens, one per forward pass.

    Greedy decoding then writes exactly `script`, while the other logits stay random, so the alternatives
    in top_logprobs are arbitrary tokens (many of them single bytes of a character).
    """

    def __init__(self, vocab: int):
        super().__init__()
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=vocab, block_size=128, n_layer=1, n_head=2, d_model=32)
        self.inner = build_model(cfg).eval()
        self.config = cfg
        self.script: list[int] = []
        self.step = 0

    def new_cache(self, *a, **kw):
        return self.inner.new_cache(*a, **kw)

    def forward(self, idx, cache=None, last_only=False):
        if last_only:  # a prefill starts the script again (one request at a time in these tests)
            self.step = 0
        logits = self.inner(idx, cache, last_only=last_only).clone()
        if self.step < len(self.script):
            logits[:, -1, self.script[self.step]] += 40.0
        self.step += 1
        return logits


@pytest.fixture(scope="module")
def scripted_server(family):
    name, tok = family
    model = ScriptedModel(((tok.vocab_size + 63) // 64) * 64)
    with running(create_app(model, tok, "m", max_batch=4)) as port:
        yield name, tok, model, port


def post(port: int, path: str, body: dict) -> list[dict]:
    """The response object, or every chunk of a streamed response."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    assert resp.status == 200, text
    if not body.get("stream"):
        return [json.loads(text)]
    events = [e.removeprefix("data: ") for e in text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def choice_parts(chunks: list[dict], chat: bool) -> tuple[str, list[dict]]:
    """(content, logprob entries) of choice 0 across chunks; entries as {"token", "bytes", "top"}."""
    content, entries = "", []
    for c in chunks:
        for ch in c["choices"]:
            content += (ch.get("message") or ch.get("delta") or {}).get("content") or "" if chat else ch["text"]
            lp = ch["logprobs"]
            if lp is None:
                continue
            if chat:
                entries += [{"token": e["token"], "bytes": e["bytes"], "top": e["top_logprobs"]} for e in lp["content"]]
            else:
                entries += [{"token": t, "top": top} for t, top in zip(lp["tokens"], lp["top_logprobs"])]
    return content, entries


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
@given(prompt=TEXT, reply=TEXT)
@HTTP_SETTINGS
def test_logprob_bytes_rebuild_the_content(scripted_server, chat, stream, prompt, reply):
    name, tok, model, port = scripted_server
    names = TokenStrings(tok)
    model.script = tok.encode(reply)
    body = {"model": "m", "max_tokens": len(model.script), "temperature": 0, "stream": stream, "ignore_eos": True}
    if chat:
        path, body = "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": prompt}]}
        body |= {"logprobs": True, "top_logprobs": 5}
    else:
        path, body = "/v1/completions", {**body, "prompt": prompt, "logprobs": 5}
    content, entries = choice_parts(post(port, path, body), chat)
    expected = (" " if name == "sentencepiece" else "") + reply  # a `▁` piece after the prompt is a space
    assert content == expected
    assert [e["token"] for e in entries] == [names.text(i) for i in model.script]
    if chat:
        assert b"".join(bytes(e["bytes"]) for e in entries) == content.encode("utf-8")
        assert all(len(e["top"]) == 5 and len({t["token"] for t in e["top"]}) == 5 for e in entries)
        assert all(t["bytes"] == names.bytes(_id(tok, names, t["token"])) for e in entries for t in e["top"])
    else:
        assert b"".join(bytes(names.bytes(_id(tok, names, e["token"]))) for e in entries) == content.encode("utf-8")
        assert all(len(e["top"]) == 5 for e in entries)  # five distinct keys: no alternative lost to a collision


def _id(tok, names: TokenStrings, token: str) -> int:
    """The token id a logprobs token string names (names are unique: test_every_token_has_a_name_of_its_own)."""
    table = names.__dict__.setdefault("_by_name", {names.text(i): i for i in range(tok.vocab_size)})
    return table[token]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
@given(prompt=TEXT, seed=st.integers(0, 2**31 - 1))
@HTTP_SETTINGS
def test_sampled_bytes_rebuild_the_content_even_when_not_utf8(scripted_server, chat, stream, prompt, seed):
    """A random model sampling freely writes broken UTF-8 too: the content is then the bytes decoded with U+FFFD."""
    name, tok, model, port = scripted_server
    model.script = []
    body = {"model": "m", "max_tokens": 20, "temperature": 1.0, "seed": seed, "stream": stream, "ignore_eos": True}
    if chat:
        path, body = (
            "/v1/chat/completions",
            {**body, "messages": [{"role": "user", "content": prompt}], "logprobs": True},
        )
    else:
        path, body = "/v1/completions", {**body, "prompt": prompt, "logprobs": 0}
    content, entries = choice_parts(post(port, path, body), chat)
    names = TokenStrings(tok)
    joined = b"".join(bytes(e["bytes"]) if chat else bytes(names.bytes(_id(tok, names, e["token"]))) for e in entries)
    assert len(entries) == 20 and joined.decode("utf-8", errors="replace") == content
