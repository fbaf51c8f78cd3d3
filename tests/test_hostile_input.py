"""Hostile input against the real stack: every limit on what a client controls, just under
(served) and just over (refused with the status it deserves and the field named), bytes
that are not protobuf on every method, and the service serving normally after all of it."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from gateway.main import GatewayConfig
from gateway.validation import MAX_CHAT_MESSAGES, MAX_DETOKENIZE_IDS, MAX_PROMPT_BYTES, MAX_REQUEST_ID_CHARS
from inflight.client import Client
from inflight.v1 import pb
from inflight.validation import MAX_STOP_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS
from testing.stack import Stack

OPEN_PER_STREAM = 4  # the module's stack: --max-open-requests-per-stream, small to reach quickly
MESSAGE_BYTES = GatewayConfig().max_receive_message_bytes  # the default
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
INVALID, EXHAUSTED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture(scope="module")
def stack():
    s = Stack(workers=1, env={"INFLIGHT_MAX_OPEN_REQUESTS_PER_STREAM": str(OPEN_PER_STREAM)})
    yield s
    s.stop_later()  # nothing looks at it again: it ends while the next tests run


def run(coro):
    return asyncio.run(coro)


def chat(n: int, content: str = "hi") -> list[dict]:
    return [{"role": "user", "content": content}] * n


async def terminal_events(target: str, starts: list[tuple[str, dict]]) -> dict[str, tuple[str, object]]:
    """Starts each request on one stream; per request id its terminal event (kind, event)."""
    async with Client(target) as client:
        session = client.session()
        for rid, kwargs in starts:
            session.start(rid, **kwargs)
        session.close()
        out = {}
        async for event in session.events():
            kind = event.WhichOneof("kind")
            if kind != "delta":
                assert event.request_id not in out, event
                out[event.request_id] = (kind, getattr(event, kind))
        return out


SERVED = dict(max_tokens=1, temperature=0)
LIMITS = [  # (request id, start's fields, None if served, else (code, the field named))
    ("stop just under", dict(text="hi", stop=["x" * MAX_STOP_CHARS] * MAX_STOP_STRINGS, **SERVED), None),
    ("stop count over", dict(text="hi", stop=["x"] * (MAX_STOP_STRINGS + 1), **SERVED), (INVALID, "start.sampling.stop:")),
    ("10,000 stop strings", dict(text="hi", stop=[f"s{i}" for i in range(10_000)], **SERVED), (INVALID, "start.sampling.stop:")),
    ("stop length over", dict(text="hi", stop=["ok", "x" * (MAX_STOP_CHARS + 1)], **SERVED), (INVALID, "start.sampling.stop[1]")),
    ("stop_token_ids just under", dict(text="hi", stop_token_ids=list(range(MAX_STOP_TOKEN_IDS)), **SERVED), None),
    ("stop_token_ids over", dict(text="hi", stop_token_ids=list(range(MAX_STOP_TOKEN_IDS + 1)), **SERVED),
     (INVALID, "start.sampling.stop_token_ids")),
    ("text over", dict(text="x" * (MAX_PROMPT_BYTES + 1), **SERVED), (INVALID, "start.text")),
    ("text over in bytes, not characters", dict(text="é" * (MAX_PROMPT_BYTES // 2 + 1), **SERVED), (INVALID, "start.text")),
    ("chat messages over", dict(chat=chat(MAX_CHAT_MESSAGES + 1), **SERVED), (INVALID, "start.chat.messages")),
    ("chat contents over", dict(chat=chat(2, "x" * (MAX_PROMPT_BYTES // 2 + 1)), **SERVED), (INVALID, "start.chat.messages")),
    ("alien role", dict(chat=[*CAPITAL, {"role": "alien", "content": "Take me to your leader."}], **SERVED),
     (INVALID, "start.chat.messages[1].role")),
    ("empty role", dict(chat=[{"role": "", "content": "hi"}], **SERVED), (INVALID, "start.chat.messages[0].role")),
    ("tool role", dict(chat=[*CAPITAL, {"role": "assistant", "content": "Paris."}, {"role": "tool", "content": "{}"}], **SERVED), None),
    ("i" * MAX_REQUEST_ID_CHARS, dict(text="hi", **SERVED), None),
]


def test_each_limit_just_under_is_served_and_just_over_is_refused_by_name(stack):
    long_id = "i" * (MAX_REQUEST_ID_CHARS + 1)
    out = run(terminal_events(stack.target, [(rid, kw) for rid, kw, _ in LIMITS] + [(long_id, dict(text="hi", **SERVED))]))
    for rid, _, refused in LIMITS:
        kind, end = out[rid]
        if refused is None:
            assert kind == "finished", (rid, end)
        else:
            code, field = refused
            assert kind == "error" and end.code == code.value[0], (rid, end)
            assert end.message.startswith(field), (rid, end.message)
    # An id too long to keep is not sent back: the refusal comes under "".
    kind, end = out[""]
    assert kind == "error" and end.code == INVALID.value[0] and end.message.startswith("start.request_id")
    assert long_id not in out


def test_prompts_at_the_byte_and_message_limits_tokenize(stack, tokenizer):
    async def go():
        async with Client(stack.target) as client:
            text = await client.stub.Tokenize(pb.TokenizeRequest(text="é" * (MAX_PROMPT_BYTES // 2)))
            many = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")] * MAX_CHAT_MESSAGES)
            messages = await client.stub.Tokenize(pb.TokenizeRequest(chat=many))
            detok = await client.stub.Detokenize(pb.DetokenizeRequest(token_ids=[42] * MAX_DETOKENIZE_IDS))
            errors = []
            for req in (pb.TokenizeRequest(text="x" * (MAX_PROMPT_BYTES + 1)),
                        pb.TokenizeRequest(chat=pb.ChatMessages(messages=[*many.messages, many.messages[0]])),
                        pb.TokenizeRequest(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="alien", content="hi")]))):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await client.stub.Tokenize(req)
                errors.append(e.value)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await client.stub.Detokenize(pb.DetokenizeRequest(token_ids=[42] * (MAX_DETOKENIZE_IDS + 1)))
            errors.append(e.value)
            return text, messages, detok, errors

    text, messages, detok, errors = run(go())
    assert len(text.token_ids) > 0 and len(messages.token_ids) > MAX_CHAT_MESSAGES
    assert detok.text == tokenizer.decode([42] * MAX_DETOKENIZE_IDS)
    assert [(e.code(), e.details().split(":")[0]) for e in errors] == [
        (INVALID, "text"), (INVALID, "chat.messages"), (INVALID, "chat.messages[0].role"), (INVALID, "token_ids")]


def test_one_start_over_the_streams_open_limit_is_refused(stack):
    long = dict(text="Tell me a very long story.", max_tokens=2000, ignore_eos=True)

    async def go():
        async with Client(stack.target) as client:
            session = client.session()
            for i in range(OPEN_PER_STREAM + 1):
                session.start(str(i), **long)
            events = session.events()
            ends = {}
            async for event in events:
                if event.WhichOneof("kind") == "error":
                    ends[event.request_id] = event.error
                    if event.request_id == str(OPEN_PER_STREAM):
                        session.cancel("0")  # room for one more
                    elif event.request_id == "0":
                        session.start("again", **long)
                elif event.request_id == "again":
                    break  # served
            session.abort()
            return ends

    ends = run(go())
    over = ends[str(OPEN_PER_STREAM)]
    assert over.code == EXHAUSTED.value[0]
    assert f"--max-open-requests-per-stream {OPEN_PER_STREAM}" in over.message and over.message.startswith("start:")
    assert ends["0"].code == grpc.StatusCode.CANCELLED.value[0]
    assert set(ends) == {str(OPEN_PER_STREAM), "0"}  # the other open ones went on


def test_messages_over_the_receive_limit_are_refused_by_grpc(stack):
    def tokenize(size: int) -> pb.TokenizeRequest:
        req = pb.TokenizeRequest(text="x" * (size - 5))  # a tag byte and 4 of length
        assert req.ByteSize() == size
        return req

    async def go():
        async with Client(stack.target) as client:
            out = []
            for size in (MESSAGE_BYTES, MESSAGE_BYTES + 1):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await client.stub.Tokenize(tokenize(size))
                out.append(e.value)
            session = client.session()
            session.start("big", text="x" * MESSAGE_BYTES)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                async for _ in session.events():
                    pass
            out.append(e.value)
            return out

    at, over, stream = run(go())
    # At the limit, gRPC delivers it and our own prompt limit refuses it by name.
    assert at.code() == INVALID and at.details().startswith("text:")
    assert over.code() == EXHAUSTED and "larger than max" in over.details()
    assert stream.code() == EXHAUSTED


GARBAGE = [
    b"\x0a\xff",  # field 1, 255 bytes long, then nothing
    b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",  # a varint tag that never ends
    b"\x12\x02\xff\xfe",  # field 2 (text/token_ids) as two bytes that are not UTF-8
]


def test_bytes_that_are_not_protobuf_are_invalid_argument_on_every_method(stack):
    async def go():
        results = []
        async with grpc.aio.insecure_channel(stack.target) as channel:
            for method in ("Complete", "Tokenize", "Detokenize", "ListModels"):
                call = channel.unary_unary(f"/inflight.v1.Inference/{method}")  # bytes in, bytes out
                for data in GARBAGE:
                    try:
                        await call(data, timeout=10)
                        results.append((method, data, grpc.StatusCode.OK, ""))
                    except grpc.aio.AioRpcError as e:
                        results.append((method, data, e.code(), e.details()))
            generate = channel.stream_stream("/inflight.v1.Inference/Generate")
            good = pb.GenerateRequest(start=pb.StartRequest(request_id="a", text="Once upon a time",
                                                            sampling=pb.SamplingParams(max_tokens=500, ignore_eos=True)))
            for data in GARBAGE:
                call = generate(iter([good.SerializeToString(), data]), timeout=10)
                try:
                    async for _ in call:
                        pass
                    results.append(("Generate", data, grpc.StatusCode.OK, ""))
                except grpc.aio.AioRpcError as e:
                    results.append(("Generate", data, e.code(), e.details()))
        return results

    for method, data, code, details in run(go()):
        # ListModelsRequest has no fields: bytes that are merely unknown fields parse.
        if method == "ListModels" and data == GARBAGE[2]:
            assert code == grpc.StatusCode.OK
            continue
        assert code == INVALID, (method, data, code, details)
        assert details.startswith("request: not a valid inflight.v1."), (method, details)


def test_after_all_of_it_the_service_still_answers(stack):
    async def go():
        async with Client(stack.target) as client:
            return await client.complete(chat=CAPITAL, max_tokens=8, temperature=0)

    assert run(go()).text.startswith("The capital of France is")
    assert stack.proc.poll() is None
    stack.wait_metric(0, "inflight_worker_requests{state=running}", lambda v: v == 0)
