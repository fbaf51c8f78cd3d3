"""The gateway's SchedulerClient on a real ZeroMQ socket, with the test in the scheduler's
place: what happens to a request whose output the gateway fails to handle."""

from __future__ import annotations

import asyncio

import pytest
import zmq
import zmq.asyncio

from inflight import errors, schema
from inflight.sampling_params import SamplingParams
from testing.stack import free_port
from gateway.scheduler_client import SchedulerClient


@pytest.mark.parametrize("finished", [False, True])
def test_a_handler_that_raises_ends_its_request_with_internal_and_the_rest_go_on(finished):
    """The handler of one request raises on its output (mid-stream or on its last one): it
    is called once more with INTERNAL, so that its stream ends, the scheduler is told to
    abort it when it was still running, and another request's output still arrives."""

    async def go():
        address = f"tcp://127.0.0.1:{free_port()}"
        scheduler = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
        scheduler.bind(address)
        client = SchedulerClient(address, "g")
        client.start()
        seen: dict[str, list[schema.RequestOutput]] = {"bad": [], "good": []}

        def handler(rid):
            def handle(out: schema.RequestOutput) -> None:
                seen[rid].append(out)
                if rid == "bad" and not out.error_code:
                    raise RuntimeError("a handler's bug")
            return handle

        try:
            for rid in seen:
                client.submit(schema.Submit(rid, "m", [1, 2], SamplingParams(max_tokens=4)), handler(rid))
            got = []
            while len(got) < 2:
                identity, raw = await asyncio.wait_for(scheduler.recv_multipart(), 5)
                msg = schema.gateway_to_scheduler.decode(raw)
                if isinstance(msg, schema.Submit):
                    got.append(msg.request_id)
            end = "length" if finished else None
            items = [schema.RequestOutput("bad", [7], finish_reason=end), schema.RequestOutput("good", [8], finish_reason="length")]
            await scheduler.send_multipart([identity, schema.encode(schema.TokenBatch(items))])
            aborted = []
            loop = asyncio.get_running_loop()
            until = loop.time() + 1.0
            while loop.time() < until:  # what the gateway sends back meanwhile
                try:
                    _, raw = await asyncio.wait_for(scheduler.recv_multipart(), until - loop.time())
                except TimeoutError:
                    break
                msg = schema.gateway_to_scheduler.decode(raw)
                if isinstance(msg, schema.Abort):
                    aborted += msg.request_ids
            return seen, aborted, dict(client.handlers)
        finally:
            await client.close()
            scheduler.close(linger=0)

    seen, aborted, open_handlers = asyncio.run(go())
    assert [o.new_token_ids for o in seen["good"]] == [[8]]
    assert len(seen["bad"]) == 2 and seen["bad"][1].error_code == errors.INTERNAL
    assert aborted == ([] if finished else ["bad"])
    assert open_handlers == {}


def test_a_submit_that_cannot_be_encoded_leaves_no_handler_behind():
    """An integer msgpack cannot hold: the submit raises before its handler is registered
    (before, the handler stayed, and the gateway counted the request in flight for good)."""

    async def go():
        client = SchedulerClient(f"tcp://127.0.0.1:{free_port()}", "g")
        try:
            with pytest.raises(OverflowError):
                client.submit(schema.Submit("x", "m", [1], SamplingParams(top_k=2**64)), lambda out: None)
            return dict(client.handlers)
        finally:
            await client.close()

    assert asyncio.run(go()) == {}
