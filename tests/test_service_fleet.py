"""Admission and routing across real processes: a full admission queue answers
RESOURCE_EXHAUSTED at once; two workers share the load and prefixes stick together; two
gateway processes share one port and one's death leaves the other's streams alone."""

from __future__ import annotations

import asyncio

import grpc

from inflight.client import Client
from inflight.v1 import pb
from inflight.sampling_params import SamplingParams
from testing.stack import Stack
from tests.test_service import chat_session


def test_full_admission_queue_refuses_overflow_and_serves_the_rest(engine_for, tokenizer):
    """Ten times what fits: the worker holds 2 requests at once and the scheduler queues 2
    more, and a burst of 40 arrives. The 36 refused hear so at once, long before the first
    admitted one could finish; the 4 admitted complete correctly."""
    import time

    stack = Stack(env={"INFLIGHT_MAX_BATCH_SIZE": "2", "INFLIGHT_WORKER_QUEUE_FACTOR": "1"}, extra=["--max-queued", "2"])
    n = 40
    chats = [[{"role": "user", "content": f"Say the number {i}."}] for i in range(n)]
    ended: dict[str, float] = {}

    async def burst():
        async with Client(stack.target) as client:
            session = client.session()
            t0 = time.monotonic()
            for i, c in enumerate(chats):
                session.start(str(i), chat=c, max_tokens=10, temperature=0)
            session.close()
            out = {}
            async for event in session.events():
                r = out.setdefault(event.request_id, {"ids": [], "kind": None, "end": None})
                kind = event.WhichOneof("kind")
                if kind == "delta":
                    r["ids"] += event.delta.token_ids
                else:
                    r["kind"], r["end"] = kind, event.error if kind == "error" else event.finished
                    ended[event.request_id] = time.monotonic() - t0
            return out

    try:
        out = asyncio.run(burst())
    finally:
        stack.stop_later()  # only the answers are looked at below: it ends meanwhile
    refused = [i for i in range(n) if out[str(i)]["kind"] == "error"]
    served = [i for i in range(n) if out[str(i)]["kind"] == "finished"]
    assert len(served) == 4 and len(refused) == 36
    first_served = min(ended[str(i)] for i in served)
    for i in refused:
        err = out[str(i)]["end"]
        assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and "queue is full" in err.message
        assert out[str(i)]["ids"] == []
        assert ended[str(i)] < first_served  # at once: none waited for the admitted ones
    engine = engine_for()
    for i in served:
        expected = engine.generate([tokenizer.encode_chat(chats[i])], SamplingParams(max_tokens=10, temperature=0))[0]
        assert out[str(i)]["ids"] == expected


def test_two_workers_share_load_and_prefixes_stick(tokenizer):
    stack = Stack(workers=2)
    try:
        def submitted(i):
            return stack.worker_metrics(i)["inflight_worker_requests_submitted_total"]

        words = "apple river stone cloud lamp tiger violet copper window garden".split()

        # Distinct prompts: beyond the template's default system prompt they share nothing.
        chats = [[{"role": "user", "content": f"{i} " + " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(40))}]
                 for i in range(8)]
        # All eight start at once, so their length has no say in where they go: a few tokens each.
        out = asyncio.run(chat_session(stack.target, chats, max_tokens=8, ignore_eos=True))
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
        stack.stop_later()  # nothing looks at it again: it ends while the next tests run


def test_restarted_scheduler_gets_workers_and_gateways_back():
    """Scheduler, worker and gateway started one by one (as compose would). The scheduler
    is stopped while a request streams: the request ends with UNAVAILABLE within the
    gateway's scheduler timeout, not never; restarted, the scheduler gets the worker and the
    gateway back by themselves and serves. Killed and started again at once, before the
    gateway could miss it, the new scheduler's answer still ends what the old one held."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from gateway.scheduler_client import SCHEDULER_TIMEOUT
    from testing.stack import free_port

    front, back, port = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}", free_port()
    cli = [sys.executable, "-m", "cli", "--log-level", "WARNING"]

    def scheduler():
        return subprocess.Popen(cli + ["scheduler", "--gateway-address", front, "--worker-address", back, "--metrics-port", "0"])

    procs = [scheduler(),
             subprocess.Popen(cli + ["worker", "--scheduler-address", back, "--device", "cpu", "--metrics-port", "0"]),
             subprocess.Popen(cli + ["gateway", "--listen", f"127.0.0.1:{port}", "--scheduler-address", front, "--metrics-port", "0"])]
    chat = [{"role": "user", "content": "What is the capital of France?"}]

    async def ask():
        async with Client(f"127.0.0.1:{port}") as client:
            parts = [p async for p in client.generate(chat=chat, max_tokens=8, temperature=0)]
            return "".join(getattr(p, "text", "") for p in parts)

    def served_within(seconds: float) -> str:
        deadline = time.monotonic() + seconds
        while True:
            try:
                return asyncio.run(ask())
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    async def long_request_while(action) -> tuple[object, float]:
        """A long request; `action()` once its first tokens arrived. Its end, and how long
        after the action it came."""
        async with Client(f"127.0.0.1:{port}") as client:
            session = client.session()
            session.start("long", chat=chat, max_tokens=2000, ignore_eos=True, temperature=0)
            session.close()
            acted = None
            async for event in session.events():
                if event.WhichOneof("kind") == "delta" and acted is None:
                    action()
                    acted = time.monotonic()
                elif event.WhichOneof("kind") != "delta":
                    return event, time.monotonic() - acted

    try:
        first = served_within(120)
        assert first.startswith("The capital of France")

        def stop_scheduler():
            procs[0].send_signal(signal.SIGKILL)

        end, after = asyncio.run(asyncio.wait_for(long_request_while(stop_scheduler), 60))
        assert end.WhichOneof("kind") == "error" and end.error.code == grpc.StatusCode.UNAVAILABLE.value[0], end
        assert "lost contact with the scheduler" in end.error.message
        assert after < SCHEDULER_TIMEOUT + 2.0
        procs[0].wait(30)
        procs[0] = scheduler()
        t0 = time.monotonic()
        assert served_within(30) == first
        assert time.monotonic() - t0 < 10  # the worker joins at once when asked, not at its next periodic hello

        def restart_scheduler():
            procs[0].send_signal(signal.SIGKILL)
            procs[0].wait(30)
            procs[0] = scheduler()

        end, after = asyncio.run(asyncio.wait_for(long_request_while(restart_scheduler), 60))
        assert end.WhichOneof("kind") == "error" and end.error.code == grpc.StatusCode.UNAVAILABLE.value[0], end
        assert after < SCHEDULER_TIMEOUT + 5.0
        assert served_within(30) == first
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(p.pid, signal.SIGKILL)



def test_two_gateways_share_one_port_and_survive_each_others_death():
    """`--gateways 2`: new connections (a channel of their own each: grpc shares one between
    a process's channels) spread over both processes on the one port. SIGKILL to one while
    every stream has tokens: the other's streams finish in full, the killed one's end with
    UNAVAILABLE, new connections are all served meanwhile, `inflight serve` starts the dead
    one again and it takes its share; the scheduler forgets the dead one after
    --gateway-timeout."""
    import os
    import signal
    import time

    from testing.stack import children_of

    stack = Stack(gateways=2, env={"INFLIGHT_GATEWAY_TIMEOUT": "4"})
    own = [("grpc.use_local_subchannel_pool", 1)]

    def served(gateway: str) -> float:
        return sum(v for k, v in stack.metrics(gateway).items() if k.startswith("inflight_gateway_requests_total{"))

    def ready(gateway: str) -> bool:
        try:
            return stack.http_get(gateway, "/ready")[0] == 200
        except OSError:  # not listening (yet)
            return False

    def wait_until(predicate, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, what
            time.sleep(0.1)

    def gateway_pid(name: str) -> int:
        port = str(stack.http_port(name))
        for pid in children_of(stack.proc.pid):
            argv = open(f"/proc/{pid}/cmdline", "rb").read().decode().split("\0")
            if "gateway" in argv and argv[argv.index("--metrics-port") + 1] == port:
                return pid
        raise AssertionError(f"no {name} process")

    async def short_requests(n: int) -> list[int]:
        """n requests of 2 tokens, a connection each, at once: the tokens each got."""
        async def one(i):
            async with Client(stack.target, options=own) as client:
                parts = [p async for p in client.generate(text=f"Count to {i}.", max_tokens=2, ignore_eos=True)]
                return sum(len(p.token_ids) for p in parts[:-1])
        return await asyncio.gather(*[one(i) for i in range(n)])

    async def streams_through_a_kill(n: int, victim: int) -> list[tuple]:
        """n streams, a connection each; `victim` is killed once every one has tokens. Per
        stream: how it ended, and its tokens."""
        streaming = set()
        all_streaming = asyncio.Event()

        async def one(i):
            async with Client(stack.target, options=own) as client:
                tokens = 0
                try:
                    async for part in client.generate(text=f"Tell a story about {i}.", max_tokens=12, ignore_eos=True):
                        if not isinstance(part, pb.Delta):
                            return "finished", tokens
                        tokens += len(part.token_ids)
                        streaming.add(i)
                        if len(streaming) == n:
                            all_streaming.set()
                except grpc.aio.AioRpcError as e:
                    return e.code(), tokens

        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        await asyncio.wait_for(all_streaming.wait(), 60)
        os.kill(victim, signal.SIGKILL)
        return await asyncio.gather(*tasks)

    try:
        assert f"serving on {stack.target} with 2 gateway process(es) and 1 worker(s)" in "".join(stack.log)
        stack.wait_metric("scheduler", "inflight_scheduler_gateways_alive", lambda v: v == 2)

        assert asyncio.run(short_requests(16)) == [2] * 16
        assert served("gateway-0") > 0 and served("gateway-1") > 0  # both took some
        assert served("gateway-0") + served("gateway-1") == 16
        # The OpenAI HTTP port is shared the same way: a connection each, both take some.
        import json
        import urllib.request

        body = json.dumps({"model": "SmolLM2-135M-Instruct", "prompt": "Count to 3.", "max_tokens": 2, "ignore_eos": True}).encode()
        for _ in range(16):
            req = urllib.request.Request(f"{stack.base_url}/completions", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                assert json.loads(r.read())["usage"]["completion_tokens"] == 2
        over_http = [stack.metrics(g)["inflight_gateway_requests_total{code=OK,finish_reason=length,protocol=http}"]
                     for g in ("gateway-0", "gateway-1")]
        assert sum(over_http) == 16 and min(over_http) > 0

        victim, before = gateway_pid("gateway-1"), served("gateway-0")
        ends = asyncio.run(streams_through_a_kill(16, victim))
        kept = [tokens for how, tokens in ends if how == "finished"]
        lost = [how for how, _ in ends if how != "finished"]
        assert kept == [12] * len(kept) and served("gateway-0") - before == len(kept) > 0  # gateway-0's, in full
        assert lost == [grpc.StatusCode.UNAVAILABLE] * len(lost) and len(lost) > 0  # gateway-1's

        assert asyncio.run(short_requests(8)) == [2] * 8  # while gateway-1 is down or coming back

        wait_until(lambda: ready("gateway-1"), "gateway-1 was not started again")
        assert gateway_pid("gateway-1") != victim
        before = served("gateway-0")
        assert asyncio.run(short_requests(16)) == [2] * 16
        assert served("gateway-1") > 0 and served("gateway-0") > before  # the new one takes its share
        forgotten = f"-{victim}-"  # the dead one's id: host-pid-random
        wait_until(lambda: any(forgotten in line and "silent for" in line for line in stack.log), "the dead gateway stayed known")
        stack.wait_metric("scheduler", "inflight_scheduler_gateways_alive", lambda v: v == 2)
        stack.wait_metric("scheduler", "inflight_scheduler_requests_running", lambda v: v == 0)
    finally:
        stack.stop()
    assert "gateway-1 exited with code -9; starting it again" in "".join(stack.log)
