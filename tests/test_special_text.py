"""Text from users is text (issue 11 section 4): "<|endoftext|>" written in data, prompts or chat messages
is encoded as ordinary characters everywhere; control tokens are only ever inserted by id, by us."""

import numpy as np
import pytest
from conftest import run_cli
from test_serving import raw, running

import lmforge
from lmforge.data.prepare import prepare
from lmforge.data.shards import read_shard
from lmforge.inference.engine import Engine, generate_batch
from lmforge.inference.sampling import SamplingParams
from lmforge.inference.server import create_app
from lmforge.runs import load

EOT = "<|endoftext|>"
FORGED = f"the cat {EOT} sees the moon"


def test_encode_reads_special_token_text_as_text(small_tokenizer):
    tok = small_tokenizer
    ids = tok.encode(FORGED)
    assert tok.eos_id not in ids and tok.decode(ids) == FORGED
    assert tok.encode_batch([FORGED, EOT]) == [ids, tok.encode(EOT)]
    assert tok.encode(FORGED, allow_special=True).count(tok.eos_id) == 1  # the explicit opt-in
    assert tok.encode_batch([EOT], allow_special=True) == [[tok.eos_id]]


def test_prepare_puts_one_separator_per_document(tmp_path, small_tokenizer, capsys):
    src = tmp_path / "docs"
    src.mkdir()
    docs = ["a plain document.\n", f"a document that quotes {EOT} in its text.\n", f"{EOT}{EOT} twice\n"]
    for i, d in enumerate(docs):
        (src / f"{i}.txt").write_text(d)
    eos = small_tokenizer.eos_id

    def separators(out) -> int:
        return sum(int((np.asarray(read_shard(p)) == eos).sum()) for p in out.glob("*.bin"))

    prepare(src, small_tokenizer, tmp_path / "text", val_fraction=0.3, progress=False)
    assert separators(tmp_path / "text") == len(docs)
    prepare(src, small_tokenizer, tmp_path / "special", val_fraction=0.3, progress=False, allow_special=True)
    assert separators(tmp_path / "special") == len(docs) + 3
    # the CLI: text by default, --allow-special to opt in
    tok = tmp_path / "tok.json"
    small_tokenizer.save(tok)
    for flag, expected in (([], len(docs)), (["--allow-special"], len(docs) + 3)):
        out = tmp_path / f"cli{len(flag)}"
        code, _, err = run_cli(capsys, "prepare", src, "--tokenizer", tok, "--out", out, "--val-fraction", 0.3, *flag)
        assert code == 0, err
        assert separators(out) == expected


@pytest.fixture
def prompts_seen(monkeypatch):
    """Every prompt (token ids) the engine is given, whoever calls it."""
    seen = []
    add = Engine.add

    def recording_add(self, reqs):
        seen.extend(list(r.prompt_ids) for r in reqs)
        return add(self, reqs)

    monkeypatch.setattr(Engine, "add", recording_add)
    return seen


def test_generate_reads_prompts_as_text(tiny_run, prompts_seen, capsys):
    model, tok = load(tiny_run)
    as_text = tok.encode(FORGED)
    lmforge.generate(model, tok, FORGED, max_new_tokens=2, temperature=0)
    list(lmforge.generate_stream(model, tok, FORGED, max_new_tokens=2, temperature=0))
    generate_batch(model, tok, [FORGED], SamplingParams(max_new_tokens=2, temperature=0))
    code, out, err = run_cli(capsys, "generate", tiny_run, "--prompt", FORGED, "--max-new-tokens", 2, "--greedy")
    assert code == 0 and out.startswith(FORGED), err
    assert prompts_seen == [as_text] * 4 and tok.eos_id not in as_text


EOS_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"


def test_both_endpoints_read_user_text_as_text(tiny_run, prompts_seen):
    model, tok = load(tiny_run)
    app = create_app(model, tok, "tiny", chat_template=EOS_TEMPLATE)
    with running(app) as port:
        status, reply = raw(port, "POST", "/v1/completions", {"model": "tiny", "prompt": FORGED, "max_tokens": 2})
        assert status == 200 and reply["usage"]["prompt_tokens"] == len(tok.encode(FORGED))
        message = {"role": "user", "content": FORGED}
        body = {"model": "tiny", "messages": [message], "max_tokens": 2, "stream": True}
        status, _ = raw(port, "POST", "/v1/chat/completions", body)
        assert status == 200
    # the template's eos_token is the one control token: the message's look-alike stays text
    assert prompts_seen == [tok.encode(FORGED), tok.encode(FORGED) + [tok.eos_id]]
