"""The whole path, as a user meets it: `inflight serve` starts real processes (scheduler,
worker, gateway) on loopback, and the tests talk gRPC to them."""

from __future__ import annotations

import asyncio
import math

import grpc
import pytest

from inflight.client import Client
from inflight.sampling_params import SamplingParams
from inflight.v1 import pb
from testing.stack import Stack

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def stack(default_stack) -> Stack:
    """The session's default stack (conftest.py), started again if test_openai_http.py's
    last test stopped it; a test here that stopped it (SIGTERM below) gets it started again
    for the tests after it."""
    return default_stack()


def run(coro):
    return asyncio.run(coro)


async def chat_session(target: str, chats: list[list[dict]], **params) -> dict[str, dict]:
    """Starts chat i as request str(i) on one stream, closes it, and collects the events."""
    async with Client(target) as client:
        session = client.session()
        for i, c in enumerate(chats):
            session.start(str(i), chat=c, **params)
        session.close()
        return await collect(session)


async def collect(session, refused_duplicates: set[str] = frozenset()) -> dict[str, dict]:
    """Per request: token ids, text, and its one terminal event (refused duplicate starts
    of an open id are set aside under "duplicate")."""
    out: dict[str, dict] = {}
    async for event in session.events():
        r = out.setdefault(event.request_id, {"ids": [], "text": "", "end": None, "deltas": 0})
        kind = event.WhichOneof("kind")
        if kind == "error" and event.request_id in refused_duplicates and "already open" in event.error.message:
            r["duplicate"] = event.error
            continue
        assert r["end"] is None, f"event after the terminal one for {event.request_id}"
        if kind == "delta":
            r["ids"] += list(event.delta.token_ids)
            r["text"] += event.delta.text
            r["deltas"] += 1
        else:
            r["end"] = getattr(event, kind)
            r["kind"] = kind
    return out


def test_chat_streams_the_engines_greedy_answer(stack, engine_for, tokenizer):
    expected = engine_for().generate([tokenizer.encode_chat(CAPITAL)], SamplingParams(max_tokens=40, temperature=0))[0]

    async def go():
        async with Client(stack.target) as client:
            parts = [p async for p in client.generate(chat=CAPITAL, max_tokens=40, temperature=0)]
        return parts

    parts = run(go())
    finished = parts[-1]
    assert isinstance(finished, pb.Finished) and finished.reason == pb.FINISH_REASON_STOP
    ids = [t for p in parts[:-1] for t in p.token_ids]
    text = "".join(p.text for p in parts[:-1])
    assert ids == expected
    assert text == tokenizer.decode(expected)
    assert text.startswith("The capital of France is Paris.")
    assert finished.usage.completion_tokens == len(expected)
    assert finished.usage.prompt_tokens == len(tokenizer.encode_chat(CAPITAL))


def test_chinese_deltas_concatenate_to_full_decode(stack, tokenizer):
    async def go():
        async with Client(stack.target) as client:
            session = client.session()
            session.start("zh", chat=[{"role": "user", "content": "请用中文写一首关于月亮的短诗。"}], max_tokens=60,
                          temperature=0.8, seed=7, ignore_eos=True)
            session.close()
            return await collect(session)

    r = run(go())["zh"]
    assert r["kind"] == "finished" and len(r["ids"]) == 60
    full = tokenizer.decode(r["ids"])
    assert r["text"] == full
    assert any("\u4e00" <= ch <= "\u9fff" for ch in full)  # it really produced CJK characters
    assert "\ufffd" not in r["text"]


def workload(tokenizer, n):
    return [[{"role": "user", "content": f"Count to {i % 7 + 2} and name a colour number {i}."}] for i in range(n)]


def test_64_concurrent_requests_on_one_stream_and_on_many_connections(stack, engine_for, tokenizer):
    chats = workload(tokenizer, 64)
    # 6 tokens: 62 of the 64 answers already differ from each other (63 at 12), so a request
    # given another's tokens still shows, at half the decode steps of each of the three runs.
    params = SamplingParams(max_tokens=6, temperature=0)
    expected = engine_for().generate([tokenizer.encode_chat(c) for c in chats], params)

    async def one_stream():
        return await chat_session(stack.target, chats, max_tokens=params.max_tokens, temperature=0)

    async def many_connections():
        async def one(i, c):
            async with Client(stack.target) as client:
                return [t for p in [p async for p in client.generate(chat=c, max_tokens=params.max_tokens, temperature=0)][:-1] for t in p.token_ids]

        return await asyncio.gather(*(one(i, c) for i, c in enumerate(chats)))

    out = run(one_stream())
    assert [out[str(i)]["ids"] for i in range(64)] == expected
    assert all(out[str(i)]["kind"] == "finished" for i in range(64))
    assert run(many_connections()) == expected


def test_cancel_and_disconnect_return_kv_blocks(stack):
    total = stack.worker_metrics()["inflight_worker_kv_blocks{state=total}"]
    free = "inflight_worker_kv_blocks{state=free}"
    stack.wait_metric(0, free, lambda v: v == total)

    async def cancel_mid_stream():
        async with Client(stack.target) as client:
            session = client.session()
            session.start("long", text="Tell me a very long story.", max_tokens=2000, ignore_eos=True)
            events = session.events()
            async for event in events:
                if event.WhichOneof("kind") == "delta":
                    break
            await asyncio.to_thread(stack.wait_metric, 0, free, lambda v: v < total)
            session.cancel("long")
            async for event in events:
                if event.WhichOneof("kind") == "error":
                    session.close()
                    return event.error

    err = run(cancel_mid_stream())
    assert err.code == grpc.StatusCode.CANCELLED.value[0]
    stack.wait_metric(0, free, lambda v: v == total)

    async def disconnect():
        async with Client(stack.target) as client:
            session = client.session()
            session.start("long", text="Tell me another long story.", max_tokens=2000, ignore_eos=True)
            async for event in session.events():
                break
            await asyncio.to_thread(stack.wait_metric, 0, free, lambda v: v < total)
            session.abort()

    run(disconnect())
    stack.wait_metric(0, free, lambda v: v == total)
    stack.wait_metric(0, "inflight_worker_requests{state=running}", lambda v: v == 0)


BAD = [
    ("empty prompt", dict(text=""), "INVALID_ARGUMENT", "start.text"),
    ("max_tokens 0", dict(text="hi", max_tokens=0), "INVALID_ARGUMENT", "sampling.max_tokens"),
    ("max_tokens 1e9", dict(text="hi", max_tokens=10**9), "INVALID_ARGUMENT", "sampling.max_tokens"),
    ("temperature NaN", dict(text="hi", temperature=math.nan), "INVALID_ARGUMENT", "sampling.temperature"),
    ("temperature -1", dict(text="hi", temperature=-1.0), "INVALID_ARGUMENT", "sampling.temperature"),
    ("top_p 2", dict(text="hi", top_p=2.0), "INVALID_ARGUMENT", "sampling.top_p"),
    ("unknown model", dict(text="hi", model="no-such-model"), "NOT_FOUND", "model"),
    ("prompt over max_seq_len", dict(token_ids=[5] * 9000), "INVALID_ARGUMENT", "start.token_ids"),
    ("token id out of range", dict(token_ids=[1, 2, 10**7]), "INVALID_ARGUMENT", "start.token_ids"),
    ("negative token id", dict(token_ids=[1, -2]), "INVALID_ARGUMENT", "start.token_ids"),
    ("no prompt", dict(), "INVALID_ARGUMENT", "start.prompt"),
]


def test_bad_inputs_are_refused_by_name_and_service_keeps_serving(stack):
    async def go():
        async with Client(stack.target) as client:
            session = client.session()
            session.start("good", chat=CAPITAL, max_tokens=16, temperature=0)
            for name, kwargs, _, _ in BAD:
                session.start(name, **kwargs)
            session.cancel("never-started")
            session.start("good", text="again")  # duplicate id while "good" is open
            session.close()
            out = await collect(session, {"good"})
            # A fresh request after all that still works.
            parts = [p async for p in client.generate(chat=CAPITAL, max_tokens=8, temperature=0)]
            return out, parts

    out, parts = run(go())
    for name, _, code, field in BAD:
        r = out[name]
        assert r["kind"] == "error", name
        assert r["end"].code == grpc.StatusCode[code].value[0], (name, r["end"])
        assert field in r["end"].message, (name, r["end"].message)
    assert out["never-started"]["kind"] == "error"
    assert "cancel.request_id" in out["never-started"]["end"].message
    assert out["good"]["duplicate"].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    # The refused duplicate did not disturb the open request of that id.
    assert out["good"]["kind"] == "finished" and out["good"]["text"].startswith("The capital")
    assert isinstance(parts[-1], pb.Finished)


def test_unary_complete_tokenize_detokenize_list_models(stack, tokenizer):
    async def go():
        async with Client(stack.target) as client:
            res = await client.complete(chat=CAPITAL, max_tokens=40, temperature=0, stop=["Paris"])
            tok = await client.stub.Tokenize(pb.TokenizeRequest(text="Hello world"))
            detok = await client.stub.Detokenize(pb.DetokenizeRequest(token_ids=tok.token_ids))
            models = await client.stub.ListModels(pb.ListModelsRequest())
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await client.complete(text="hi", top_p=0.0)
            return res, tok, detok, models, e.value

    res, tok, detok, models, err = run(go())
    assert res.text == "The capital of France is " and res.finished.stop == "Paris"
    assert res.finished.reason == pb.FINISH_REASON_STOP
    assert list(tok.token_ids) == tokenizer.encode("Hello world") and detok.text == "Hello world"
    assert [m.id for m in models.models] == ["SmolLM2-135M-Instruct"] and models.models[0].workers == 1
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "sampling.top_p" in err.details()


def test_stop_string_across_deltas_cuts_output(stack, tokenizer):
    async def go():
        async with Client(stack.target) as client:
            full = await client.complete(chat=CAPITAL, max_tokens=40, temperature=0)
            # A stop string spanning several tokens, as the model writes it.
            stop = "of France is"
            parts = [p async for p in client.generate(chat=CAPITAL, max_tokens=40, temperature=0, stop=[stop])]
            return full.text, stop, parts

    full, stop, parts = run(go())
    text = "".join(p.text for p in parts[:-1])
    assert text == full[: full.index(stop)]
    assert parts[-1].stop == stop


def test_health_and_reflection(stack):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(stack.target) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="inflight.v1.Inference")).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        responses = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        services = [s.name for r in responses for s in r.list_services_response.service]
    assert "inflight.v1.Inference" in services and "grpc.health.v1.Health" in services


def test_client_deadline_ends_request_and_frees_the_worker(stack):
    total = stack.worker_metrics()["inflight_worker_kv_blocks{state=total}"]
    free = "inflight_worker_kv_blocks{state=free}"

    async def go():
        async with Client(stack.target) as client:
            req = pb.CompleteRequest(text="Tell me a very long story.", sampling=pb.SamplingParams(max_tokens=3000, ignore_eos=True))
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await client.stub.Complete(req, timeout=1.5)
            return e.value.code()

    assert run(go()) == grpc.StatusCode.DEADLINE_EXCEEDED
    stack.wait_metric(0, free, lambda v: v == total)
    stack.wait_metric(0, "inflight_worker_requests{state=running}", lambda v: v == 0)


def test_ctrl_c_drains_the_streams_in_flight_then_stops_every_child(stack):
    """Ctrl-C in serve's terminal (SIGINT to its process group) while a stream is in flight:
    the stream still gets every token, then every child stops. The module's stack, which
    served the tests above, ends here."""
    import os
    import time

    from testing.stack import count_children

    s = stack
    children = [int(p) for p in os.popen(f"ps -o pid= --ppid {s.proc.pid}").read().split()]
    assert len(children) == 3  # scheduler, worker, gateway
    want = 40

    async def go():
        async with Client(s.target) as client:
            session = client.session()
            session.start("long", text="Tell me a very long story.", max_tokens=want, ignore_eos=True)
            session.close()
            out = {"ids": [], "end": None}
            async for event in session.events():
                kind = event.WhichOneof("kind")
                if kind == "delta":
                    if not out["ids"]:
                        s.ctrl_c()  # once the stream is under way
                    out["ids"] += list(event.delta.token_ids)
                else:
                    out["end"] = (kind, getattr(event, kind))
            return out

    out = run(go())
    assert out["end"][0] == "finished", out["end"]
    assert len(out["ids"]) == want
    assert s.proc.wait(60) == 0

    def alive():
        out = []
        for p in children:
            try:
                with open(f"/proc/{p}/status") as f:
                    if "zombie" not in f.read():
                        out.append(p)
            except FileNotFoundError:
                pass
        return out

    deadline = time.monotonic() + 0.5  # as long as the children had before, looked at as they go
    while alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert alive() == [] and count_children(s.proc.pid) == 0
    # Nor does any say more than it should as it stops: a process that froze its objects for
    # the collector (inflight.process.settle_gc) and holds Triton's nanobind types printed a
    # screen of "leaked instance" warnings at exit.
    s.drainer.join(10)
    assert not s.drainer.is_alive() and not [line for line in s.log if "leaked" in line], "".join(s.log[-40:])
