"""The OpenAI wire format, as plain functions: request bodies in, sampling settings out; engine outputs in, JSON out.

Nothing here knows about HTTP, threads or the model, so tests call it directly.

    request bodies    CompletionRequest, ChatRequest (pydantic, strict: "5" is not an int)
    request -> work   completion_prompts, chat_messages, check_prompt_ids, sampling_params
    work -> response  Rows (collects a job's Outputs), CompletionFormat / ChatFormat (choices, stream chunks,
                      whole responses), usage, completion_logprobs, chat_logprobs
    errors            APIError, error_body, validation_error (pydantic's errors -> one OpenAI-style error)

A completion response is {"id", "object": "text_completion", "created", "model", "choices": [{"index",
"text", "logprobs", "finish_reason"}], "usage"}; a chat response has "object": "chat.completion" and
choices with a "message"; streamed, each server-sent event holds one chunk of the same shape with the
new text ("text", or a chat "delta"), and a last chunk with "usage" and no choices when
stream_options.include_usage asks for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from .engine import Output, TokenLogprob
from .sampling import SamplingParams

COMPLETION_MAX_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions (chat: the rest of the context)
MAX_STOP = 16  # stop strings per request at most


# --- errors ---------------------------------------------------------------------------------------


class APIError(Exception):
    """A request the server refuses: HTTP status and an OpenAI-style error (message, param, code, type)."""

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

    def body(self) -> dict:
        return error_body(self.message, self.param, self.code, self.kind)


def error_body(message: str, param=None, code=None, kind="invalid_request_error") -> dict:
    """{"error": {"message", "type", "param", "code"}}, the body of every OpenAI error response."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def validation_error(errors: list[dict]) -> APIError:
    """One 400 error for pydantic's list of validation errors (the first one, named by its field path)."""
    # an error our own checks raised (e.g. a lone surrogate) says more than another union branch's mismatch
    err = next((e for e in errors if e.get("type") == "value_error"), errors[0] if errors else None)
    err = err or {"msg": "invalid request", "loc": ()}
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    if err.get("type") == "json_invalid":
        return APIError(400, "request body is not valid JSON", None, "invalid_json")
    if err.get("type") == "model_attributes_type" or not loc:
        return APIError(400, f"request body must be a JSON object: {err['msg']}")
    # drop pydantic's union-branch names (e.g. "str", "list[int]") from the field path
    path = ".".join(x for x in loc if not x.startswith(("str", "list", "dict", "int", "function-after")))
    return APIError(400, f"{path or loc[0]}: {err['msg']}", path or loc[0])


# --- request bodies -------------------------------------------------------------------------------


def _unicode(text: str) -> str:
    """Refuse a lone UTF-16 surrogate: JSON can carry one ("\\ud800"), but it is no character, so no text holds it."""
    for i, c in enumerate(text):
        if "\ud800" <= c <= "\udfff":
            raise ValueError(f"not valid Unicode: a lone surrogate U+{ord(c):04X} at character {i}")
    return text


Text = Annotated[str, AfterValidator(_unicode)]  # every string a request carries


class _Body(BaseModel):
    # Strict: "5" is not an int and true is not a number, as in OpenAI's API; unknown fields are ignored.
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class SamplingFields(_Body):
    """The fields completions and chat share: the model, sampling settings, n, streaming."""

    model: Text
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
    stop: Union[Text, list[Text], None] = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(False, description="extension: keep generating past end-of-text")
    logit_bias: dict[str, float] | None = None
    user: Text | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    prompt: Union[Text, list[Text], list[int], list[list[int]]]
    max_tokens: int | None = Field(None, ge=0, description="0 (with echo): score the prompt, generate nothing")
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = Field(False, description="the prompt before the completion; with logprobs, its tokens' (first null)")
    suffix: Text | None = None
    best_of: int | None = None


class ContentPart(_Body):
    type: Literal["text"]
    text: Text


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[Text, list[ContentPart], None] = None


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


# --- request -> work ------------------------------------------------------------------------------


def completion_prompts(body: CompletionRequest) -> list[str | list[int]]:
    """The prompts of a completion request: one text or token-id list per prompt. APIError for what we do not do."""
    for name, bad in (("suffix", body.suffix), ("best_of", body.best_of not in (None, body.n))):
        if bad:
            raise APIError(400, f"{name} is not supported", name)
    if body.echo and body.stream:
        raise APIError(400, "echo is not supported with stream", "echo")
    if body.max_tokens == 0 and not body.echo:
        raise APIError(400, "max_tokens 0 needs echo: true (it scores the prompt, generating nothing)", "max_tokens")
    p = body.prompt
    if isinstance(p, str):
        prompts = [p]
    elif p and all(isinstance(x, int) for x in p):
        prompts = [list(p)]
    else:
        prompts = list(p)
    if not prompts:
        raise APIError(400, "prompt must not be empty", "prompt")
    return prompts


def check_prompt_ids(ids: list[int], vocab: int) -> list[int]:
    """ids, if they are a non-empty list of valid token ids; else APIError."""
    if not ids or any(not 0 <= i < vocab for i in ids):
        raise APIError(400, f"prompt token ids must be in [0, {vocab}) and not empty", "prompt")
    return ids


def chat_messages(body: ChatRequest) -> list[dict]:
    """The messages as {"role", "content"} dicts with text content (content parts joined)."""
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    messages = []
    for m in body.messages:
        content = m.content if isinstance(m.content, str) else "".join(part.text for part in (m.content or []))
        messages.append({"role": m.role, "content": content})
    return messages


def chat_logprobs_setting(body: ChatRequest) -> int | None:
    """SamplingParams.logprobs for a chat request: None (off) or how many alternatives to report."""
    return (body.top_logprobs or 0) if body.logprobs else None


def sampling_params(
    body: SamplingFields,
    *,
    prompt_len: int,
    context: int,
    max_tokens: int | None,
    default_max: int | None,
    extra_stop: list[str] = (),
    logprobs: int | None = None,
    prompt_param: str = "prompt",
) -> SamplingParams:
    """SamplingParams for one prompt of prompt_len tokens, or APIError (400) for a request we cannot serve.

    context: the model's context length in tokens; max_tokens None means default_max (None: the rest
    of the context), capped by the room the prompt leaves. extra_stop: the chat template's own stop
    strings; prompt_param names the field blamed for a prompt that does not fit.
    """
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported", "logit_bias")
    if prompt_len >= context:
        raise APIError(
            400,
            f"prompt is {prompt_len} tokens; this model's context is {context} tokens",
            prompt_param,
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
    if any(not s for s in stop) or len(stop) > MAX_STOP:
        raise APIError(400, f"stop must be up to {MAX_STOP} non-empty strings", "stop")
    return SamplingParams(
        max_new_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_k=body.top_k if body.top_k and body.top_k > 0 else None,
        top_p=body.top_p,
        min_p=body.min_p,
        repetition_penalty=body.repetition_penalty or 1.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        seed=body.seed,
        stop=stop + list(extra_stop),
        logprobs=logprobs,
        ignore_eos=body.ignore_eos,
    )


# --- work -> response -----------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class TokenStrings:
    """How tokens are named in logprobs: each token's bytes, and a string for it no other token has.

    `bytes` are the bytes the token adds to the generated text (Tokenizer.token_bytes), so joining
    them over a choice rebuilds its content byte for byte. The string is the token's text when those
    bytes are whole UTF-8 characters; otherwise (part of a character, or a byte_fallback `<0xNN>`
    piece) it is OpenAI's form for undecodable tokens, "bytes:" and each byte as \\xNN (lowercase
    hex), e.g. "bytes:\\xe6\\x95"; a text that itself starts with "bytes:" gets that form too, so no
    two different byte strings share a name and top_logprobs never loses an alternative to a collision.
    """

    PREFIX = "bytes:"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._text: dict[int, str] = {}

    def bytes(self, token_id: int) -> list[int]:
        return list(self.tokenizer.token_bytes(token_id))

    def text(self, token_id: int) -> str:
        t = self._text.get(token_id)
        if t is None:
            t = self._text[token_id] = self._name(token_id)
        return t

    def _name(self, token_id: int) -> str:
        b = self.tokenizer.token_bytes(token_id)
        try:
            text = b.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is None or text.startswith(self.PREFIX) or _is_byte_piece(self.tokenizer, token_id):
            return self.PREFIX + "".join(f"\\x{c:02x}" for c in b)
        return text


def _is_byte_piece(tokenizer, token_id: int) -> bool:
    """A byte_fallback `<0xNN>` piece (one raw byte, even when that byte is ASCII)."""
    hf = getattr(tokenizer, "hf", None)
    piece = hf.id_to_token(token_id) if hf is not None else None
    return bool(piece) and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")


class TextOffsets:
    """text_offset of tokens in a choice's text: the index of the character a token's first byte belongs to.

    Counted from the tokens' bytes (a character starts at each byte that is not a UTF-8 continuation
    byte 0b10xxxxxx), so it stays right across stream chunks and for tokens holding part of a character.
    """

    def __init__(self):
        self.chars = 0  # characters started by the bytes seen so far

    def next(self, token_bytes: bytes) -> int:
        offset = self.chars - (1 if token_bytes and _continues(token_bytes[0]) and self.chars else 0)
        self.chars += sum(not _continues(c) for c in token_bytes)
        return offset


def _continues(byte: int) -> bool:
    return byte & 0xC0 == 0x80


def completion_logprobs(entries: list[TokenLogprob], names: TokenStrings, offsets: TextOffsets | None = None) -> dict:
    """The completions endpoint's logprobs object: tokens, token_logprobs, top_logprobs ({token: logprob}), text_offset.

    offsets: the choice's running offsets (streaming continues a choice across chunks); None = from 0.
    """
    offsets = offsets or TextOffsets()
    return {
        "tokens": [names.text(e.token_id) for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{names.text(i): lp for i, lp in e.top} for e in entries],
        "text_offset": [offsets.next(names.tokenizer.token_bytes(e.token_id)) for e in entries],
    }


@dataclass
class Echo:
    """A prompt sent back before its completion (echo: true): its ids, and with logprobs, each token's entry
    (engine.prompt_logprobs: None for the first token, which has nothing before it)."""

    ids: list[int]
    entries: list[TokenLogprob | None] | None = None


def echo_logprobs(echo: Echo, names: TokenStrings, offsets: TextOffsets) -> dict:
    """The logprobs object of an echoed prompt, as OpenAI gave it: the first token's logprob and top_logprobs null."""
    return {
        "tokens": [names.text(i) for i in echo.ids],
        "token_logprobs": [e.logprob if e else None for e in echo.entries],
        "top_logprobs": [{names.text(i): lp for i, lp in e.top} if e else None for e in echo.entries],
        "text_offset": [offsets.next(names.tokenizer.token_bytes(i)) for i in echo.ids],
    }


def chat_logprobs(entries: list[TokenLogprob], names: TokenStrings) -> dict:
    """The chat endpoint's logprobs object: {"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]}."""

    def item(i, lp):
        return {"token": names.text(i), "logprob": lp, "bytes": names.bytes(i)}

    return {
        "content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(i, lp) for i, lp in e.top]} for e in entries]
    }


@dataclass
class RowResult:
    """Everything one row (one choice) produced, gathered from its Outputs."""

    text: str = ""
    tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, out: Output) -> None:
        self.text += out.text
        self.tokens += len(out.token_ids)
        self.logprobs += out.logprobs
        if out.finish_reason:
            self.finish_reason = out.finish_reason


class ResponseFormat:
    """The JSON of one endpoint's responses for one request: whole responses, stream chunks, the usage chunk.

    Subclasses give the object names and how one choice looks (whole, and as a stream delta).
    """

    object: str
    chunk_object: str
    id_prefix: str

    def __init__(self, job_id: str, created: int, model: str, logprobs: bool, names: TokenStrings):
        self.id = self.id_prefix + job_id
        self.created, self.model, self.logprobs, self.names = created, model, logprobs, names

    def _envelope(self, obj: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def response(self, results: list[RowResult], prompt_tokens: int) -> dict:
        """The whole (non-streamed) response."""
        body = self._envelope(self.object, [self.choice(i, r) for i, r in enumerate(results)])
        body["usage"] = usage(prompt_tokens, sum(r.tokens for r in results))
        return body

    def first_chunks(self, rows: int) -> list[dict]:
        """Chunks sent before any text (chat announces the assistant role)."""
        return []

    def chunk(self, out: Output, index: int) -> dict:
        """The stream chunk carrying one Output of choice `index`."""
        return self._envelope(self.chunk_object, [self.chunk_choice(out, index)])

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return {**self._envelope(self.chunk_object, []), "usage": usage(prompt_tokens, completion_tokens)}

    def choice(self, index: int, result: RowResult) -> dict:
        raise NotImplementedError

    def chunk_choice(self, out: Output, index: int) -> dict:
        raise NotImplementedError


class CompletionFormat(ResponseFormat):
    object = chunk_object = "text_completion"
    id_prefix = "cmpl-"

    def __init__(self, *args, echoes: list[Echo] | None = None, n: int = 1):
        super().__init__(*args)
        self._offsets: dict[int, TextOffsets] = {}  # each choice's text_offset counter, across stream chunks
        self.echoes, self.n = echoes, n  # with echo: one per prompt, in front of its n choices

    def choice(self, index: int, result: RowResult) -> dict:
        echo = self.echoes[index // self.n] if self.echoes else None
        text = (self.names.tokenizer.decode(echo.ids) if echo else "") + result.text
        lp = None
        if self.logprobs:
            offsets = TextOffsets()  # one count over the echoed prompt and the new text
            lp = echo_logprobs(echo, self.names, offsets) if echo else None
            new = completion_logprobs(result.logprobs, self.names, offsets)
            lp = {k: lp[k] + new[k] for k in new} if lp else new
        return {"index": index, "text": text, "finish_reason": result.finish_reason, "logprobs": lp}

    def chunk_choice(self, out: Output, index: int) -> dict:
        offsets = self._offsets.setdefault(index, TextOffsets())
        lp = completion_logprobs(out.logprobs, self.names, offsets) if self.logprobs else None
        return {"index": index, "text": out.text, "logprobs": lp, "finish_reason": out.finish_reason}


class ChatFormat(ResponseFormat):
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def choice(self, index: int, result: RowResult) -> dict:
        return {
            "index": index,
            "message": {"role": "assistant", "content": result.text},
            "finish_reason": result.finish_reason,
            "logprobs": chat_logprobs(result.logprobs, self.names) if self.logprobs else None,
        }

    def first_chunks(self, rows: int) -> list[dict]:
        delta = {"role": "assistant", "content": ""}
        return [
            self._envelope(self.chunk_object, [{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}])
            for i in range(rows)
        ]

    def chunk_choice(self, out: Output, index: int) -> dict:
        return {
            "index": index,
            "delta": {"content": out.text} if out.text else {},
            "logprobs": chat_logprobs(out.logprobs, self.names) if self.logprobs else None,
            "finish_reason": out.finish_reason,
        }
