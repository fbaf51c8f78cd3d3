"""Pure scheduler policies: the admission queue and routing by prefix affinity and load."""

from inflight import schema
from inflight.prefix_hash import block_hashes
from inflight.sampling_params import SamplingParams
from scheduler.admission import AdmissionQueue
from scheduler.routing import WorkerState, route_by_prefix


def submit(rid: str, deadline=None) -> schema.Submit:
    return schema.Submit(rid, "m", [1, 2, 3], SamplingParams(), deadline=deadline)


def worker(name: str, capacity: int = 4, tpb: int = 4) -> WorkerState:
    info = schema.WorkerHello(name, "m", 1024, 100, tpb, 100, capacity)
    return WorkerState(name.encode(), info, capacity)


def test_queue_bounded_fifo_and_removal():
    q = AdmissionQueue(2)
    assert q.offer(submit("a")) and q.offer(submit("b"))
    assert not q.offer(submit("c"))
    assert [s.request_id for s in q.waiting()] == ["a", "b"]
    assert q.remove("a").request_id == "a" and q.remove("a") is None
    assert q.offer(submit("c")) and len(q) == 2


def test_queue_expiry():
    q = AdmissionQueue(5)
    q.offer(submit("late", deadline=100.0))
    q.offer(submit("fine", deadline=300.0))
    q.offer(submit("none"))
    assert [s.request_id for s in q.expired(200.0)] == ["late"]
    assert [s.request_id for s in q.waiting()] == ["fine", "none"]


def test_idle_workers_take_turns():
    a, b = worker("a"), worker("b")
    chosen = [route_by_prefix([i, i + 1], [a, b], 16)[0].identity for i in range(4)]
    assert chosen == [b"a", b"b", b"a", b"b"]


def test_prefix_holder_wins_and_is_remembered():
    a, b = worker("a"), worker("b")
    prompt = list(range(40))
    a.cached.update(block_hashes(prompt, 4))
    a.requests.update({"y", "z"})  # busier than b, but within the slack
    w, matched = route_by_prefix(prompt + [99], [a, b], balance_slack=4)
    assert w is a and matched == 10
    # The first request of a new prefix marks it on its worker at once: followers join it.
    other = list(range(100, 140))
    first, _ = route_by_prefix(other, [a, b], 4)
    second, matched = route_by_prefix(other + [7], [a, b], 4)
    assert second is first and matched == 10


def test_load_beats_prefix_past_the_slack():
    a, b = worker("a", capacity=100), worker("b", capacity=100)
    prompt = list(range(40))
    a.cached.update(block_hashes(prompt, 4))
    a.requests.update(str(i) for i in range(20))
    assert route_by_prefix(prompt, [a, b], balance_slack=16)[0] is b


def test_short_shared_prefix_does_not_pull():
    a, b = worker("a"), worker("b")
    prompt = list(range(40))
    a.cached.update(block_hashes(prompt[:8], 4))  # 8 of 40 tokens cached: under half
    a.requests.add("x")
    assert route_by_prefix(prompt, [a, b], 16)[0] is b


def test_full_workers_are_skipped():
    a, b = worker("a", capacity=1), worker("b", capacity=1)
    a.requests.add("x")
    assert route_by_prefix([1, 2], [a, b], 16)[0] is b
    b.requests.add("y")
    assert route_by_prefix([1, 2], [a, b], 16) == (None, 0)


def test_heartbeat_events_update_cached_set():
    a = worker("a")
    hashes = block_hashes(list(range(16)), 4)
    a.cached.update(hashes)
    a.cached.difference_update(hashes[2:])
    assert a.prefix_match(hashes) == 2
