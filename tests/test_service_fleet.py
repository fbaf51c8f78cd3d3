"""Admission and routing across real processes: a full admission queue answers
RESOURCE_EXHAUSTED at once; two workers share the load and prefixes stick together."""

from __future__ import annotations

import asyncio

import grpc

from inflight.client import Client
from inflight.sampling_params import SamplingParams
from tests.stack import Stack
from tests.test_service import collect


def test_full_admission_queue_refuses_overflow_and_serves_the_rest(make_engine, tokenizer):
    # The worker holds 2 requests at once and the scheduler queues 2 more: 4 of a burst fit.
    stack = Stack(env={"INFLIGHT_MAX_BATCH_SIZE": "2", "INFLIGHT_WORKER_QUEUE_FACTOR": "1"}, extra=["--max-queued", "2"])
    try:
        chats = [[{"role": "user", "content": f"Say the number {i}."}] for i in range(12)]

        async def burst():
            async with Client(stack.target) as client:
                session = client.session()
                for i, c in enumerate(chats):
                    session.start(str(i), chat=c, max_tokens=10, temperature=0)
                session.close()
                return await collect(session)

        out = asyncio.run(burst())
    finally:
        stack.stop()
    refused = [i for i in range(12) if out[str(i)]["kind"] == "error"]
    served = [i for i in range(12) if out[str(i)]["kind"] == "finished"]
    assert len(served) == 4 and len(refused) == 8
    for i in refused:
        err = out[str(i)]["end"]
        assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and "queue is full" in err.message
        assert out[str(i)]["ids"] == []
    engine = make_engine()
    for i in served:
        expected = engine.generate([tokenizer.encode_chat(chats[i])], SamplingParams(max_tokens=10, temperature=0))[0]
        assert out[str(i)]["ids"] == expected


def test_two_workers_share_load_and_prefixes_stick(tokenizer):
    stack = Stack(workers=2)
    try:
        def submitted(i):
            return stack.worker_metrics(i)["inflight_worker_requests_submitted_total"]

        words = "apple river stone cloud lamp tiger violet copper window garden".split()

        async def concurrent(n):
            async with Client(stack.target) as client:
                session = client.session()
                for i in range(n):
                    # Distinct prompts: beyond the template's default system prompt they share nothing.
                    text = " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(40))
                    session.start(str(i), chat=[{"role": "user", "content": f"{i} {text}"}], max_tokens=24, ignore_eos=True)
                session.close()
                return await collect(session)

        out = asyncio.run(concurrent(8))
        assert all(r["kind"] == "finished" for r in out.values())
        assert submitted(0) > 0 and submitted(1) > 0

        before = [submitted(0), submitted(1)]
        system = "You are the assistant of a large library. Answer briefly and politely. " * 8

        async def shared_prefix():
            async with Client(stack.target) as client:
                for q in ("Where are the maps?", "When do you open?", "Can I borrow films?", "Is there wifi?", "Do you sell books?"):
                    parts = [p async for p in client.generate(chat=[{"role": "system", "content": system}, {"role": "user", "content": q}], max_tokens=4)]
                    assert parts[-1].usage.prompt_tokens > 100
                return parts[-1].usage.cached_tokens

        cached = asyncio.run(shared_prefix())
        after = [submitted(0), submitted(1)]
        moved = [a - b for a, b in zip(after, before)]
        assert sorted(moved) == [0, 5], moved  # all five on one worker
        assert cached >= 64  # and that worker served the shared prefix from its cache
    finally:
        stack.stop()
