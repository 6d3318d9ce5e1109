"""OpenAI-compatible HTTP server (FastAPI + uvicorn) over the batched generation engine.

    POST /v1/completions        text completion (stream: true -> server-sent events)
    POST /v1/chat/completions   chat, through the run's chat template or the plain one below
    GET  /v1/models             the one model served
    GET  /health                liveness and load
    GET  /openapi.json, /docs   the API schema

One background thread owns the model and runs the decode loop: requests wait in a queue, join the
running batch between decode steps (prompts that arrive together are prefilled together), and
leave it when they finish or their client goes away. The HTTP side only validates, queues and
streams, so the event loop never waits for the model.

Chat template for base models (used when the run has no template of its own):

    System: {system message}
    User: {user message}
    Assistant: {assistant message}
    ...
    Assistant:

with "\\nUser:" and "\\nSystem:" as stop strings, so the model's answer ends where it would start
the user's next turn. A run directory with a Hugging Face `tokenizer_config.json` holding a
`chat_template` (or a `chat_template.jinja` file) uses that template instead.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Literal, Union

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import LmforgeError
from .engine import Engine, Output, Request, TokenLogprob, prompt_logprobs
from .sampling import SamplingParams

DEFAULT_MAX_BODY = 1 << 20  # bytes
PLAIN_CHAT_STOP = ["\nUser:", "\nSystem:"]


# --- errors ---------------------------------------------------------------------------------------


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def error_response(status: int, message: str, param=None, code=None, kind="invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


# --- request bodies -------------------------------------------------------------------------------


class _Body(BaseModel):
    # Strict: "5" is not an int and true is not a number, as in OpenAI's API; unknown fields are ignored.
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="extension: keep the k most likely tokens (0 or -1 = off)")
    min_p: float | None = Field(
        None, ge=0, le=1, description="extension: drop tokens below min_p x the top probability"
    )
    repetition_penalty: float | None = Field(
        None, gt=0, description="extension: CTRL-style penalty on tokens seen before"
    )
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(False, description="extension: keep generating past end-of-text")
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = Field(None, ge=0, description="0: only the echoed prompt (with echo: true)")
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = Field(False, description="the prompt before the completion; with logprobs, its tokens' (first: null)")
    suffix: str | None = None
    best_of: int | None = None


class ContentPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[ContentPart], None] = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


# --- chat templates -------------------------------------------------------------------------------


def load_chat_template(run_dir: str | Path | None) -> str | None:
    """The run's own chat template (Hugging Face conventions), or None for the plain one."""
    if run_dir is None:
        return None
    run_dir = Path(run_dir)
    jinja = run_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    cfg = run_dir / "tokenizer_config.json"
    if cfg.is_file():
        try:
            template = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise LmforgeError(f"cannot read {cfg}: {e}") from None
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next(
                (t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None
            )
        return template if isinstance(template, str) else None
    return None


def render_chat(messages: list[dict], template: str | None, tokenizer) -> tuple[str, list[str]]:
    """(prompt text, extra stop strings) for a list of {"role", "content"} messages."""
    if template is None:
        names = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
        lines = [f"{names[m['role']]}: {m['content']}" for m in messages]
        return "\n".join(lines) + "\nAssistant:", list(PLAIN_CHAT_STOP)
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise TemplateError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        text = env.from_string(template).render(
            messages=messages, add_generation_prompt=True, bos_token="", eos_token=tokenizer.eos_token
        )
    except TemplateError as e:
        raise APIError(400, f"chat template: {e}", "messages") from None
    return text, []


# --- jobs and the decode loop ---------------------------------------------------------------------


class Job:
    """One HTTP request: one or more rows (prompts x n), and the queue their Outputs arrive on."""

    def __init__(self, reqs: list[Request], n: int, loop: asyncio.AbstractEventLoop):
        self.id = uuid.uuid4().hex
        self.reqs, self.n = reqs, n
        for i, r in enumerate(reqs):
            r.request_id = (self.id, i)
        self.loop = loop
        self.outputs: asyncio.Queue = asyncio.Queue()
        self.open = len(reqs)  # rows not finished yet, as seen by the HTTP side
        self.running = len(reqs)  # rows not finished yet, as seen by the worker

    def deliver(self, item):  # called from the worker thread
        self.loop.call_soon_threadsafe(self.outputs.put_nowait, item)


class Worker:
    """Owns the engine; a background thread admits waiting rows between decode steps and steps the batch."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.waiting: deque[Request] = deque()
        self.jobs: dict[str, Job] = {}
        self.cancelled: set[str] = set()
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="lmforge-decode", daemon=True)
        self.cancelled_rows = 0  # rows stopped because their client went away

    def start(self):
        self.thread.start()

    def stop(self):
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout=30)

    def submit(self, job: Job):
        with self.cond:
            self.jobs[job.id] = job
            self.waiting.extend(job.reqs)
            self.cond.notify()

    def cancel(self, job: Job):
        with self.cond:
            self.cancelled.add(job.id)
            self.cond.notify()

    @property
    def load(self) -> dict:
        with self.cond:
            return {"running": len(self.engine.rows), "waiting": len(self.waiting), "max_batch": self.engine.max_batch}

    def _loop(self):
        while True:
            with self.cond:
                while not (self.stopping or self.waiting or self.cancelled or self.engine.rows):
                    self.cond.wait()
                if self.stopping:
                    return
                cancelled, self.cancelled = self.cancelled, set()
                if cancelled:
                    self.waiting = deque(r for r in self.waiting if r.request_id[0] not in cancelled)
                for job_id in cancelled:
                    job = self.jobs.pop(job_id, None)
                    for r in job.reqs if job else []:
                        self.cancelled_rows += self.engine.cancel(r.request_id)
                group: list[Request] = []  # rows that arrived together are prefilled together
                while (
                    self.waiting
                    and len(group) < self.engine.free
                    and self.engine.fits_together(group + [self.waiting[0]])
                ):
                    group.append(self.waiting.popleft())
            if group:
                try:
                    self._dispatch(self.engine.add(group))
                except Exception as e:  # fail these requests, keep serving the others
                    self._fail({r.request_id[0] for r in group}, e)
            if self.engine.rows:
                try:
                    self._dispatch(self.engine.step())
                except Exception as e:  # a bug or out of memory: fail the requests in flight, keep serving
                    self._fail({row.req.request_id[0] for row in self.engine.rows}, e)

    def _dispatch(self, outputs: list[Output]):
        for out in outputs:
            job = self.jobs.get(out.request_id[0])
            if job is None:
                continue
            job.deliver(out)
            if out.finish_reason:
                job.running -= 1
                if job.running == 0:
                    with self.cond:
                        self.jobs.pop(job.id, None)

    def _fail(self, job_ids: set, error: Exception):
        with self.cond:
            for job_id in job_ids:
                job = self.jobs.pop(job_id, None)
                if job is None:
                    continue
                job.deliver(error)
                self.waiting = deque(r for r in self.waiting if r.request_id[0] != job_id)
                for r in job.reqs:
                    self.engine.cancel(r.request_id)


# --- the app --------------------------------------------------------------------------------------


class BodyLimit:
    """ASGI middleware: refuse request bodies over max_bytes with 413, whether declared or streamed (chunked)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        too_big = error_response(413, f"request body larger than {self.max_bytes} bytes")
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await too_big(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:  # read the whole (bounded) body before the app sees any of it
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await too_big(scope, receive, send)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: disconnect notices

        await self.app(scope, replay, send)


def create_app(
    model,
    tokenizer,
    model_name: str,
    api_key: str | None = None,
    max_batch: int = 16,
    chat_template: str | None = None,
    max_body: int = DEFAULT_MAX_BODY,
    compile: bool = False,
) -> FastAPI:
    """The FastAPI application serving `model`; the decode thread starts and stops with the app."""
    engine = Engine(model, tokenizer, max_batch=max_batch, compile=compile)
    worker = Worker(engine)
    context = engine.limit
    created = int(time.time())

    async def lifespan(app):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(
        title="lmforge",
        version="1",
        lifespan=lifespan,
        description="OpenAI-compatible completions and chat over an lmforge run.",
    )
    app.state.worker = worker
    app.add_middleware(BodyLimit, max_bytes=max_body)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e.status, e.message, e.param, e.code, e.kind)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {"msg": "invalid request", "loc": ()}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            return error_response(400, "request body is not valid JSON", None, "invalid_json")
        if err.get("type") == "model_attributes_type" or not loc:
            return error_response(400, f"request body must be a JSON object: {err['msg']}", None)
        # drop pydantic's union-branch names (e.g. "str", "list[int]") from the field path
        path = ".".join(
            x for x in loc if not (x.startswith(("str", "list", "dict", "int")) or x in ("function-after",))
        )
        return error_response(400, f"{path or loc[0]}: {err['msg']}", path or loc[0])

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        return error_response(
            e.status_code, str(e.detail), None, None, "invalid_request_error" if e.status_code < 500 else "server_error"
        )

    def check_auth(request: HTTPRequest):
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(
                401, "missing or invalid API key (send 'Authorization: Bearer KEY')", None, "invalid_api_key"
            )

    def check_model(name: str):
        if name != model_name:
            raise APIError(
                400, f"model {name!r} not found; this server serves {model_name!r}", "model", "model_not_found"
            )

    def sampling(
        body: _Sampling,
        max_tokens: int | None,
        prompt_len: int,
        default_max: int | None,
        extra_stop: list[str],
        logprobs: int | None,
    ):
        if body.logit_bias:
            raise APIError(400, "logit_bias is not supported", "logit_bias")
        if prompt_len >= context:
            raise APIError(
                400,
                f"prompt is {prompt_len} tokens; this model's context is {context} tokens",
                "messages" if extra_stop else "prompt",
                "context_length_exceeded",
            )
        room = context - prompt_len
        if max_tokens is None:
            max_tokens = room if default_max is None else min(default_max, room)
        elif prompt_len + max_tokens > context:
            raise APIError(
                400,
                f"this model's context is {context} tokens, but {prompt_len} prompt tokens + max_tokens {max_tokens} "
                f"= {prompt_len + max_tokens}",
                "max_tokens",
                "context_length_exceeded",
            )
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if any(not s for s in stop) or len(stop) > 16:
            raise APIError(400, "stop must be up to 16 non-empty strings", "stop")
        top_k = body.top_k if body.top_k and body.top_k > 0 else None
        return SamplingParams(
            max_new_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_k=top_k,
            top_p=body.top_p,
            min_p=body.min_p,
            repetition_penalty=body.repetition_penalty or 1.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            presence_penalty=body.presence_penalty or 0.0,
            seed=body.seed,
            stop=stop + extra_stop,
            logprobs=logprobs,
            ignore_eos=body.ignore_eos,
        )

    def make_rows(prompts: list[list[int]], n: int, params_for, seed: int | None) -> list[Request]:
        if len(prompts) * n > engine.max_batch:
            raise APIError(
                400, f"{len(prompts)} prompt(s) x n={n} exceeds this server's batch of {engine.max_batch}", "n"
            )
        reqs = []
        for ids in prompts:
            for i in range(n):
                p = params_for(ids)
                if seed is not None:
                    p.seed = seed + i  # n different samples, each reproducible
                reqs.append(Request(ids, p))
        return reqs

    def token_text(i: int) -> str:
        return tokenizer.decode([i])

    async def run_job(job: Job, request: HTTPRequest):
        """Wait for every row of a non-streamed job; cancel it if the client goes away."""
        results = {i: {"text": "", "tokens": 0, "logprobs": [], "finish_reason": None} for i in range(len(job.reqs))}
        while job.open:
            try:
                out = await asyncio.wait_for(job.outputs.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    worker.cancel(job)
                    raise APIError(499, "client closed the request")
                continue
            if isinstance(out, Exception):
                raise APIError(500, f"generation failed: {out}", kind="server_error")
            r = results[out.request_id[1]]
            r["text"] += out.text
            r["tokens"] += len(out.token_ids)
            r["logprobs"] += out.logprobs
            if out.finish_reason:
                r["finish_reason"] = out.finish_reason
                job.open -= 1
        return results

    def usage(job: Job, completion_tokens: int) -> dict:
        prompt = sum(len(r.prompt_ids) for i, r in enumerate(job.reqs) if i % job.n == 0)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt + completion_tokens,
        }

    def completion_logprobs(entries: list[TokenLogprob], offset: int) -> dict:
        tokens = [token_text(e.token_id) for e in entries]
        offsets, pos = [], offset
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{token_text(i): lp for i, lp in e.top} for e in entries],
            "text_offset": offsets,
        }

    async def echo_prompt(ids: list[int], n_top: int | None) -> tuple[str, dict | None]:
        """(prompt text, OpenAI logprobs of its tokens or None): the first token's log-probability is null.
        Token strings are the pieces a streaming decoder gives (a character split over tokens comes out whole
        with its last token), so they concatenate to the text and text_offset indexes into it."""
        if len(ids) > context:
            raise APIError(
                400, f"prompt is {len(ids)} tokens; this model's context is {context} tokens", "prompt",
                "context_length_exceeded",
            )  # fmt: skip
        decoder = tokenizer.stream_decoder()
        pieces = [decoder.push(i) for i in ids]
        pieces[-1] += decoder.flush()
        text = "".join(pieces)
        if n_top is None:
            return text, None
        # a forward pass on the event loop's helper thread; the decode thread keeps its own cache untouched
        entries = await asyncio.to_thread(prompt_logprobs, engine.model, ids, n_top)
        offsets = [sum(map(len, pieces[:k])) for k in range(len(pieces))]
        return text, {
            "tokens": pieces,
            "token_logprobs": [e.logprob if e else None for e in entries],
            "top_logprobs": [{token_text(i): lp for i, lp in e.top} if e else None for e in entries],
            "text_offset": offsets,
        }

    def chat_logprobs(entries: list[TokenLogprob]) -> dict:
        def item(i, lp):
            t = token_text(i)
            return {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}

        return {
            "content": [
                {**item(e.token_id, e.logprob), "top_logprobs": [item(i, lp) for i, lp in e.top]} for e in entries
            ]
        }

    def stream(job: Job, request: HTTPRequest, chunk, final_usage: bool):
        """SSE response: one `data: {...}` event per piece, then `data: [DONE]`; a client leaving frees its rows."""

        async def events():
            completion_tokens = 0
            try:
                for head in chunk(None, first=True):
                    yield f"data: {json.dumps(head)}\n\n"
                while job.open:
                    out = await job.outputs.get()
                    if isinstance(out, Exception):
                        err = {
                            "error": {
                                "message": f"generation failed: {out}",
                                "type": "server_error",
                                "param": None,
                                "code": None,
                            }
                        }
                        yield f"data: {json.dumps(err)}\n\n"
                        break
                    completion_tokens += len(out.token_ids)
                    if out.finish_reason:
                        job.open -= 1
                    if out.text or out.finish_reason or out.logprobs:
                        for c in chunk(out):
                            yield f"data: {json.dumps(c)}\n\n"
                if final_usage:
                    yield f"data: {json.dumps(chunk(None, usage=usage(job, completion_tokens))[0])}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                if job.open:
                    worker.cancel(job)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # --- routes ---------------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, **worker.load}

    @app.get("/v1/models")
    async def models(request: HTTPRequest):
        check_auth(request)
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "lmforge"}],
        }

    @app.get("/v1/models/{name}")
    async def model_info(name: str, request: HTTPRequest):
        check_auth(request)
        if name != model_name:
            raise APIError(404, f"model {name!r} not found", "model", "model_not_found")
        return {"id": model_name, "object": "model", "created": created, "owned_by": "lmforge"}

    @app.post("/v1/completions", responses={400: {"description": "invalid request (OpenAI-style error body)"}})
    async def completions(body: CompletionRequest, request: HTTPRequest):
        check_auth(request)
        check_model(body.model)
        for name, bad in (
            ("suffix", body.suffix),
            ("best_of", body.best_of not in (None, body.n)),
        ):
            if bad:
                raise APIError(400, f"{name} is not supported", name)
        if body.echo and body.stream:
            raise APIError(400, "echo is not supported with stream", "echo")
        if body.max_tokens == 0 and not body.echo:
            raise APIError(
                400, "max_tokens 0 needs echo: true (it scores the prompt, generating nothing)", "max_tokens"
            )
        p = body.prompt
        if isinstance(p, str):
            prompts = [p]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]
        else:
            prompts = list(p)
        if not prompts:
            raise APIError(400, "prompt must not be empty", "prompt")
        ids = []
        for x in prompts:
            t = (tokenizer.encode(x) or [tokenizer.eos_id]) if isinstance(x, str) else list(x)
            if not t or any(not 0 <= i < engine.vocab for i in t):
                raise APIError(400, f"prompt token ids must be in [0, {engine.vocab}) and not empty", "prompt")
            ids.append(t)
        echoes = [await echo_prompt(t, body.logprobs) for t in ids] if body.echo else None
        if body.max_tokens == 0:  # scoring only: the prompts, their log-probabilities, no generation
            return {
                "id": "cmpl-" + uuid.uuid4().hex,
                "object": "text_completion",
                "created": int(time.time()),
                "model": model_name,
                "choices": [
                    {"index": i * body.n + k, "text": text, "finish_reason": "length", "logprobs": lp}
                    for i, (text, lp) in enumerate(echoes)
                    for k in range(body.n)
                ],
                "usage": {
                    "prompt_tokens": sum(map(len, ids)),
                    "completion_tokens": 0,
                    "total_tokens": sum(map(len, ids)),
                },
            }
        reqs = make_rows(
            ids, body.n, lambda t: sampling(body, body.max_tokens, len(t), 16, [], body.logprobs), body.seed
        )
        job = Job(reqs, body.n, asyncio.get_running_loop())
        rid = "cmpl-" + job.id
        now = int(time.time())
        worker.submit(job)

        if body.stream:
            offsets = [0] * len(reqs)

            def chunk(out: Output | None, first=False, usage=None):
                if first:
                    return []
                if usage is not None:
                    return [
                        {
                            "id": rid,
                            "object": "text_completion",
                            "created": now,
                            "model": model_name,
                            "choices": [],
                            "usage": usage,
                        }
                    ]
                i = out.request_id[1]
                lp = completion_logprobs(out.logprobs, offsets[i]) if body.logprobs is not None else None
                offsets[i] += len(out.text)
                return [
                    {
                        "id": rid,
                        "object": "text_completion",
                        "created": now,
                        "model": model_name,
                        "choices": [{"index": i, "text": out.text, "logprobs": lp, "finish_reason": out.finish_reason}],
                    }
                ]

            return stream(job, request, chunk, bool(body.stream_options and body.stream_options.include_usage))

        results = await run_job(job, request)
        choices = []
        for i, r in results.items():
            prefix, prefix_lp = echoes[i // body.n] if echoes else ("", None)
            lp = completion_logprobs(r["logprobs"], len(prefix)) if body.logprobs is not None else None
            if prefix_lp is not None:
                lp = {k: prefix_lp[k] + lp[k] for k in lp}
            choices.append(
                {"index": i, "text": prefix + r["text"], "finish_reason": r["finish_reason"], "logprobs": lp}
            )
        return {
            "id": rid,
            "object": "text_completion",
            "created": now,
            "model": model_name,
            "choices": choices,
            "usage": usage(job, sum(r["tokens"] for r in results.values())),
        }

    @app.post("/v1/chat/completions", responses={400: {"description": "invalid request (OpenAI-style error body)"}})
    async def chat(body: ChatRequest, request: HTTPRequest):
        check_auth(request)
        check_model(body.model)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        messages = []
        for m in body.messages:
            content = m.content if isinstance(m.content, str) else "".join(part.text for part in (m.content or []))
            messages.append({"role": m.role, "content": content})
        text, extra_stop = render_chat(messages, chat_template, tokenizer)
        ids = tokenizer.encode(text)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        reqs = make_rows(
            [ids], body.n, lambda t: sampling(body, max_tokens, len(t), None, extra_stop, logprobs), body.seed
        )
        job = Job(reqs, body.n, asyncio.get_running_loop())
        rid = "chatcmpl-" + job.id
        now = int(time.time())
        worker.submit(job)

        if body.stream:

            def chunk(out: Output | None, first=False, usage=None):
                base = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name}
                if first:
                    return [
                        {
                            **base,
                            "choices": [
                                {
                                    "index": i,
                                    "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None,
                                    "finish_reason": None,
                                }
                            ],
                        }
                        for i in range(len(reqs))
                    ]
                if usage is not None:
                    return [{**base, "choices": [], "usage": usage}]
                delta = {"content": out.text} if out.text else {}
                lp = chat_logprobs(out.logprobs) if body.logprobs else None
                return [
                    {
                        **base,
                        "choices": [
                            {
                                "index": out.request_id[1],
                                "delta": delta,
                                "logprobs": lp,
                                "finish_reason": out.finish_reason,
                            }
                        ],
                    }
                ]

            return stream(job, request, chunk, bool(body.stream_options and body.stream_options.include_usage))

        results = await run_job(job, request)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": r["text"]},
                "finish_reason": r["finish_reason"],
                "logprobs": chat_logprobs(r["logprobs"]) if body.logprobs else None,
            }
            for i, r in results.items()
        ]
        return {
            "id": rid,
            "object": "chat.completion",
            "created": now,
            "model": model_name,
            "choices": choices,
            "usage": usage(job, sum(r["tokens"] for r in results.values())),
        }

    return app


def serve(
    run_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    model_name: str | None = None,
    max_batch: int = 16,
    device: str = "cpu",
    quantize: str | None = None,
    compile: bool = False,
    log_level: str = "info",
) -> None:
    """Load a run and serve it until interrupted."""
    import uvicorn

    from ..runs import load
    from .quantize import pack_for_inference

    model, tokenizer = load(run_dir, device=device)
    if not compile:  # compiling packs the weights itself
        pack_for_inference(model, quantize)
    name = model_name or Path(run_dir).resolve().name
    app = create_app(
        model,
        tokenizer,
        name,
        api_key=api_key,
        max_batch=max_batch,
        chat_template=load_chat_template(run_dir),
        compile=compile,
    )
    auth = "API key required" if api_key else "no API key"
    print(f"serving {name} on http://{host}:{port}/v1 ({auth}; max batch {max_batch}; docs at /docs)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
