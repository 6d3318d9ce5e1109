"""OpenAI-compatible HTTP server (FastAPI + uvicorn) over the batched generation engine.

    POST /v1/completions        text completion (stream: true -> server-sent events)
    POST /v1/chat/completions   chat, through the run's chat template or the plain one (lmforge.data.chat)
    GET  /v1/models             the one model served
    GET  /health                liveness and load
    GET  /openapi.json, /docs   the API schema

One background thread owns the model and runs the decode loop (`Worker`): requests wait in a queue,
join the running batch between decode steps (prompts that arrive together are prefilled together),
and leave it when they finish or their client goes away. The HTTP side (`Service`) only validates,
queues and streams, so the event loop never waits for the model:

    request body --openai_api--> prompts, SamplingParams --Service.submit--> Job (rows) --Worker--> Engine
    Engine Outputs --Job.outputs queue--> Service.collect (whole response) or Service.stream (SSE chunks)

Before any route, two ASGI middlewares refuse a request without its API key (401, `APIKeyAuth`) and
one whose body is too large (413, `BodyLimit`). Chat templates are rendered in a worker thread under a
time limit (`lmforge.data.chat`). The OpenAI wire format (bodies, choices, chunks, usage, logprobs,
errors) lives in `openai_api.py`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import secrets
import threading
import time
import uuid
from collections import deque
from pathlib import Path

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..data.chat import encode_chat, load_chat_template
from ..errors import LmforgeError
from .engine import Engine, Output, Request, prompt_logprobs
from .openai_api import (
    COMPLETION_MAX_TOKENS,
    APIError,
    ChatFormat,
    ChatRequest,
    CompletionFormat,
    CompletionRequest,
    Echo,
    ResponseFormat,
    RowResult,
    TokenStrings,
    chat_logprobs_setting,
    chat_messages,
    check_prompt_ids,
    completion_prompts,
    error_body,
    sampling_params,
    validation_error,
)

DEFAULT_MAX_BODY = 1 << 20  # bytes
DEFAULT_TEMPLATE_TIMEOUT = 2.0  # seconds a chat template may take to render one request's messages


def error_response(status: int, message: str, param=None, code=None, kind="invalid_request_error") -> JSONResponse:
    return JSONResponse(error_body(message, param, code, kind), status_code=status)


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

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens of the request (each prompt once, however many samples n it asks for)."""
        return sum(len(r.prompt_ids) for r in self.reqs[:: self.n])

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


# --- the HTTP side: validate, queue, answer ---------------------------------------------------------


class Service:
    """What the routes do: check a request, turn it into engine rows, submit them, and answer (whole or streamed)."""

    def __init__(
        self, worker: Worker, tokenizer, model_name: str, chat_template: str | None, template_timeout: float | None
    ):
        self.worker, self.engine = worker, worker.engine
        self.tokenizer, self.model_name = tokenizer, model_name
        self.chat_template, self.template_timeout = chat_template, template_timeout
        self.names = TokenStrings(tokenizer)
        self.created = int(time.time())

    # --- checks ---------------------------------------------------------------------------------

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(
                400, f"model {name!r} not found; this server serves {self.model_name!r}", "model", "model_not_found"
            )

    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        """A completion prompt as token ids (an empty text starts a fresh document, as in generate)."""
        try:
            ids = (self.tokenizer.encode(prompt) or [self.tokenizer.eos_id]) if isinstance(prompt, str) else prompt
        except LmforgeError as e:
            raise APIError(400, str(e), "prompt") from None
        return check_prompt_ids(ids, self.engine.vocab)

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "lmforge"}

    # --- the endpoints ----------------------------------------------------------------------------

    async def completions(self, body: CompletionRequest, request: HTTPRequest):
        self.check_model(body.model)
        prompts = [self.prompt_ids(p) for p in completion_prompts(body)]
        echoes = [await self.echo(ids, body.logprobs) for ids in prompts] if body.echo else None
        fmt = functools.partial(CompletionFormat, echoes=echoes, n=body.n)
        if body.max_tokens == 0:  # scoring only (what benchmark clients send): the echoed prompts, nothing new
            wire = fmt(uuid.uuid4().hex, int(time.time()), self.model_name, body.logprobs is not None, self.names)
            rows = [RowResult(finish_reason="length") for _ in range(len(prompts) * body.n)]
            return wire.response(rows, sum(map(len, prompts)))

        def params(prompt_len: int):
            return sampling_params(
                body,
                prompt_len=prompt_len,
                context=self.engine.limit,
                max_tokens=body.max_tokens,
                default_max=COMPLETION_MAX_TOKENS,
                logprobs=body.logprobs,
            )

        return await self.submit(request, body, prompts, params, fmt, body.logprobs is not None)

    async def echo(self, ids: list[int], n_top: int | None) -> Echo:
        """A prompt to send back, scored when logprobs are asked for: one forward pass in a helper thread (no KV
        cache, so the decode thread's rows are untouched)."""
        if len(ids) > self.engine.limit:
            raise APIError(
                400,
                f"prompt is {len(ids)} tokens; this model's context is {self.engine.limit} tokens",
                "prompt",
                "context_length_exceeded",
            )
        if n_top is None:
            return Echo(ids)
        return Echo(ids, await asyncio.to_thread(prompt_logprobs, self.engine.model, ids, n_top))

    async def chat(self, body: ChatRequest, request: HTTPRequest):
        self.check_model(body.model)
        messages = chat_messages(body)
        try:  # in a thread, with a time limit: a slow template must not hold up the event loop
            ids, extra_stop = await asyncio.to_thread(
                encode_chat, messages, self.chat_template, self.tokenizer, self.template_timeout
            )
        except LmforgeError as e:  # the template refuses these messages or takes too long
            raise APIError(400, str(e), "messages") from None
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens

        def params(prompt_len: int):
            return sampling_params(
                body,
                prompt_len=prompt_len,
                context=self.engine.limit,
                max_tokens=max_tokens,
                default_max=None,
                extra_stop=extra_stop,
                logprobs=chat_logprobs_setting(body),
                prompt_param="messages",
            )

        return await self.submit(request, body, [ids], params, ChatFormat, body.logprobs)

    # --- the shared path --------------------------------------------------------------------------

    async def submit(self, request: HTTPRequest, body, prompts: list[list[int]], params_for, fmt, logprobs: bool):
        """Queue n rows per prompt (seeded seed, seed+1, ...), then answer as a whole response or a stream."""
        if len(prompts) * body.n > self.engine.max_batch:
            raise APIError(
                400,
                f"{len(prompts)} prompt(s) x n={body.n} exceeds this server's batch of {self.engine.max_batch}",
                "n",
            )
        reqs = []
        for ids in prompts:
            for i in range(body.n):
                p = params_for(len(ids))
                if body.seed is not None:
                    p.seed = body.seed + i  # n different samples, each reproducible
                reqs.append(Request(ids, p))
        job = Job(reqs, body.n, asyncio.get_running_loop())
        wire: ResponseFormat = fmt(job.id, int(time.time()), self.model_name, logprobs, self.names)
        self.worker.submit(job)
        if body.stream:
            events = self.stream(job, wire, body.include_usage)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return wire.response(await self.collect(job, request), job.prompt_tokens)

    async def collect(self, job: Job, request: HTTPRequest) -> list[RowResult]:
        """Wait for every row of a non-streamed job; cancel it if the client goes away."""
        results = [RowResult() for _ in job.reqs]
        while job.open:
            try:
                out = await asyncio.wait_for(job.outputs.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    self.worker.cancel(job)
                    raise APIError(499, "client closed the request") from None
                continue
            if isinstance(out, Exception):
                raise APIError(500, f"generation failed: {out}", kind="server_error")
            results[out.request_id[1]].add(out)
            if out.finish_reason:
                job.open -= 1
        return results

    async def stream(self, job: Job, wire: ResponseFormat, include_usage: bool):
        """Server-sent events: one `data: {...}` per chunk, then `data: [DONE]`; a client leaving frees its rows."""

        def event(obj) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        completion_tokens = 0
        try:
            for head in wire.first_chunks(len(job.reqs)):
                yield event(head)
            while job.open:
                out = await job.outputs.get()
                if isinstance(out, Exception):
                    yield event(error_body(f"generation failed: {out}", kind="server_error"))
                    break
                completion_tokens += len(out.token_ids)
                if out.finish_reason:
                    job.open -= 1
                if out.text or out.finish_reason or out.logprobs:
                    yield event(wire.chunk(out, out.request_id[1]))
            if include_usage:
                yield event(wire.usage_chunk(job.prompt_tokens, completion_tokens))
            yield "data: [DONE]\n\n"
        finally:
            if job.open:
                self.worker.cancel(job)


# --- the app --------------------------------------------------------------------------------------


class APIKeyAuth:
    """ASGI middleware: a /v1 request without `Authorization: Bearer KEY` gets 401 before anything reads its body."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1") and not self._authorized(scope):
            refusal = error_response(
                401, "missing or invalid API key (send 'Authorization: Bearer KEY')", None, "invalid_api_key"
            )
            return await refusal(scope, receive, send)
        return await self.app(scope, receive, send)

    def _authorized(self, scope) -> bool:
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode("latin-1"), self.key)


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
    template_timeout: float | None = DEFAULT_TEMPLATE_TIMEOUT,
) -> FastAPI:
    """The FastAPI application serving `model`; the decode thread starts and stops with the app.

    api_key: require `Authorization: Bearer KEY` on /v1 routes (None or "": open). chat_template:
    Jinja source for chat (None: the plain template), rendered off the event loop and refused (400)
    past template_timeout seconds. max_body: larger request bodies get 413.
    """
    worker = Worker(Engine(model, tokenizer, max_batch=max_batch, compile=compile))
    service = Service(worker, tokenizer, model_name, chat_template, template_timeout)

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
    if api_key:  # added last, so it runs first: refused requests are not even read
        app.add_middleware(APIKeyAuth, api_key=api_key)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    bad_request = {400: {"description": "invalid request (OpenAI-style error body)"}}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, **worker.load}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [service.model_card()]}

    @app.get("/v1/models/{name}")
    async def model_info(name: str):
        if name != model_name:
            raise APIError(404, f"model {name!r} not found", "model", "model_not_found")
        return service.model_card()

    @app.post("/v1/completions", responses=bad_request)
    async def completions(body: CompletionRequest, request: HTTPRequest):
        return await service.completions(body, request)

    @app.post("/v1/chat/completions", responses=bad_request)
    async def chat(body: ChatRequest, request: HTTPRequest):
        return await service.chat(body, request)

    return app


async def _api_error(request, e: APIError):
    return JSONResponse(e.body(), status_code=e.status)


async def _invalid_request(request, e: RequestValidationError):
    return await _api_error(request, validation_error(e.errors()))


async def _http_error(request, e: StarletteHTTPException):
    kind = "invalid_request_error" if e.status_code < 500 else "server_error"
    return error_response(e.status_code, str(e.detail), None, None, kind)


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
        pack_for_inference(model, quantize, compiled=True)  # a server decodes enough to repay compiling a kernel
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
    auth = "API key required" if api_key else "no API key"  # ("" is no key, as in create_app)
    print(f"serving {name} on http://{host}:{port}/v1 ({auth}; max batch {max_batch}; docs at /docs)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
