"""Request models, error messages and the two guards (body size, requests in flight), in-process."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import HTTPException
from pydantic import ValidationError

from llm.model import ModelConfig
from llm.tokenizer import train_char
from serving import explain
from serving.errors import describe_validation
from serving.middleware import BodySizeLimit, InFlightLimit
from serving.options import Limits
from serving.schemas import (
    AttributionRequest,
    ChatCompletionRequest,
    CompletionRequest,
    IntrospectRequest,
    PatchingRequest,
    TokenizeRequest,
)

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("extra", [
    {}, {"n": None}, {"n": 1}, {"temperature": 0}, {"temperature": 1.5}, {"top_p": 0.5}, {"max_tokens": 3},
    {"stop": "x"}, {"stop": ["a", "b", "c", "d"]}, {"seed": -5}, {"stream": True, "stream_options": {"include_usage": True}},
    {"logprobs": True, "top_logprobs": 20}, {"logprobs": False}, {"frequency_penalty": 0}, {"user": "u"},
    {"messages": [{"role": "system", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                  {"role": "user", "content": ""}]},
])
def test_valid_chat_requests(extra):
    request = ChatCompletionRequest.model_validate({**CHAT, **extra})
    if "messages" in extra:
        assert request.messages[0].text() == "ab"


@pytest.mark.parametrize("extra, where", [
    ({"n": 0}, "n"), ({"n": 2}, "n"), ({"n": False}, "n"), ({"n": True}, "n"), ({"n": 1.0}, "n"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": "5"}, "max_tokens"), ({"max_tokens": 2.5}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"), ({"temperature": "1"}, "temperature"), ({"temperature": -1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"), ({"temperature": float("inf")}, "temperature"),
    ({"top_p": 2}, "top_p"), ({"stream": 1}, "stream"), ({"stream": "true"}, "stream"),
    ({"stop": ["a"] * 5}, "stop"), ({"stop": [""]}, "stop"), ({"stop": 3}, "stop"),
    ({"logprobs": 1}, "logprobs"), ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs needs logprobs"), ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"stream_options": {"include_usage": True}}, "stream_options"), ({"logit_bias": {}}, "logit_bias"),
    ({"messages": []}, "messages"), ({"messages": [{"role": "tool", "content": "x"}]}, "role"),
    ({"messages": [{"role": "user"}]}, "content"), ({"messages": [{"role": "user", "content": 5}]}, "content"),
    ({"messages": "hi"}, "messages"), ({"model": ""}, "model"), ({"model": None}, "model"),
    ({"max_tokens": 3, "max_completion_tokens": 4}, "differ"), ({"seed": 2 ** 70}, "seed"),
])
def test_invalid_chat_requests_name_the_field(extra, where):
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate({**CHAT, **extra})
    message, _ = describe_validation(caught.value.errors())
    assert where in message


@pytest.mark.parametrize("body, ok", [
    ({"prompt": "hi"}, True), ({"prompt": ""}, True), ({"prompt": [1, 2]}, True), ({"prompt": []}, False),
    ({"prompt": [1, True]}, False), ({"prompt": [-1]}, False), ({"prompt": None}, False), ({}, False),
    ({"prompt": "x", "logprobs": 5}, True), ({"prompt": "x", "logprobs": 6}, False),
    ({"prompt": "x", "logprobs": True}, False), ({"prompt": "x", "echo": True}, False),
    ({"prompt": "x", "echo": 0}, False), ({"prompt": "x", "best_of": 2}, False), ({"prompt": "x", "suffix": "s"}, False),
])
def test_completion_requests(body, ok):
    def validate():
        return CompletionRequest.model_validate({"model": "m", **body})
    if ok:
        validate()
    else:
        with pytest.raises(ValidationError):
            validate()


@pytest.mark.parametrize("body, ok", [
    ({"text": "hi"}, True), ({"token_ids": [1, 2]}, True), ({"text": "hi", "token_ids": [1]}, False), ({}, False),
    ({"text": ""}, False), ({"token_ids": []}, False), ({"text": "hi", "top_k": 0}, False),
    ({"text": "hi", "top_k": True}, False), ({"text": "hi", "attention": {"layers": []}}, False),
    ({"text": "hi", "attention": {"layers": [0], "heads": [-1]}}, False),
    ({"text": "hi", "attention": {"layers": [0, 1], "heads": [2]}, "logit_lens": True}, True),
])
def test_introspect_requests(body, ok):
    if ok:
        IntrospectRequest.model_validate(body)
    else:
        with pytest.raises(ValidationError):
            IntrospectRequest.model_validate(body)


def test_tokenize_needs_exactly_one_input():
    TokenizeRequest.model_validate({"text": "x"})
    for body in ({}, {"text": "x", "messages": [{"role": "user", "content": "y"}]}):
        with pytest.raises(ValidationError):
            TokenizeRequest.model_validate(body)


def test_explaining_checks_the_model_before_any_work():
    tokenizer = train_char(["abcdef ghij"], progress=False)
    config = ModelConfig.from_preset("tiny", n_layer=2, d_model=16, n_head=2, n_kv_head=2, vocab_size=tokenizer.vocab_size,
                                     context_length=8)

    def refusal(request, config=config, limits=None) -> str:
        with pytest.raises(HTTPException) as error:
            explain.plan(request, config, tokenizer, limits or Limits(), "m")
        return f"{error.value.status_code} {error.value.detail}"

    post_norm = ModelConfig.from_dict({**config.to_dict(), "norm_placement": "post"})
    assert "400 direct logit attribution needs a pre-norm model" in refusal(
        AttributionRequest(text="abc"), config=post_norm)
    assert refusal(AttributionRequest(text="abcdefghi")) == "400 text: 9 tokens; this server explains at most 8"
    assert refusal(AttributionRequest(text="abc", position=-4)).startswith("400 position -4 is outside")
    assert refusal(AttributionRequest(text="abc", model="x")).startswith("404 the model 'x' does not exist")
    pair = PatchingRequest(clean={"text": "abcd"}, corrupted={"token_ids": [1, 2, 3, 4]})
    assert explain.plan(pair, config, tokenizer, Limits(), "m")["corrupted"] == [1, 2, 3, 4]
    assert "(layers + 1) x tokens^2 = 48 token-passes; this server allows 47" in refusal(
        pair, limits=Limits(patching_max_token_passes=47))
    with pytest.raises(ValidationError, match="exactly one of text or token_ids"):
        PatchingRequest(clean={"text": "a"}, corrupted={})


def test_malformed_json_message():
    message, param = describe_validation([{"type": "json_invalid", "loc": ("body", 3),
                                           "msg": "JSON decode error", "ctx": {"error": "Expecting value"}}])
    assert "not valid JSON" in message and "Expecting value" in message and param is None


# --- guards ----------------------------------------------------------------------------------------

async def echo_app(scope, receive, send):
    """Reads the body, sleeps a little (so requests overlap), answers with the body's size."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await asyncio.sleep(0.2)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": str(len(body)).encode()})


def client_for(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def test_body_size_limit_answers_413_before_the_route_runs():
    async def scenario():
        async with client_for(BodySizeLimit(echo_app, max_bytes=100)) as client:
            small = await client.post("/x", content=b"a" * 100)
            large = await client.post("/x", content=b"a" * 101)

            async def chunks():  # no Content-Length: the size is only known by reading
                for _ in range(5):
                    yield b"a" * 30
            streamed = await client.post("/x", content=chunks())
            get = await client.get("/x")
        return small, large, streamed, get

    small, large, streamed, get = asyncio.run(scenario())
    assert small.status_code == 200 and small.text == "100"
    assert large.status_code == 413 and "100 bytes" in large.json()["error"]["message"]
    assert streamed.status_code == 413
    assert get.status_code == 200


def test_in_flight_limit_answers_429_with_retry_after_and_frees_slots():
    app = InFlightLimit(echo_app, limits={"/a": ("gen", 2), "/b": ("gen", 2), "/c": ("other", 1)})

    async def scenario():
        async with client_for(app) as client:
            burst = await asyncio.gather(*[client.post(p) for p in ("/a", "/b", "/a", "/c")])
            after = await client.post("/a")  # the burst has finished: room again
            unlimited = await asyncio.gather(*[client.post("/d") for _ in range(5)])
        return burst, after, unlimited

    burst, after, unlimited = asyncio.run(scenario())
    assert sorted(r.status_code for r in burst[:3]) == [200, 200, 429]
    busy = next(r for r in burst if r.status_code == 429)
    assert busy.headers["retry-after"] == "1" and busy.json()["error"]["type"] == "rate_limit_error"
    assert burst[3].status_code == 200  # another group has its own count
    assert after.status_code == 200 and all(r.status_code == 200 for r in unlimited)
    assert app.counts == {"gen": 0, "other": 0}
