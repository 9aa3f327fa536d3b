"""The real server, end to end: `python -m serving` in a subprocess, shared by the tests here.

The openai client for generation (streamed and not, with logprobs), plain HTTP for the rest:
introspection (shapes, probabilities and attention rows summing to 1), validation (4xx JSON,
never 500), a schemathesis fuzz run from the server's own OpenAPI schema, a 2,000-request load
test at 64 concurrent clients, and last, Ctrl-C leaving no process behind.
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import threading
import time

import httpx
import openai
import pytest

from llm.attribution import activation_patching, direct_logit_attribution
from llm.checkpoint import load_checkpoint
from llm.model import flops_per_token, num_params
from llm.tokenizer import load_tokenizer

from test_serving_support import fuzz, make_model_dir, running

CONTEXT = 1024      # long enough that a "long" request takes a while even for this tiny model
MAX_TOKENS = 1000
MODEL = "tiny"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = make_model_dir(tmp_path_factory.mktemp("serving") / "tiny", context_length=CONTEXT)
    with running("--model", str(folder), "--max-tokens", str(MAX_TOKENS), "--max-batch-size", "16",
                 "--max-queue", "512", "--introspect-max-values", "100000", "--max-body-bytes", "200000",
                 "--seed", "0", "--tokenizers", str(folder.parent / "no-comparison")) as server:
        server.folder = folder
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        yield http


@pytest.fixture(scope="module")
def tokenizer(server):
    return load_tokenizer(server.folder / "tokenizer")


USER = [{"role": "user", "content": "Hello, how are you?"}]


# --- the basics -------------------------------------------------------------------------------------

def test_health_index_and_models(http, client):
    assert http.get("/health").text == "ok"
    assert http.get("/v1").json()["model"] == MODEL
    [card] = client.models.list().data
    assert card.id == MODEL and card.model_extra["context_length"] == CONTEXT
    assert card.model_extra["config"]["n_layer"] == 2
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")


# --- generation with the openai client ----------------------------------------------------------------

def test_chat_completion_with_logprobs(client, tokenizer):
    response = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=12, logprobs=True,
                                              top_logprobs=3, temperature=0.8, seed=1)
    [choice] = response.choices
    assert response.id.startswith("chatcmpl-") and response.model == MODEL
    usage = response.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens == len(tokenizer.encode("Hello, how are you?")) + 3  # role, end, assistant
    assert (choice.finish_reason == "length") == (usage.completion_tokens == 12)
    entries = choice.logprobs.content
    assert len(entries) == usage.completion_tokens  # no stop string: every output token has an entry
    assert b"".join(bytes(e.bytes) for e in entries).decode("utf-8", "replace") == choice.message.content
    for e in entries:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        tops = [t.logprob for t in e.top_logprobs]
        assert tops == sorted(tops, reverse=True) and e.logprob <= tops[0] + 1e-6


def test_streamed_chat_is_the_same_answer_in_chunks_with_one_id(client):
    args = dict(model=MODEL, messages=USER, max_tokens=20, temperature=1.0, seed=42, logprobs=True)
    whole = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content             # same seed, same tokens
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage   # usage once, the true totals
    assert all(c.usage is None for c in chunks[:-1])
    streamed_entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed_entries] == [e.token for e in whole.choices[0].logprobs.content]


def test_raw_stream_ends_with_done_and_carries_usage_on_the_last_chunk(http):
    body = {"model": MODEL, "messages": USER, "max_tokens": 5, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c for c in chunks if "usage" in c] == [chunks[-1]]   # without include_usage: on the finish chunk
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"]["completion_tokens"] == 5


def test_max_tokens_is_enforced_and_finish_reason_says_length(client):
    response = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=7, temperature=0)
    assert response.usage.completion_tokens == 7 and response.choices[0].finish_reason == "length"
    default = client.completions.create(model=MODEL, prompt="Hello", temperature=0)  # OpenAI's default: 16
    assert default.usage.completion_tokens == 16


def test_stop_strings_end_the_text_before_them(client):
    plain = client.completions.create(model=MODEL, prompt="The quick", max_tokens=30, temperature=1.0, seed=5)
    text = plain.choices[0].text
    assert len(text) >= 6
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = client.completions.create(model=MODEL, prompt="The quick", max_tokens=30, temperature=1.0, seed=5,
                                    stop=[stop, "never-occurs"])
    assert cut.choices[0].text == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_text_completion_logprobs_have_the_legacy_shape(client):
    response = client.completions.create(model=MODEL, prompt="Hello", max_tokens=6, logprobs=2, temperature=0)
    [choice] = response.choices
    lp = choice.logprobs
    assert response.id.startswith("cmpl-") and len(lp.tokens) == len(lp.token_logprobs) == 6
    assert all(len(top) <= 2 for top in lp.top_logprobs)
    assert lp.text_offset[0] == len("Hello") and lp.text_offset == sorted(lp.text_offset)
    ids = client.completions.create(model=MODEL, prompt=[40, 41, 42], max_tokens=3, temperature=0)
    assert ids.usage.prompt_tokens == 3


def test_errors_reach_the_openai_client_as_typed_exceptions(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4", messages=USER)
    with pytest.raises(openai.BadRequestError, match=f"at most {MAX_TOKENS}"):
        client.chat.completions.create(model=MODEL, messages=USER, max_tokens=MAX_TOKENS + 1, stream=True)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a " * CONTEXT}])
    with pytest.raises(openai.BadRequestError, match="only 1 is supported"):
        client.chat.completions.create(model=MODEL, messages=USER, n=2)


def test_a_newcomer_does_not_wait_for_the_running_batch(server, http):
    """Continuous batching: a short request sent while long ones are being decoded finishes before
    any of them (with static batching it would wait for the running batch to end). The engine test
    checks the same at the token level, without timing."""
    long_running = 4
    started, done = threading.Barrier(long_running + 1), {}

    def long_stream(k: int):
        body = {"model": MODEL, "prompt": "Hello", "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
        with httpx.Client(base_url=server.url, timeout=60) as client:
            with client.stream("POST", "/v1/completions", json=body) as response:
                lines = response.iter_lines()
                next(lines)                                    # being decoded
                started.wait(timeout=30)
                usage = [json.loads(line[6:]).get("usage") for line in lines if line.startswith("data: {")]
        done[k] = (time.monotonic(), usage[-1]["completion_tokens"])

    threads = [threading.Thread(target=long_stream, args=(k,)) for k in range(long_running)]
    for thread in threads:
        thread.start()
    started.wait(timeout=30)
    short = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
    short_done = time.monotonic()
    for thread in threads:
        thread.join(60)
    assert short.status_code == 200
    assert all(tokens == MAX_TOKENS for _, tokens in done.values())   # they were long indeed
    assert short_done < min(t for t, _ in done.values())


# --- introspection and tokenization -------------------------------------------------------------------

def test_introspection_shapes_and_sums(http, tokenizer):
    text = "Hello 東京!"
    ids = tokenizer.encode(text)
    vocab = tokenizer.vocab_size
    body = {"text": text, "top_k": vocab, "attention": {"layers": [0, 1], "heads": [0, 3]}, "logit_lens": True}
    result = http.post("/v1/introspect", json=body)
    assert result.status_code == 200, result.text
    result = result.json()
    tokens = result["tokens"]
    assert [t["id"] for t in tokens] == ids
    assert tokens[0]["prob"] is None and tokens[0]["surprisal_bits"] is None
    assert tokens[-1]["byte_end"] == len(text.encode()) and tokens[0]["byte_start"] == 0
    assert all(a["byte_end"] == b["byte_start"] for a, b in zip(tokens, tokens[1:]))
    for i, token in enumerate(tokens):
        assert len(token["next"]) == vocab
        assert math.isclose(sum(c["prob"] for c in token["next"]), 1.0, abs_tol=1e-3)  # a full distribution
        if i:
            given = next(c["prob"] for c in tokens[i - 1]["next"] if c["id"] == token["id"])
            assert math.isclose(token["prob"], given, abs_tol=1e-6)
            assert math.isclose(token["surprisal_bits"], -math.log2(token["prob"]), rel_tol=1e-3)
    assert [(a["layer"], [h["head"] for h in a["heads"]]) for a in result["attention"]] == [(0, [0, 3]), (1, [0, 3])]
    for layer in result["attention"]:
        for head in layer["heads"]:
            weights = head["weights"]
            assert len(weights) == len(ids) and all(len(row) == len(ids) for row in weights)
            for q, row in enumerate(weights):
                assert math.isclose(sum(row), 1.0, abs_tol=1e-3) and all(w == 0 for w in row[q + 1:])  # causal
    lens = result["logit_lens"]
    assert [layer["layer"] for layer in lens] == [0, 1, 2] and lens[0]["label"] == "embeddings"
    assert all(len(layer["positions"]) == len(ids) for layer in lens)
    assert [c["id"] for c in lens[-1]["positions"][2][:3]] == [c["id"] for c in tokens[2]["next"][:3]]
    assert result["caps"]["max_values"] == 100000


def test_introspection_by_token_ids_with_defaults(http):
    result = http.post("/v1/introspect", json={"token_ids": [40, 41, 42], "model": MODEL}).json()
    assert [len(t["next"]) for t in result["tokens"]] == [5, 5, 5]
    assert result["attention"] is None and result["logit_lens"] is None


def test_tokenize_text_and_chat(http, tokenizer):
    plain = http.post("/v1/tokenize", json={"text": "Hé <|end|>"}).json()
    assert [t["id"] for t in plain["tokens"]] == tokenizer.encode("Hé <|end|>")  # specials stay text
    assert plain["tokens"][1] == {"id": plain["tokens"][1]["id"], "text": "é", "byte_start": 1, "byte_end": 3}
    chat = http.post("/v1/tokenize", json={"messages": USER}).json()
    assert chat["tokens"][0]["text"] == "<|user|>" and chat["tokens"][-1]["text"] == "<|assistant|>"


# --- inspecting: architecture, why this token, tokenizers side by side ----------------------------------

def test_architecture_counts_the_served_model(http, server):
    diagram = http.get("/v1/architecture").json()
    model = load_checkpoint(server.folder)
    parts = diagram["input"] + diagram["output"]
    blocks = diagram["block"]["parts"]
    assert [p["name"] for p in parts] == ["tok_emb", "pos_emb", "final_norm", "lm_head"]
    assert [p["name"] for p in blocks] == ["norm1", "attn", "norm2", "mlp"] and diagram["block"]["count"] == 2
    assert sum(p["params"] for p in parts) + sum(p["params_all"] for p in blocks) == num_params(model)
    assert diagram["totals"]["params"] == num_params(model)
    assert sum(p["flops"] for p in parts) + sum(p["flops_all"] for p in blocks) == flops_per_token(model.config)
    attention = blocks[1]
    assert attention["params"] == sum(p.numel() for p in model.blocks[0].attn.parameters())
    assert "4 heads" in attention["detail"] and "softmax" in attention["equation"]


def test_attribution_over_http_is_the_librarys_on_the_same_weights(http, server, tokenizer):
    text = "Hello world"
    ids = tokenizer.encode(text)
    model = load_checkpoint(server.folder)
    for body in ({"text": text, "top_k": 3}, {"token_ids": ids, "position": 4, "target": ids[5]}):
        result = http.post("/v1/attribution", json=body)
        assert result.status_code == 200, result.text
        result = result.json()
        expected = direct_logit_attribution(model, ids, position=body.get("position", -1), target=body.get("target"))
        assert result["target"]["id"] == expected["target"]["id"] and result["position"] == expected["position"]
        assert math.isclose(result["logit"], expected["logit"], abs_tol=1e-5)
        assert abs(result["sum"] - (result["logit"] - result["bias_term"])) < 1e-4
        assert [len(layer["heads"]) for layer in result["layers"]] == [4, 4]
        assert [t["id"] for t in result["tokens"]] == ids and "frozen" in result["method"]
    assert len(result["top"]) == 5 and result["position"] == 4


def test_patching_over_http(http, server, tokenizer):
    same = http.post("/v1/patching", json={"clean": {"text": "Hello world"}, "corrupted": {"text": "Hello world"}})
    assert same.status_code == 200, same.text
    same = same.json()
    assert same["clean"] == same["corrupted"] and same["foil"] is None
    assert all(abs(v - same["clean"]) < 1e-4 for layer in same["layers"] for v in layer["values"])
    pair = {"clean": {"text": "Hello world"}, "corrupted": {"text": "Hello there"}}
    result = http.post("/v1/patching", json=pair).json()
    expected = activation_patching(load_checkpoint(server.folder), tokenizer.encode("Hello world"),
                                   tokenizer.encode("Hello there"))
    assert [layer["label"] for layer in result["layers"]] == ["embeddings", "after block 0", "after block 1"]
    for got, want in zip(result["layers"], expected["layers"]):
        assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(got["values"], want["values"]))
    assert math.isclose(result["layers"][-1]["restored"][-1], 1.0, abs_tol=1e-3)  # the last stream decides


def test_tokenizer_comparison_without_its_folder_says_what_to_run(http, tokenizer):
    result = http.post("/v1/tokenizers/compare", json={"text": "Hé 東京"})
    assert result.status_code == 200, result.text
    result = result.json()
    [served] = result["tokenizers"]
    assert served["name"] == "served model" and served["count"] == len(tokenizer.encode("Hé 東京"))
    assert result["bytes"] == len("Hé 東京".encode()) and served["tokens"][-1]["byte_end"] == result["bytes"]
    assert "no-comparison" in result["message"] and "tokenizer stage" in result["message"]


# --- validation: every bad request is a 4xx JSON error, before any work ---------------------------------

CHAT = {"model": MODEL, "messages": USER, "max_tokens": 2}
BAD = [
    ("/v1/chat/completions", b"{not json", 400, "not valid JSON"),
    ("/v1/chat/completions", b"", 400, None),
    ("/v1/chat/completions", b"[1, 2]", 400, None),
    ("/v1/chat/completions", {**CHAT, "n": 0}, 400, "n"),
    ("/v1/chat/completions", {**CHAT, "n": 3}, 400, "only 1"),
    ("/v1/chat/completions", {**CHAT, "n": False}, 400, "n"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": "2"}, 400, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": MAX_TOKENS + 1}, 400, "at most"),
    ("/v1/chat/completions", {**CHAT, "temperature": True}, 400, "temperature"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
    ("/v1/chat/completions", {**CHAT, "model": "nope"}, 404, "does not exist"),
    ("/v1/chat/completions", {**CHAT, "stream": True, "top_logprobs": 3}, 400, "logprobs"),
    ("/v1/chat/completions", {**CHAT, "stream": True, "messages": [{"role": "user", "content": "x" * CONTEXT}]},
     400, "context"),
    ("/v1/chat/completions", {**CHAT, "tools": []}, 400, "tools"),
    ("/v1/chat/completions", {**CHAT, "stop": ["s" * 65]}, 400, "stop"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x" * 250_000}]}, 413, "limit"),
    ("/v1/completions", {"model": MODEL, "prompt": [999_999]}, 400, "vocabulary"),
    ("/v1/completions", {"model": MODEL, "prompt": "x" * 100, "max_tokens": MAX_TOKENS}, 400, "context"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "echo": True}, 400, "echo"),
    ("/v1/introspect", {"text": "hi", "attention": {"layers": [2]}}, 400, "layer 2 is out of range"),
    ("/v1/introspect", {"text": "hi", "attention": {"layers": [0], "heads": [4]}}, 400, "head 4 is out of range"),
    ("/v1/introspect", {"text": "x" * (CONTEXT + 1)}, 400, f"at most {CONTEXT}"),
    ("/v1/introspect", {"text": "hi", "top_k": 100_000}, 400, "top_k"),
    ("/v1/introspect", {"text": "x" * 200, "attention": {"layers": [0, 1]}}, 400, "attention maps"),
    ("/v1/introspect", {"text": "hi", "model": "nope"}, 404, "does not exist"),
    ("/v1/introspect", {"text": 5}, 400, "text"),
    ("/v1/introspect", {"text": "hi", "step": 0}, 404, "'tiny' has no training snapshots"),
    ("/v1/tokenize", {"text": "a", "messages": USER}, 400, "exactly one"),
    ("/v1/attribution", {"text": "hi", "target": 10 ** 6}, 400, "target token 1000000 is out of range"),
    ("/v1/attribution", {"text": "hi", "position": 2}, 400, "position 2 is outside"),
    ("/v1/attribution", {"text": "x" * (CONTEXT + 1)}, 400, f"at most {CONTEXT}"),
    ("/v1/attribution", {"text": "hi", "model": "nope"}, 404, "does not exist"),
    ("/v1/attribution", {"token_ids": [999_999]}, 400, "vocabulary"),
    ("/v1/patching", {"clean": {"text": "abc"}, "corrupted": {"text": "ab"}}, 400, "same number of tokens"),
    ("/v1/patching", {"clean": {"text": "x" * 200}, "corrupted": {"text": "y" * 200}}, 400, "token-passes"),
    ("/v1/patching", {"clean": {"text": "a", "token_ids": [1]}, "corrupted": {"text": "b"}}, 400, "exactly one"),
    ("/v1/patching", {"clean": {"text": "ab"}, "corrupted": {"text": "ac"}, "foil": 10 ** 6}, 400, "foil token"),
    ("/v1/tokenizers/compare", {"text": ""}, 400, "text"),
    ("/v1/tokenizers/compare", {"text": "x" * 10_001}, 400, "text"),
    ("/v1/nothing", {}, 404, None),
]


@pytest.mark.parametrize("path, body, status, words", BAD, ids=[f"{i}-{p}" for i, (p, *_ ) in enumerate(BAD)])
def test_bad_requests_get_4xx_json_errors(http, path, body, status, words):
    if isinstance(body, bytes):
        response = http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        response = http.post(path, json=body)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")  # never an event stream
    error = response.json()["error"]
    assert error["message"] and error["type"]
    if words:
        assert words in error["message"]


def test_fuzzing_from_the_openapi_schema_finds_no_server_error(server):
    """schemathesis generates valid and invalid requests from /openapi.json (test_serving_support.fuzz)."""
    fuzz(server.url, max_examples=25, max_time_s=35)


def test_load_2000_requests_from_64_clients(server):
    """Closed-loop clients against 127.0.0.1 only: none dropped, none 5xx; latency percentiles printed."""
    total, clients = 2000, 64
    body = {"model": MODEL, "messages": USER, "max_tokens": 4, "temperature": 0.7}
    latencies, statuses = [], {}

    async def scenario():
        queue = iter(range(total))
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as http:
            async def one_client():
                for _ in queue:
                    start = time.perf_counter()
                    response = await http.post("/v1/chat/completions", json=body)
                    latencies.append(time.perf_counter() - start)
                    statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                    assert response.json()["usage"]["completion_tokens"] <= 4
            await asyncio.gather(*(one_client() for _ in range(clients)))

    start = time.perf_counter()
    asyncio.run(asyncio.wait_for(scenario(), timeout=150))
    elapsed = time.perf_counter() - start
    latencies.sort()
    p50, p99 = statistics.median(latencies), latencies[int(0.99 * (len(latencies) - 1))]
    print(f"\nload: {total} requests, {clients} clients, {elapsed:.1f} s, {total / elapsed:.0f} req/s, "
          f"p50 {1000 * p50:.0f} ms, p99 {1000 * p99:.0f} ms, statuses {statuses}")
    assert statuses == {200: total}


def test_ctrl_c_stops_the_server_and_every_process_it_started(server):
    seconds = server.stop()  # SIGINT; fails if any process of the group outlives it
    assert seconds < 20
    assert "Serving tiny at http://127.0.0.1:" in server.output()
