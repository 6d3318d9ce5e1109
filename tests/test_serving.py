"""The HTTP server end to end over real HTTP on loopback: the official openai client, raw requests, bad input, load."""

import http.client
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest
import torch
import uvicorn

from lmforge.data.chat import render_chat
from lmforge.inference.engine import generate_batch
from lmforge.inference.quantize import pack_for_inference
from lmforge.inference.sampling import SamplingParams
from lmforge.inference.server import create_app
from lmforge.runs import load

NAME = "tiny"


@contextmanager
def running(app):
    """Serve app on 127.0.0.1 at a free port in a background thread; yields the port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    assert server.started
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()


@pytest.fixture(scope="module")
def model_tok(tiny_run):
    model, tok = load(tiny_run)
    return pack_for_inference(model), tok


@pytest.fixture(scope="module")
def server(model_tok):
    model, tok = model_tok
    app = create_app(model, tok, NAME, max_batch=16)
    with running(app) as port:
        yield port, app


def client(port, key="unused"):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=60)


def raw(port, method, path, body=None, headers=None):
    """(status, parsed JSON or text) for one request sent with the standard library."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    data = body if isinstance(body, (bytes, str)) or body is None else json.dumps(body)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    try:
        return resp.status, json.loads(text)
    except json.JSONDecodeError:
        return resp.status, text


def offline(model_tok, prompt, max_tokens, stop=(), **kw):
    model, tok = model_tok
    return generate_batch(
        model, tok, [prompt], SamplingParams(max_new_tokens=max_tokens, temperature=0.0, stop=list(stop), **kw)
    )[0]


def test_completion_matches_offline_generation(server, model_tok):
    port, _ = server
    r = client(port).completions.create(model=NAME, prompt="3: the cat", max_tokens=12, temperature=0)
    expected = offline(model_tok, "3: the cat", 12)
    assert r.object == "text_completion" and r.model == NAME
    assert r.choices[0].text == expected.text and r.choices[0].finish_reason == expected.finish_reason
    assert r.usage.prompt_tokens == len(model_tok[1].encode("3: the cat"))
    assert r.usage.completion_tokens == len(expected.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_uses_the_plain_template(server, model_tok):
    port, _ = server
    messages = [{"role": "system", "content": "Complete the line."}, {"role": "user", "content": "4: a dog"}]
    r = client(port).chat.completions.create(model=NAME, messages=messages, max_tokens=15, temperature=0)
    prompt, stop = render_chat(messages, None, model_tok[1])
    assert prompt == "System: Complete the line.\nUser: 4: a dog\nAssistant:"
    expected = offline(model_tok, prompt, 15, stop)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected.text
    assert r.object == "chat.completion" and r.usage.prompt_tokens == len(model_tok[1].encode(prompt))


def test_streaming_completion_and_chat(server, model_tok):
    port, _ = server
    c = client(port)
    chunks = list(
        c.completions.create(
            model=NAME,
            prompt="5: my friend",
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    expected = offline(model_tok, "5: my friend", 20)
    assert text == expected.text
    assert len([ch for ch in chunks if ch.choices and ch.choices[0].text]) > 1  # really streamed, piece by piece
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == expected.finish_reason
    assert chunks[-1].usage.completion_tokens == len(expected.token_ids)

    messages = [{"role": "user", "content": "2: the bird"}]
    stream = c.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    expected = offline(model_tok, render_chat(messages, None, model_tok[1])[0], 20, ["\nUser:", "\nSystem:"])
    assert text == expected.text and chunks[-1].choices[0].finish_reason == expected.finish_reason


def test_raw_event_stream_ends_with_done(server):
    port, _ = server
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request(
        "POST",
        "/v1/completions",
        json.dumps({"model": NAME, "prompt": "1:", "max_tokens": 5, "stream": True}),
        {"Content-Type": "application/json"},
    )
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")
    events = [line for line in resp.read().decode().split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:])["object"] == "text_completion" for e in events[:-1])


def test_sampling_options_seed_n_and_logprobs(server):
    port, _ = server
    c = client(port)
    kw = dict(
        model=NAME,
        prompt="6: the",
        max_tokens=15,
        temperature=1.0,
        top_p=0.9,
        seed=11,
        n=2,
        frequency_penalty=0.5,
        extra_body={"top_k": 30, "min_p": 0.05, "repetition_penalty": 1.1},
    )
    a, b = c.completions.create(**kw), c.completions.create(**kw)
    assert [ch.text for ch in a.choices] == [ch.text for ch in b.choices]
    assert [ch.index for ch in a.choices] == [0, 1]
    r = c.completions.create(model=NAME, prompt=["1: a", "2: the"], max_tokens=4, temperature=0, logprobs=2)
    assert len(r.choices) == 2
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) and all(
        len(t) <= 2 for t in lp.top_logprobs
    )
    assert all(
        max(top.values()) == pytest.approx(chosen, abs=1e-5) for top, chosen in zip(lp.top_logprobs, lp.token_logprobs)
    )  # greedy picks the top
    chat = c.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "x"}],
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    assert chat.choices[0].logprobs.content and len(chat.choices[0].logprobs.content[0].top_logprobs) == 2


def test_models_health_and_openapi(server):
    port, _ = server
    assert [m.id for m in client(port).models.list()] == [NAME]
    status, body = raw(port, "GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["model"] == NAME
    status, schema = raw(port, "GET", "/openapi.json")
    assert status == 200 and {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health"} <= set(
        schema["paths"]
    )


BAD = [
    ("malformed JSON", "/v1/completions", '{"model": "tiny", "prompt": ', None),
    ("not an object", "/v1/completions", "[1, 2]", None),
    ("missing model", "/v1/completions", {"prompt": "x"}, "model"),
    ("missing prompt", "/v1/completions", {"model": NAME}, "prompt"),
    ("missing messages", "/v1/chat/completions", {"model": NAME}, "messages"),
    ("empty messages", "/v1/chat/completions", {"model": NAME, "messages": []}, "messages"),
    ("bad role", "/v1/chat/completions", {"model": NAME, "messages": [{"role": "robot", "content": "x"}]}, "messages"),
    ("max_tokens a string", "/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ("max_tokens zero", "/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("temperature a string", "/v1/completions", {"model": NAME, "prompt": "x", "temperature": "hot"}, "temperature"),
    ("prompt a number", "/v1/completions", {"model": NAME, "prompt": 5}, "prompt"),
    ("stream not a bool", "/v1/completions", {"model": NAME, "prompt": "x", "stream": "yes"}, "stream"),
    ("messages not a list", "/v1/chat/completions", {"model": NAME, "messages": "hi"}, "messages"),
    ("negative temperature", "/v1/completions", {"model": NAME, "prompt": "x", "temperature": -0.5}, "temperature"),
    ("top_p zero", "/v1/completions", {"model": NAME, "prompt": "x", "top_p": 0}, "top_p"),
    ("unknown model", "/v1/completions", {"model": "gpt-4", "prompt": "x"}, "model"),
    (
        "unknown chat model",
        "/v1/chat/completions",
        {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]},
        "model",
    ),
    (
        "max_tokens beyond the context",
        "/v1/completions",
        {"model": NAME, "prompt": "x", "max_tokens": 64},
        "max_tokens",
    ),
    (
        "chat max_tokens beyond the context",
        "/v1/chat/completions",
        {"model": NAME, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1000},
        "max_tokens",
    ),
    (
        "prompt longer than the context",
        "/v1/completions",
        {"model": NAME, "prompt": "the cat sees the moon. " * 40},
        "prompt",
    ),
    (
        "chat prompt longer than the context",
        "/v1/chat/completions",
        {"model": NAME, "messages": [{"role": "user", "content": "a dog. " * 60}]},
        "messages",
    ),
    ("token ids out of range", "/v1/completions", {"model": NAME, "prompt": [1, 99999]}, "prompt"),
    ("n too large", "/v1/completions", {"model": NAME, "prompt": "x", "n": 17}, "n"),
    ("empty stop string", "/v1/completions", {"model": NAME, "prompt": "x", "stop": [""]}, "stop"),
    ("echo+stream", "/v1/completions", {"model": NAME, "prompt": "x", "echo": True, "stream": True}, "echo"),
    # a lone UTF-16 surrogate is valid JSON ("\ud800") but no character
    ("lone surrogate in prompt", "/v1/completions", {"model": NAME, "prompt": "ab\ud800cd", "max_tokens": 4}, "prompt"),
    (
        "lone surrogate in a streamed prompt",
        "/v1/completions",
        {"model": NAME, "prompt": "ab\udfffcd", "max_tokens": 4, "stream": True},
        "prompt",
    ),
    ("lone surrogate in a prompt list", "/v1/completions", {"model": NAME, "prompt": ["ok", "\udc00"]}, "prompt.1"),
    ("lone surrogate in a stop string", "/v1/completions", {"model": NAME, "prompt": "x", "stop": "\ud800"}, "stop"),
    (
        "lone surrogate in a message",
        "/v1/chat/completions",
        {"model": NAME, "messages": [{"role": "user", "content": "ab\ud800cd"}], "max_tokens": 4},
        "messages.0.content",
    ),
    (
        "lone surrogate in a streamed message",
        "/v1/chat/completions",
        {"model": NAME, "messages": [{"role": "user", "content": "\ud800"}], "max_tokens": 4, "stream": True},
        "messages.0.content",
    ),
    (
        "lone surrogate in a content part",
        "/v1/chat/completions",
        {"model": NAME, "messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]},
        "messages.0.content.0.text",
    ),
]


@pytest.mark.parametrize("case,path,body,param", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_400_with_an_openai_error(server, case, path, body, param):
    port, _ = server
    status, reply = raw(port, "POST", path, body)
    assert status == 400, (case, reply)
    err = reply["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    if param:
        assert (err["param"] or "").startswith(param), err


def test_bad_input_through_the_client_and_server_survives(server):
    port, _ = server
    c = client(port)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model=NAME, prompt="x", temperature=-1)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="nope", prompt="x")
    assert c.completions.create(model=NAME, prompt="x", max_tokens=2).choices  # still serving


def test_oversized_body_is_refused(server):
    port, _ = server
    status, reply = raw(port, "POST", "/v1/completions", json.dumps({"model": NAME, "prompt": "a" * (2 << 20)}))
    assert status == 413 and "larger than" in reply["error"]["message"]
    # a chunked upload with no declared length is counted as it arrives
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    body = iter([b'{"model": "tiny", "prompt": "'] + [b"a" * (1 << 16)] * 20 + [b'"}'])
    conn.request(
        "POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"}, encode_chunked=True
    )
    resp = conn.getresponse()
    assert resp.status == 413
    conn.close()


def test_sixteen_concurrent_clients_are_batched_and_correct(server, model_tok):
    port, app = server
    prompts = [f"{i % 10}: {w}" for i, w in enumerate(["the cat", "a dog", "the bird", "my friend"] * 4)]
    limits = [8 + (i * 5) % 17 for i in range(16)]
    expected = [offline(model_tok, p, n) for p, n in zip(prompts, limits)]
    worker = app.state.worker
    worker.peak = 0
    stop = threading.Event()

    def watch():  # the most rows the engine ever decoded together
        while not stop.is_set():
            worker.peak = max(worker.peak, len(worker.engine.rows))
            time.sleep(0.001)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    c = client(port)

    def ask(i):
        if i % 2:
            chunks = c.completions.create(
                model=NAME, prompt=prompts[i], max_tokens=limits[i], temperature=0, stream=True
            )
            return "".join(ch.choices[0].text for ch in chunks if ch.choices)
        return c.completions.create(model=NAME, prompt=prompts[i], max_tokens=limits[i], temperature=0).choices[0].text

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, range(16)))
    stop.set()
    watcher.join()
    assert got == [e.text for e in expected]
    assert worker.peak > 1  # requests shared decode steps instead of queueing one after another


class SlowModel(torch.nn.Module):
    """A model that takes 50 ms per forward pass, so a request is still running when its client leaves."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config = model, model.config

    def new_cache(self, *a, **kw):
        return self.inner.new_cache(*a, **kw)

    def forward(self, *a, **kw):
        time.sleep(0.05)
        return self.inner(*a, **kw)


def test_client_disconnect_mid_stream_frees_its_row(model_tok):
    model, tok = model_tok
    app = create_app(SlowModel(model), tok, NAME, max_batch=2)
    with running(app) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request(
            "POST",
            "/v1/completions",
            json.dumps({"model": NAME, "prompt": "1:", "max_tokens": 60, "stream": True, "ignore_eos": True}),
            {"Content-Type": "application/json"},
        )
        resp = conn.getresponse()
        assert resp.readline().startswith(b"data: ")  # generation has started
        _, health = raw(port, "GET", "/health")
        assert health["running"] == 1
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        engine = app.state.worker.engine
        left = time.monotonic()
        while (
            engine.rows and time.monotonic() - left < 2.0
        ):  # 60 tokens would take 3 s; the row must be freed well before
            time.sleep(0.01)
        assert not engine.rows and app.state.worker.cancelled_rows == 1
        _, health = raw(port, "GET", "/health")
        assert health["running"] == 0 and health["waiting"] == 0
        # and the freed row serves the next request
        assert client(port).completions.create(model=NAME, prompt="2:", max_tokens=3).choices[0].text is not None


def test_api_key(model_tok, monkeypatch):
    model, tok = model_tok
    app = create_app(model, tok, NAME, api_key="sekret")
    with running(app) as port:
        body = {"model": NAME, "prompt": "1:", "max_tokens": 2}
        status, reply = raw(port, "POST", "/v1/completions", body)
        assert status == 401 and reply["error"]["code"] == "invalid_api_key"
        # refused before anything reads the body: not 400 for an invalid one, not 413 for a huge one
        for bad in ({"model": NAME}, "{oops", json.dumps({"model": NAME, "prompt": "a" * (2 << 20)})):
            status, reply = raw(port, "POST", "/v1/completions", bad)
            assert status == 401 and reply["error"]["code"] == "invalid_api_key", reply
        assert raw(port, "POST", "/v1/chat/completions", {"model": NAME}, {"Authorization": "Bearer x"})[0] == 401
        assert raw(port, "POST", "/v1/completions", {"model": NAME}, {"Authorization": "Bearer sekret"})[0] == 400
        assert raw(port, "POST", "/v1/completions", body, {"Authorization": "Bearer wrong"})[0] == 401
        assert raw(port, "GET", "/v1/models", None, {"Authorization": "sekret"})[0] == 401
        assert raw(port, "POST", "/v1/completions", body, {"Authorization": "Bearer sekret"})[0] == 200
        with pytest.raises(openai.AuthenticationError):
            client(port, "wrong").models.list()
        assert client(port, "sekret").completions.create(**body).choices
        assert raw(port, "GET", "/health")[0] == 200  # liveness stays open


def test_cli_serve_generate_and_eval_options(tiny_run, corpus_dir, capsys):
    from conftest import run_cli

    for argv, expected in [
        (["serve", tiny_run, "--port", 0], "--port"),
        (["serve", tiny_run, "--max-batch", 0], "--max-batch"),
        (["serve", tiny_run, "--compile", "--quantize", "bf16"], "alternatives"),
        (["serve", tiny_run / "missing"], "not found"),
        (["generate", tiny_run, "--prompt", "x", "--top-p", "1.5"], "top_p"),
        (["generate", tiny_run, "--prompt", "x", "--repetition-penalty", "0"], "repetition_penalty"),
    ]:
        code, _, err = run_cli(capsys, *argv)
        lines = err.strip().splitlines()
        assert code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (argv, err)
    code, out, err = run_cli(
        capsys, "generate", tiny_run, "--prompt", "1: the", "--greedy", "--max-new-tokens", 20, "--stop", "."
    )
    assert code == 0 and out.startswith("1: the") and "." not in out[len("1: the") :], err
    assert out.endswith("\n")  # the shell prompt starts on a line of its own
    code, out, err = run_cli(
        capsys, "generate", tiny_run, "--prompt", "1: the", "--quantize", "bf16", "--max-new-tokens", 5, "--seed", 1
    )
    assert code == 0, err
    code, out, err = run_cli(capsys, "eval", tiny_run, "--data", corpus_dir / "part0.txt", "--quantize", "int8")
    assert code == 0 and "perplexity" in out, err


def test_empty_api_key_means_no_key(model_tok, tiny_run, monkeypatch, capsys):
    model, tok = model_tok
    body = {"model": NAME, "prompt": "1:", "max_tokens": 2}
    with running(create_app(model, tok, NAME, api_key="")) as port:
        assert raw(port, "POST", "/v1/completions", body)[0] == 200
        assert raw(port, "POST", "/v1/completions", body, {"Authorization": "Bearer "})[0] == 200
    # the CLI: --api-key "" overrides $LMFORGE_API_KEY and serves without a key, as it says
    from conftest import run_cli

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app))
    monkeypatch.setenv("LMFORGE_API_KEY", "from-env")
    code, out, err = run_cli(capsys, "serve", tiny_run, "--api-key", "", "--model-name", NAME)
    assert code == 0 and "no API key" in out, err
    with running(served["app"]) as port:
        assert raw(port, "POST", "/v1/completions", body)[0] == 200
    code, out, _ = run_cli(capsys, "serve", tiny_run, "--model-name", NAME)
    assert code == 0 and "API key required" in out
    with running(served["app"]) as port:
        assert raw(port, "POST", "/v1/completions", body)[0] == 401
        assert raw(port, "POST", "/v1/completions", body, {"Authorization": "Bearer from-env"})[0] == 200


NESTED_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{{ messages }}"


def test_a_slow_chat_template_does_not_freeze_the_server(model_tok):
    model, tok = model_tok
    app = create_app(model, tok, NAME, chat_template=NESTED_LOOPS, template_timeout=3.0)
    with running(app) as port:
        replies = []
        body = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        asking = threading.Thread(target=lambda: replies.append(raw(port, "POST", "/v1/chat/completions", body)))
        began = time.monotonic()
        asking.start()
        health = []
        while asking.is_alive() and time.monotonic() - began < 30:
            t = time.monotonic()
            status, reply = raw(port, "GET", "/health")
            health.append((status, time.monotonic() - t))
            time.sleep(0.05)
        asking.join()
        took = time.monotonic() - began
        status, reply = replies[0]
        assert status == 400 and "took longer than 3 s" in reply["error"]["message"], reply
        assert reply["error"]["param"] == "messages" and took < 15  # stopped at its limit (10^10 steps otherwise)
        assert len(health) >= 5 and all(s == 200 for s, _ in health)  # /health answered all along
        assert max(t for _, t in health) < 1.0, health
        assert client(port).completions.create(model=NAME, prompt="1:", max_tokens=2).choices  # still serving


def test_generate_cli_ends_its_line_when_interrupted(tiny_run, capsys, monkeypatch):
    from conftest import run_cli

    import lmforge.inference.engine as engine

    def interrupted(*a, **kw):
        yield " a piece"
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "generate_stream", interrupted)
    code, out, err = run_cli(capsys, "generate", tiny_run, "--prompt", "1: the")
    assert code == 130 and out == "1: the a piece\n" and "interrupted" in err


def test_echo_logprobs_score_the_prompt(server, model_tok):
    """echo + logprobs + max_tokens 0 (what lm-eval's local-completions sends): each prompt token's log-probability
    given the ones before it, the first null, token strings that concatenate to the text, offsets into it."""
    port, _ = server
    model, tok = model_tok
    text = "1: the cat sees the moon.\n2: ünï"
    ids = tok.encode(text)
    for prompt in (text, ids):
        status, body = raw(port, "POST", "/v1/completions", {"model": NAME, "prompt": prompt, "max_tokens": 0,
                                                               "echo": True, "logprobs": 2})  # fmt: skip
        assert status == 200, body
        (choice,) = body["choices"]
        lp = choice["logprobs"]
        assert choice["text"] == text and len(lp["tokens"]) == len(ids)
        assert b"".join(tok.token_bytes(i) for i in ids) == text.encode()
        for token, offset in zip(lp["tokens"], lp["text_offset"]):  # whole-character tokens sit at their offsets
            assert token.startswith("bytes:") or text[offset : offset + len(token)] == token
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        with torch.no_grad():
            want = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
        for t in range(1, len(ids)):
            assert lp["token_logprobs"][t] == pytest.approx(want[t - 1, ids[t]].item(), abs=1e-4)
            assert max(lp["top_logprobs"][t].values()) == pytest.approx(want[t - 1].max().item(), abs=1e-4)
    # echo with generation: the prompt's entries, then the new tokens', offsets continuing after the prompt
    status, body = raw(port, "POST", "/v1/completions", {"model": NAME, "prompt": ids, "max_tokens": 3, "echo": True,
                                                           "logprobs": 1, "temperature": 0})  # fmt: skip
    lp = body["choices"][0]["logprobs"]
    assert body["choices"][0]["text"].startswith(text) and len(lp["token_logprobs"]) == len(ids) + 3
    assert lp["text_offset"][len(ids)] == len(text)
    status, body = raw(port, "POST", "/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": 0})
    assert status == 400 and "max_tokens 0 needs echo" in body["error"]["message"]


def test_lm_eval_local_completions_scores_like_the_native_adapter(tiny_run, server, tmp_path):
    """The same local task, scored by lm-eval's `local-completions` client against this server and natively."""
    pytest.importorskip("lm_eval")
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from lmforge.evaluation import harness
    from lmforge.interop.hf import to_hf

    port, _ = server
    tasks = ["lmforge_toy"]
    manager = harness.task_manager(tasks, Path(__file__).parent / "harness_tasks")
    hf_dir = to_hf(tiny_run, tmp_path / "hf")  # the client tokenizes with the run's tokenizer, as exported
    client = LocalCompletionsAPI(
        base_url=f"http://127.0.0.1:{port}/v1/completions", model=NAME, tokenizer=str(hf_dir),
        tokenizer_backend="huggingface", tokenized_requests=True, num_concurrent=4, max_retries=1,
    )  # fmt: skip
    served = harness.evaluate(client, tasks, manager=manager)["results"]["lmforge_toy"]["acc,none"]
    native = harness.evaluate(harness.LmforgeLM(run=str(tiny_run)), tasks, manager=manager)
    assert served == native["results"]["lmforge_toy"]["acc,none"]
