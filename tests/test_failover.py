"""Faults with real processes: a worker killed mid-stream, workers stopped (alive but
silent), and `inflight serve` starting a dead worker again. Two workers on the real model;
the scheduler counts a worker lost after 2 s without a heartbeat."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
import pytest

from inflight.client import Client
from inflight.sampling_params import SamplingParams
from testing.stack import Stack, children_of

WORKER_TIMEOUT = 2.0
CHATS = [[{"role": "user", "content": f"Tell me a short story about a {animal}."}]
         for animal in ("cat", "dog", "fox", "owl", "bee", "eel")]
SEEDED = dict(temperature=0.8, top_p=0.95, seed=1234)
# Tokens per request in the fault tests: each fault strikes once every request has its first
# token, so a few more than the moment of the fault and the takeover are enough; every
# stream, and the engine's reference, costs about 0.1 s a token on the CPU.
MAX_TOKENS = 20
DRAIN_TOKENS = 40  # the gateway's drain test: its streams must outlast a health check and one more start


@pytest.fixture(scope="module")
def stack():
    s = Stack(workers=2, env={"INFLIGHT_WORKER_TIMEOUT": str(WORKER_TIMEOUT)})
    yield s
    s.stop_later()  # nothing looks at it again: it ends while the next tests run


@pytest.fixture(scope="module")
def want(engine_for, tokenizer) -> tuple[list[list[int]], list[int]]:
    """What the engine alone gives the greedy chats, and the seeded one: computed once for
    the tests that compare the streams with it."""
    prompts = [tokenizer.encode_chat(c) for c in CHATS]
    engine = engine_for()
    greedy = engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
    seeded = engine.generate(prompts[:1], SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, **SEEDED))[0]
    return greedy, seeded


def worker_pid(stack: Stack, name: str) -> int:
    for pid in children_of(stack.proc.pid):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        if b"worker" in argv and name.encode() in argv:
            return pid
    raise AssertionError(f"no process for {name}")


def moved(stack: Stack, why: str) -> float:
    return stack.metrics("scheduler").get(f"inflight_scheduler_requests_moved_total{{why={why}}}", 0.0)


async def run_streams(target: str, after_first_tokens=None) -> dict[str, dict]:
    """The six greedy chats and one seeded sampled chat on one stream; calls
    `after_first_tokens()` once every request has had a delta. Per request: ids, text,
    and how it ended."""
    async with Client(target) as client:
        session = client.session()
        for i, chat in enumerate(CHATS):
            session.start(f"greedy-{i}", chat=chat, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
        session.start("seeded", chat=CHATS[0], max_tokens=MAX_TOKENS, ignore_eos=True, **SEEDED)
        session.close()
        out: dict[str, dict] = {}
        fired = after_first_tokens is None
        async for event in session.events():
            r = out.setdefault(event.request_id, {"ids": [], "text": "", "end": None, "at": None})
            kind = event.WhichOneof("kind")
            if kind == "delta":
                r["ids"] += event.delta.token_ids
                r["text"] += event.delta.text
            else:
                r["end"], r["at"] = (kind, event.finished if kind == "finished" else event.error), time.monotonic()
            if not fired and len(out) == len(CHATS) + 1 and all(x["ids"] for x in out.values()):
                fired = True
                after_first_tokens()
        return out


def test_a_killed_workers_streams_go_on_elsewhere_with_nothing_lost_and_it_comes_back(stack, want, tokenizer):
    want, want_seeded = want
    before = moved(stack, "silent")
    victim = worker_pid(stack, "worker-0")
    killed = []

    def kill():
        os.kill(victim, signal.SIGKILL)
        killed.append(time.monotonic())

    out = asyncio.run(run_streams(stack.target, kill))
    assert killed
    for i in range(len(CHATS)):
        r = out[f"greedy-{i}"]
        assert r["end"][0] == "finished", r["end"]
        assert r["ids"] == want[i]  # nothing lost, nothing repeated
        assert r["text"] == tokenizer.decode(want[i])
    assert out["seeded"]["end"][0] == "finished" and out["seeded"]["ids"] == want_seeded
    assert moved(stack, "silent") > before  # the killed worker really held some of them

    # `inflight serve` starts it again and it rejoins.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (stack.workers_alive() < 2 or worker_pid_or_none(stack, "worker-0") in (None, victim)):
        time.sleep(0.2)
    assert stack.workers_alive() == 2 and worker_pid(stack, "worker-0") != victim
    again = asyncio.run(run_streams(stack.target))
    assert [again[f"greedy-{i}"]["ids"] for i in range(len(CHATS))] == want


def worker_pid_or_none(stack: Stack, name: str) -> int | None:
    try:
        return worker_pid(stack, name)
    except AssertionError:
        return None


def test_with_every_worker_stopped_requests_end_unavailable_in_time_and_serving_resumes(stack):
    pids = [worker_pid(stack, f"worker-{i}") for i in range(2)]
    stopped = []

    def stop_all():
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        stopped.append(time.monotonic())

    try:
        out = asyncio.run(asyncio.wait_for(run_streams(stack.target, stop_all), 60))
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    for rid, r in out.items():
        assert r["end"][0] == "error" and r["end"][1].code == grpc.StatusCode.UNAVAILABLE.value[0], (rid, r["end"])
        assert r["at"] - stopped[0] < WORKER_TIMEOUT + 2.0  # the timeout, a sweep, and the relay
    # Back from the stop: they rejoin (their next hello), drop what was theirs, and serve.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and stack.workers_alive() < 2:
        time.sleep(0.2)
    assert stack.workers_alive() == 2
    for i in range(2):
        stack.wait_metric(i, "inflight_worker_requests{state=running}", lambda v: v == 0, timeout=30)
    again = asyncio.run(run_streams(stack.target))
    assert all(r["end"][0] == "finished" and len(r["ids"]) == MAX_TOKENS for r in again.values())


def test_garbage_on_the_scheduler_sockets_is_logged_and_dropped(stack):
    """Bytes that are not our messages, sent to both of the scheduler's sockets the way a
    confused or hostile peer would: truncated, wrong type, wrong frame count, oversized.
    Every process lives on and serves."""
    import msgspec
    import zmq

    from inflight import schema
    from inflight.sampling_params import SamplingParams
    from inflight.sockets import MAX_FRAME_BYTES

    good = schema.encode(schema.Submit("x/1", "m", [1, 2], SamplingParams()))
    garbage = [
        b"",
        b"\x00\xff not msgpack at all",
        good[: len(good) // 2],  # truncated
        msgspec.msgpack.encode({"type": "Submit", "request_id": 7}),  # wrong field types
        msgspec.msgpack.encode({"type": "TokenBatch", "items": [], "gateway": b""}),  # a worker's message, to the gateway side
        msgspec.msgpack.encode({"type": "WorkerHello", "worker_id": ["no"]}),
        msgspec.msgpack.encode([1, 2, 3]),
    ]
    ctx = zmq.Context()
    try:
        for address in (stack.gateway_address, stack.worker_address):
            peer = ctx.socket(zmq.DEALER)
            peer.setsockopt(zmq.LINGER, 0)
            peer.setsockopt(zmq.IDENTITY, b"intruder")
            peer.connect(address)
            for raw in garbage:
                peer.send(raw)
            peer.send_multipart([b"two", b"frames"])
            peer.send(b"\x00" * (MAX_FRAME_BYTES + 1))  # refused by ZeroMQ, which drops this peer
            time.sleep(0.5)
            peer.close()
    finally:
        ctx.term()
    time.sleep(0.5)
    assert stack.proc.poll() is None and stack.workers_alive() == 2
    log = "".join(stack.log)
    assert "undecodable message from gateway b'intruder'" in log and "undecodable message from worker b'intruder'" in log
    assert "dropped a message of 3 frames" in log
    out = asyncio.run(run_streams(stack.target))
    assert all(r["end"][0] == "finished" for r in out.values())


def test_a_worker_told_to_stop_finishes_its_streams_first(stack, want):
    """SIGTERM to a worker mid-stream (as an orchestrator stops it): it takes nothing new,
    finishes what it holds, and leaves; nothing is moved, nothing lost."""
    want, _ = want
    moved_before = {why: moved(stack, why) for why in ("silent", "drained", "stalled", "restarted")}
    submitted = "inflight_worker_requests_submitted_total"
    before = [stack.metrics(i)[submitted] for i in range(2)]
    stopped = []  # (worker index, its pid, the streams it held)

    def stop():
        # The worker holding the most of the streams, all started by now (the scheduler may
        # route them all to one: prefix affinity).
        held = [stack.metrics(i)[submitted] - before[i] for i in range(2)]
        i = max(range(2), key=held.__getitem__)
        stopped.append((i, worker_pid(stack, f"worker-{i}"), held[i]))
        os.kill(stopped[0][1], signal.SIGTERM)

    out = asyncio.run(run_streams(stack.target, stop))
    [(i, victim, held)] = stopped
    assert held > 0
    for j in range(len(CHATS)):
        assert out[f"greedy-{j}"]["end"][0] == "finished" and out[f"greedy-{j}"]["ids"] == want[j]
    assert out["seeded"]["end"][0] == "finished"
    assert {why: moved(stack, why) for why in moved_before} == moved_before  # it finished them itself
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (worker_pid_or_none(stack, f"worker-{i}") in (None, victim) or stack.workers_alive() < 2):
        time.sleep(0.2)
    assert worker_pid(stack, f"worker-{i}") != victim and stack.workers_alive() == 2  # inflight serve started it again


def test_a_gateway_told_to_stop_says_not_serving_refuses_new_work_and_finishes_its_streams(stack):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from gateway.servicer import DRAINING

    gateway = [pid for pid in children_of(stack.proc.pid) if b"gateway" in open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")][0]

    def health() -> int | None:
        try:
            with grpc.insecure_channel(stack.target) as channel:
                return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status
        except grpc.RpcError:
            return None

    async def go():
        async with Client(stack.target) as client:
            session = client.session()
            for i in range(2):
                session.start(f"long-{i}", chat=CHATS[i], max_tokens=DRAIN_TOKENS, temperature=0, ignore_eos=True)
            out: dict[str, dict] = {}
            told = None
            statuses = []
            async for event in session.events():
                r = out.setdefault(event.request_id, {"ids": [], "end": None})
                kind = event.WhichOneof("kind")
                if kind == "delta":
                    r["ids"] += event.delta.token_ids
                else:
                    r["end"] = event.finished if kind == "finished" else event.error
                if told is None and len(out) == 2:
                    os.kill(gateway, signal.SIGTERM)
                    told = time.monotonic()
                    await asyncio.sleep(0.5)
                    statuses.append(await asyncio.get_running_loop().run_in_executor(None, health))
                    session.start("late", chat=CHATS[2], max_tokens=4, temperature=0)
                    session.close()
            return out, statuses

    out, statuses = asyncio.run(asyncio.wait_for(go(), 60))  # the stream ended by itself once drained
    assert statuses == [health_pb2.HealthCheckResponse.NOT_SERVING]
    from inflight.v1 import pb

    for i in range(2):  # finished in full, not cut off
        assert isinstance(out[f"long-{i}"]["end"], pb.Finished) and out[f"long-{i}"]["end"].reason == pb.FINISH_REASON_LENGTH
        assert len(out[f"long-{i}"]["ids"]) == DRAIN_TOKENS
    late = out["late"]["end"]
    assert late.code == grpc.StatusCode.UNAVAILABLE.value[0] and late.message == DRAINING
    deadline = time.monotonic() + 60  # it exits, and `inflight serve` starts another
    while time.monotonic() < deadline and health() != health_pb2.HealthCheckResponse.SERVING:
        time.sleep(0.2)
    assert health() == health_pb2.HealthCheckResponse.SERVING
