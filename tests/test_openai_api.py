"""The OpenAI wire format without HTTP: request bodies -> SamplingParams, engine Outputs -> choices, chunks, usage."""

import pydantic
import pytest

from lmforge.inference.engine import Output, TokenLogprob
from lmforge.inference.openai_api import (
    APIError,
    ChatFormat,
    ChatRequest,
    CompletionFormat,
    CompletionRequest,
    RowResult,
    TokenStrings,
    chat_logprobs,
    chat_logprobs_setting,
    chat_messages,
    check_prompt_ids,
    completion_logprobs,
    completion_prompts,
    error_body,
    sampling_params,
    usage,
    validation_error,
)


def completion(**kw) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", "prompt": "x", **kw})


def chat(**kw) -> ChatRequest:
    return ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw})


def params(body, prompt_len=3, context=32, max_tokens=None, default_max=16, **kw):
    return sampling_params(
        body, prompt_len=prompt_len, context=context, max_tokens=max_tokens, default_max=default_max, **kw
    )


def test_sampling_params_from_a_request_body():
    body = completion(
        temperature=0.5, top_p=0.9, top_k=-1, min_p=0.1, seed=3, stop="\n", frequency_penalty=0.5, ignore_eos=True
    )
    p = params(body, max_tokens=5, extra_stop=["User:"], logprobs=2)
    assert (p.max_new_tokens, p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (5, 0.5, 0.9, None, 0.1, 3)
    assert p.stop == ["\n", "User:"] and p.logprobs == 2 and p.ignore_eos and p.frequency_penalty == 0.5
    assert p.repetition_penalty == 1.0 and p.presence_penalty == 0.0
    p = params(completion(top_k=40))
    assert p.temperature == 1.0 and p.top_k == 40 and p.max_new_tokens == 16  # OpenAI's defaults
    assert params(completion(), prompt_len=28).max_new_tokens == 4  # the default is capped by the room left
    assert params(chat(), prompt_len=28, default_max=None).max_new_tokens == 4  # chat: the rest of the context
    p.validate()


@pytest.mark.parametrize(
    "body,kw,param,code",
    [
        (completion(), dict(prompt_len=32), "prompt", "context_length_exceeded"),
        (chat(), dict(prompt_len=40, prompt_param="messages"), "messages", "context_length_exceeded"),
        (completion(), dict(prompt_len=20, max_tokens=13), "max_tokens", "context_length_exceeded"),
        (completion(stop=["a", ""]), {}, "stop", None),
        (completion(stop=["s"] * 17), {}, "stop", None),
        (completion(logit_bias={"5": 1.0}), {}, "logit_bias", None),
    ],
)
def test_sampling_params_refuses_what_cannot_be_served(body, kw, param, code):
    with pytest.raises(APIError) as e:
        params(body, **kw)
    assert e.value.status == 400 and e.value.param == param and e.value.code == code


def test_prompts_and_messages_from_request_bodies():
    assert completion_prompts(completion(prompt="a")) == ["a"]
    assert completion_prompts(completion(prompt=["a", "b"])) == ["a", "b"]
    assert completion_prompts(completion(prompt=[5, 6])) == [[5, 6]]
    assert completion_prompts(completion(prompt=[[5], [6, 7]])) == [[5], [6, 7]]
    for bad, param in ((dict(prompt=[]), "prompt"), (dict(echo=True), "echo"), (dict(best_of=3), "best_of")):
        with pytest.raises(APIError) as e:
            completion_prompts(completion(**bad))
        assert e.value.param == param
    assert check_prompt_ids([1, 2], 10) == [1, 2]
    for bad in ([], [10], [-1]):
        with pytest.raises(APIError):
            check_prompt_ids(bad, 10)
    body = chat(
        messages=[
            {"role": "system", "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]},
            {"role": "assistant", "content": None},
        ]
    )
    assert chat_messages(body) == [{"role": "system", "content": "be brief"}, {"role": "assistant", "content": ""}]
    assert chat_logprobs_setting(chat()) is None and chat_logprobs_setting(chat(logprobs=True)) == 0
    assert chat_logprobs_setting(chat(logprobs=True, top_logprobs=3)) == 3
    with pytest.raises(APIError) as e:
        chat_messages(chat(top_logprobs=2))
    assert e.value.param == "top_logprobs"


@pytest.mark.parametrize(
    "data,param,fragment",
    [
        ({"prompt": "x"}, "model", "Field required"),
        ({"model": "m", "prompt": "x", "max_tokens": "5"}, "max_tokens", "integer"),
        ({"model": "m", "prompt": 5}, "prompt", ""),
        ({"model": "m", "prompt": "x", "temperature": -1}, "temperature", "greater than or equal"),
    ],
)
def test_validation_errors_name_the_field(data, param, fragment):
    with pytest.raises(pydantic.ValidationError) as e:
        CompletionRequest.model_validate(data)
    err = validation_error(e.value.errors())
    assert err.status == 400 and err.param == param and err.message.startswith(param) and fragment in err.message
    assert err.body() == error_body(err.message, param)
    assert err.body()["error"]["type"] == "invalid_request_error"


def test_invalid_json_and_non_object_bodies():
    with pytest.raises(pydantic.ValidationError) as e:
        CompletionRequest.model_validate_json('{"model": ')
    assert validation_error(e.value.errors()).code == "invalid_json"
    with pytest.raises(pydantic.ValidationError) as e:
        CompletionRequest.model_validate([1, 2])
    assert validation_error(e.value.errors()).message.startswith("request body must be a JSON object")


@pytest.fixture
def names(small_tokenizer):
    return TokenStrings(small_tokenizer)


def out(index, text, ids, logprobs=(), finish=None):
    return Output(("job", index), text, list(ids), list(logprobs), finish)


def test_completion_responses_whole_and_streamed(small_tokenizer, names):
    ids = small_tokenizer.encode(" the cat")
    entries = [TokenLogprob(i, -0.5, [(i, -0.5), (0, -3.0)]) for i in ids]
    fmt = CompletionFormat("abc", 100, "m", True, names)
    a, b = RowResult(), RowResult()
    a.add(out(0, " the", ids[:1], entries[:1]))
    a.add(out(0, " cat", ids[1:], entries[1:], "length"))
    b.add(out(1, "", [], [], "stop"))
    r = fmt.response([a, b], prompt_tokens=4)
    assert (r["id"], r["object"], r["created"], r["model"]) == ("cmpl-abc", "text_completion", 100, "m")
    assert r["usage"] == usage(4, len(ids)) == {"prompt_tokens": 4, "completion_tokens": len(ids), "total_tokens": 6}
    c0, c1 = r["choices"]
    assert (c0["index"], c0["text"], c0["finish_reason"], c1["index"], c1["finish_reason"]) == (
        0,
        " the cat",
        "length",
        1,
        "stop",
    )
    lp = c0["logprobs"]
    assert "".join(lp["tokens"]) == " the cat" and lp["token_logprobs"] == [-0.5] * len(ids)
    assert lp["text_offset"][0] == 0 and lp["text_offset"][-1] == len(" the cat") - len(lp["tokens"][-1])
    assert lp["top_logprobs"][0] == {names.text(ids[0]): -0.5, "<|endoftext|>": -3.0}
    # streamed: offsets continue across chunks of the same choice
    assert fmt.first_chunks(2) == []
    first, second = (
        fmt.chunk(out(0, " the", ids[:1], entries[:1]), 0),
        fmt.chunk(out(0, " cat", ids[1:], entries[1:]), 0),
    )
    assert first["object"] == "text_completion" and first["choices"][0]["text"] == " the"
    assert second["choices"][0]["logprobs"]["text_offset"][0] == len(" the")
    assert fmt.usage_chunk(4, 2) == {
        **{k: first[k] for k in ("id", "object", "created", "model")},
        "choices": [],
        "usage": usage(4, 2),
    }
    assert CompletionFormat("x", 1, "m", False, names).response([a], 1)["choices"][0]["logprobs"] is None


def test_chat_responses_whole_and_streamed(small_tokenizer, names):
    ids = small_tokenizer.encode(" a dog")
    entries = [TokenLogprob(i, -1.0, [(i, -1.0)]) for i in ids]
    fmt = ChatFormat("abc", 100, "m", True, names)
    res = RowResult()
    res.add(out(0, " a dog", ids, entries, "stop"))
    r = fmt.response([res], prompt_tokens=7)
    assert (
        r["object"] == "chat.completion" and r["id"] == "chatcmpl-abc" and r["usage"]["completion_tokens"] == len(ids)
    )
    choice = r["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": " a dog"} and choice["finish_reason"] == "stop"
    content = choice["logprobs"]["content"]
    assert [c["token"] for c in content] == [names.text(i) for i in ids]
    assert b"".join(bytes(c["bytes"]) for c in content) == b" a dog"
    assert all(c["top_logprobs"][0]["token"] == c["token"] for c in content)
    heads = fmt.first_chunks(2)
    assert [h["choices"][0]["index"] for h in heads] == [0, 1]
    assert heads[0]["object"] == "chat.completion.chunk" and heads[0]["choices"][0]["delta"] == {
        "role": "assistant",
        "content": "",
    }
    end = fmt.chunk(out(1, "", [], [], "length"), 1)
    assert end["choices"][0] == {
        "index": 1,
        "delta": {},
        "logprobs": chat_logprobs([], names),
        "finish_reason": "length",
    }


def test_logprob_objects(small_tokenizer, names):
    ids = small_tokenizer.encode("3: the")
    entries = [TokenLogprob(i, -0.25, [(i, -0.25)]) for i in ids]
    lp = completion_logprobs(entries, names)
    assert lp["text_offset"][0] == 0 and len(lp["tokens"]) == len(ids)
    assert chat_logprobs(entries, names)["content"][0]["logprob"] == -0.25


def test_text_offsets_count_characters_from_bytes():
    from lmforge.inference.openai_api import TextOffsets

    offsets = TextOffsets()
    pieces = [b"ab", "数".encode()[:1], "数".encode()[1:], b"c", "😊".encode(), b"", b"d"]
    # "数" is split over two tokens: both start inside the character at index 2
    assert [offsets.next(p) for p in pieces] == [0, 2, 2, 3, 4, 5, 5]
