"""The OpenAI-compatible HTTP API against the real stack, through the official `openai`
client (and raw HTTP for the server-sent events' framing): one stack for the module."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import time

import openai
import pytest

from gateway import openai_protocol
from inflight import errors
from inflight.client import Client
from testing.stack import Stack

MODEL = "SmolLM2-135M-Instruct"
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
FREE = "inflight_worker_kv_blocks{state=free}"


@pytest.fixture(scope="module")
def stack(default_stack):
    """The session's default stack (conftest.py), as test_fuzz.py left it; the last test
    here stops it."""
    return default_stack()


@pytest.fixture(scope="module")
def client(stack):
    with openai.OpenAI(base_url=stack.base_url, api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def grpc_complete(stack, **kwargs):
    async def go():
        async with Client(stack.target) as c:
            return await c.complete(**kwargs)

    return asyncio.run(go())


def test_chat_greedy_answer_equals_grpc_streamed_or_not(stack, client):
    want = grpc_complete(stack, chat=CAPITAL, max_tokens=12, temperature=0)
    r = client.chat.completions.create(model=MODEL, messages=CAPITAL, max_completion_tokens=12, temperature=0, user="ignored")
    assert r.object == "chat.completion" and r.model == MODEL
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text and want.text.startswith("The capital of France is Paris.")
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == len(want.token_ids) == want.finished.usage.completion_tokens
    assert r.usage.prompt_tokens == want.finished.usage.prompt_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    chunks = list(client.chat.completions.create(model=MODEL, messages=CAPITAL, max_tokens=12, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.token_ids)
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_streamed_and_not_with_n_logprobs_stop_and_seed(stack, client):
    want = grpc_complete(stack, text="Once upon a time", max_tokens=6, temperature=0)
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0, n=2, logprobs=2)
    assert r.object == "text_completion" and [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        assert c.text == want.text and c.finish_reason == "length"
        assert "".join(c.logprobs.tokens) == want.text and len(c.logprobs.token_logprobs) == 6
        assert all(len(t) == 2 for t in c.logprobs.top_logprobs) and c.logprobs.text_offset[0] == 0
    assert r.usage.prompt_tokens == want.finished.usage.prompt_tokens and r.usage.completion_tokens == 12

    # A stop string cuts the stream as it does gRPC's; extra sampling fields by their own names.
    stop = want.text[3:7]
    parts = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0, stream=True,
                                           stop=[stop], extra_body={"top_k": 5, "repetition_penalty": 1.0}))
    assert "".join(p.choices[0].text for p in parts) == want.text[: want.text.index(stop)]
    assert parts[-1].choices[0].finish_reason == "stop"
    # Streamed logprobs' text_offset counts the tokens' text, also while text that might
    # begin a stop string is held back (it counted the text sent, which trails then).
    parts = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0, stream=True,
                                           stop=["no such stop string"], logprobs=1))
    tokens = [t for p in parts if p.choices[0].logprobs for t in p.choices[0].logprobs.tokens]
    offsets = [o for p in parts if p.choices[0].logprobs for o in p.choices[0].logprobs.text_offset]
    assert "".join(tokens) == want.text and offsets == [sum(map(len, tokens[:i])) for i in range(len(tokens))]

    # Token-id prompts, a batch of two, seeded sampling: the same seed, the same text.
    ids = list(grpc_complete(stack, text="hi", max_tokens=1).token_ids)  # any valid ids
    seeded = dict(model=MODEL, max_tokens=5, temperature=1.0, seed=11)
    a = client.completions.create(prompt=[ids, "The sea"], **seeded)
    b = client.completions.create(prompt=[ids, "The sea"], **seeded)
    assert [c.text for c in a.choices] == [c.text for c in b.choices] and len(a.choices) == 2


def test_chat_logprobs_and_models(client):
    r = client.chat.completions.create(model=MODEL, messages=CAPITAL, max_tokens=3, temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token for t in content)
    assert bytes(content[0].bytes).decode() == content[0].token
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL] and client.models.retrieve(MODEL).id == MODEL


@pytest.mark.parametrize("kwargs, status, param", [
    (dict(top_p=2.0), 400, "top_p"),
    (dict(max_completion_tokens=0), 400, "max_completion_tokens"),
    (dict(temperature="hot"), 400, "temperature"),
    (dict(messages=[{"role": "alien", "content": "hi"}]), 400, "messages[0].role"),
    (dict(messages=[]), 400, "messages"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400, "messages[0].content[0].type"),
    (dict(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools"),
    (dict(extra_body={"bogus": 1}), 400, "bogus"),
    (dict(top_logprobs=3), 400, "top_logprobs"),
    (dict(n=99), 400, "n"),
    (dict(stream_options={"include_usage": True}), 400, "stream_options"),
    (dict(model="no-such-model"), 404, "model"),
])
def test_errors_are_openai_shaped_and_name_the_parameter(client, kwargs, status, param):
    body = dict(model=MODEL, messages=CAPITAL, max_tokens=2)
    body.update(kwargs)
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(**body)
    assert e.value.status_code == status
    err = e.value.body
    assert err["param"] == param and err["type"] == "invalid_request_error" and param in err["message"], err


def test_status_codes_map_as_openai_answers_them():
    assert [openai_protocol.error_body(code, "m")[0] for code in
            (errors.INVALID_ARGUMENT, errors.NOT_FOUND, errors.RESOURCE_EXHAUSTED, errors.UNAVAILABLE)] == [400, 404, 429, 503]
    status, body = openai_protocol.error_body(errors.RESOURCE_EXHAUSTED, "queue full")
    assert json.loads(body) == {"error": {"message": "queue full", "type": "rate_limit_exceeded", "param": None,
                                          "code": "rate_limit_exceeded"}}


def raw(stack, method: str, path: str, body=None, headers=None) -> http.client.HTTPResponse:
    host, port = stack.http_target.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    conn.request(method, path, data, {"Content-Type": "application/json", **(headers or {})})
    return conn.getresponse()


def test_sse_framing_and_plain_http_errors(stack):
    r = raw(stack, "POST", "/v1/chat/completions", {"model": MODEL, "messages": CAPITAL, "max_tokens": 4, "temperature": 0,
                                                    "stream": True}, {"traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"})
    assert r.status == 200 and r.getheader("content-type").startswith("text/event-stream")
    text = r.read().decode()
    assert text.endswith("data: [DONE]\n\n")
    events = text.split("\n\n")[:-1]
    assert len(events) >= 3 and all(e.startswith("data: ") and "\n" not in e for e in events)
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)

    bad_json = raw(stack, "POST", "/v1/completions", b"{not json")
    assert bad_json.status == 400 and json.loads(bad_json.read())["error"]["param"] == "body"
    deep = raw(stack, "POST", "/v1/completions", b'{"model": "m", "user": ' + b"[" * 5000 + b"]" * 5000 + b"}")
    assert deep.status == 400 and json.loads(deep.read())["error"]["param"] == "body"  # a plain-text 500 before
    nowhere = raw(stack, "GET", "/v1/nowhere")
    assert nowhere.status == 404 and "/v1/chat/completions" in json.loads(nowhere.read())["error"]["message"]
    too_big = raw(stack, "POST", "/v1/completions", b"{}", {"Content-Length": str(64 << 20)})
    assert too_big.status == 413 and json.loads(too_big.read())["error"]["code"] == "request_too_large"
    wrong_method = raw(stack, "GET", "/v1/completions")
    assert wrong_method.status == 405 and "error" in json.loads(wrong_method.read())
    # Served by the same RequestPath as gRPC, counted under its own protocol.
    m = stack.metrics("gateway")
    assert m["inflight_gateway_requests_total{code=OK,finish_reason=length,protocol=http}"] >= 1
    assert "inflight_gateway_time_to_first_token_seconds_count{protocol=grpc}" in m


def test_disconnect_aborts_the_request_and_frees_kv(stack):
    total = stack.worker_metrics()["inflight_worker_kv_blocks{state=total}"]
    stack.wait_metric(0, FREE, lambda v: v == total)
    host, port = stack.http_target.rsplit(":", 1)
    for stream in (True, False):
        body = json.dumps({"model": MODEL, "prompt": "Tell me a very long story.", "max_tokens": 4000, "ignore_eos": True,
                           "stream": stream}).encode()
        sock = socket.create_connection((host, int(port)))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        if stream:
            assert b"200" in sock.recv(65536)  # the headers, and soon the first tokens
        stack.wait_metric(0, FREE, lambda v: v < total)
        sock.close()
        started = time.monotonic()
        stack.wait_metric(0, FREE, lambda v: v == total)
        stack.wait_metric(0, "inflight_worker_requests{state=running}", lambda v: v == 0)
        assert time.monotonic() - started < 5
    stack.wait_metric("gateway", "inflight_gateway_requests_running{protocol=http}", lambda v: v == 0)


def refusal(body: dict, chat: bool = True) -> str | None:
    try:
        openai_protocol.parse_request({"model": MODEL, **body}, chat)
    except errors.RequestError as e:
        return e.field
    return None


def test_request_translation_names_each_parameter_as_sent():
    chat = {"messages": CAPITAL}
    assert refusal(chat) is None
    assert refusal({"messages": [{"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}) is None
    req = openai_protocol.parse_request({"model": MODEL, "messages": [{"role": "developer", "content": [{"type": "text", "text": "a"},
                                                                                                         {"type": "text", "text": "b"}]}]}, True)
    assert req.prompts[0].chat == [{"role": "system", "content": "a\nb"}]
    assert refusal({**chat, "stop": 5}) == "stop" and refusal({**chat, "stop": ["a", 1]}) == "stop[1]"
    assert refusal({**chat, "seed": 1.5}) == "seed" and refusal({**chat, "n": True}) == "n"
    assert refusal({**chat, "stream": True, "stream_options": {"include_usage": True, "x": 1}}) == "stream_options.x"
    assert refusal({**chat, "messages": [{"role": "user", "content": "hi", "tool_calls": []}]}) == "messages[0].tool_calls"
    assert refusal({**chat, "response_format": {"type": "text"}, "logit_bias": None, "top_logprobs": 0}) is None
    assert refusal({"messages": CAPITAL, "model": ""}) == "model"
    assert refusal({"prompt": ["fine", ""]}, chat=False) == "prompt[1]"
    assert refusal({"prompt": [[1, 2], [3, "x"]]}, chat=False) == "prompt[1][1]"
    assert refusal({"prompt": ["a"] * 5, "n": 4}, chat=False) == "n"  # 20 choices
    assert refusal({"prompt": "a", "echo": True}, chat=False) == "echo"
    assert refusal({"prompt": "a", "logprobs": 21}, chat=False) == "logprobs"
    req = openai_protocol.parse_request({"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 7, "top_k": 3, "stop": "x"}, False)
    assert req.prompts[0].token_ids == [1, 2, 3] and (req.params.max_tokens, req.params.top_k, req.params.stop) == (7, 3, ("x",))


def test_a_full_admission_queue_is_429_streamed_or_not():
    """A worker that holds one request and a queue of one (the engine double, 20 ms steps):
    a third request is refused at once with 429, before any stream begins. The worker's
    settings are `inflight serve` flags, which serve passes on to the worker: the model is
    only found as "double", with a batch of one, if they arrived."""
    env = {"ENGINE_DOUBLE_STEP_MS": "20", "INFLIGHT_WORKER_QUEUE_FACTOR": "1"}
    small = Stack(env=env, extra=["--max-queued", "1", "--engine", "testing.engine_double:InstantEngine",
                                  "--served-model-name", "double", "--max-batch-size", "1"])
    try:
        host, port = small.http_target.rsplit(":", 1)
        body = json.dumps({"model": "double", "prompt": "Hi", "max_tokens": 2000, "ignore_eos": True, "stream": True}).encode()
        holders = []
        for _ in range(2):  # one running on the worker, one queued in the scheduler
            sock = socket.create_connection((host, int(port)))
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            holders.append(sock)
        small.wait_metric("scheduler", "inflight_scheduler_requests_queued", lambda v: v == 1)
        with openai.OpenAI(base_url=small.base_url, api_key="unused", max_retries=0, timeout=30) as c:
            for stream in (False, True):
                with pytest.raises(openai.RateLimitError) as e:
                    got = c.completions.create(model="double", prompt="Hi", max_tokens=2, stream=stream)
                    list(got) if stream else got
                assert e.value.status_code == 429 and e.value.body["code"] == "rate_limit_exceeded"
        for sock in holders:
            sock.close()
        small.wait_metric("scheduler", "inflight_scheduler_requests_running", lambda v: v == 0)
    finally:
        small.stop_later()  # nothing looks at it again: it ends while the next tests run


def test_on_sigterm_a_stream_finishes_in_full_and_new_requests_get_503(stack):
    """Last: it stops the module's stack. The gateway drains HTTP as it does gRPC."""
    import signal
    import threading

    host, port = stack.http_target.rsplit(":", 1)
    long = raw(stack, "POST", "/v1/completions", {"model": MODEL, "prompt": "Tell me a story.", "max_tokens": 40,
                                                  "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}})
    assert long.status == 200
    assert long.readline().startswith(b"data: ")  # streaming
    body = {}
    reader = threading.Thread(target=lambda: body.setdefault("text", long.read().decode()))
    reader.start()
    stack.proc.send_signal(signal.SIGTERM)
    refused = None
    deadline = time.monotonic() + 20
    while refused is None and reader.is_alive() and time.monotonic() < deadline:
        probe = raw(stack, "POST", "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 1})
        if probe.status == 503:
            refused = json.loads(probe.read())["error"]
        else:
            assert probe.status == 200
            probe.read()
    reader.join(30)
    assert refused is not None and refused["code"] == "service_unavailable" and "shutting down" in refused["message"]
    events = body["text"].split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert json.loads(events[-3][len("data: "):])["usage"]["completion_tokens"] == 40
    assert stack.proc.wait(30) == 0
