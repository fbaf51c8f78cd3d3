"""The scheduler's request lifecycle, with lists for sockets and a clock the test moves:
admission, dispatch, relaying, cancellation, liveness, deadlines, models info."""

import prometheus_client
import pytest

from inflight import errors, schema
from inflight.sampling_params import SamplingParams
from scheduler.lifecycle import RequestLifecycle
from scheduler.config import SchedulerConfig
from scheduler.metrics import SchedulerMetrics

METRICS = SchedulerMetrics()  # Prometheus takes a metric name once a process: one for every test here


def metric(name: str, **labels) -> float:
    return prometheus_client.REGISTRY.get_sample_value(name, labels) or 0.0


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Scheduler:
    """A RequestLifecycle and everything it sent, decoded, as (identity, message)."""

    def __init__(self, **config):
        config.setdefault("worker_queue_factor", 1.0)  # a worker holds exactly its max batch size
        self.to_gateways: list[tuple[bytes, object]] = []
        self.to_workers: list[tuple[bytes, object]] = []
        self.raw_to_gateways: list[bytes] = []
        self.clock = Clock()
        self.core = RequestLifecycle(SchedulerConfig(**config), METRICS, False, self._to_gateway, self._to_worker, self.clock)
        self.core.incarnation = INCARNATION

    def _to_gateway(self, identity: bytes, payload: bytes) -> None:
        self.raw_to_gateways.append(payload)
        self.to_gateways.append((identity, schema.scheduler_to_gateway.decode(payload)))

    def _to_worker(self, identity: bytes, payload: bytes) -> None:
        self.to_workers.append((identity, schema.scheduler_to_worker.decode(payload)))

    def sent(self) -> tuple[list, list]:
        """What went to gateways and to workers since last asked."""
        gateways, workers = self.to_gateways, self.to_workers
        self.to_gateways, self.to_workers, self.raw_to_gateways = [], [], []
        return gateways, workers

    def gateway_joins(self, gateway: bytes = b"g") -> None:
        self.core.on_gateway_message(gateway, schema.GatewayHello(gateway.decode()))

    def worker_joins(self, name: str, model: str = "m", max_batch_size: int = 1, max_seq_len: int = 1024) -> None:
        self.core.on_worker_message(name.encode(), hello(name, model, max_batch_size, max_seq_len), b"")

    def submit(self, rid: str, model: str = "m", gateway: bytes = b"g", deadline: float | None = None) -> None:
        self.core.on_gateway_message(gateway, submit(rid, model, deadline))

    def worker_sends(self, worker: str, batch: schema.TokenBatch) -> bytes:
        raw = schema.encode(batch)
        self.core.on_worker_message(worker.encode(), schema.worker_to_scheduler.decode(raw), raw)
        return raw


def hello(name: str, model: str = "m", max_batch_size: int = 1, max_seq_len: int = 1024) -> schema.WorkerHello:
    return schema.WorkerHello(name, model, max_seq_len, 100, 4, 100, max_batch_size)


def submit(rid: str, model: str = "m", deadline: float | None = None, gateway: bytes = b"", output_token_ids=()) -> schema.Submit:
    return schema.Submit(rid, model, [1, 2, 3, 4, 5], SamplingParams(max_tokens=4), deadline=deadline, gateway=gateway,
                         output_token_ids=list(output_token_ids))


def error_batch(rid: str, code: str, message: str) -> schema.TokenBatch:
    return schema.TokenBatch([schema.error_output(rid, code, message)])


def stats() -> schema.EngineStats:
    return schema.EngineStats(0, 0, 100, 100, 0, 0, 0, 0, 0.0, 0, 4)


INCARNATION = "sched-1"


def models(*infos: tuple) -> schema.ModelsInfo:
    return schema.ModelsInfo([schema.ModelInfo(*i) for i in infos], INCARNATION)


def test_gateway_hello_gets_models_info():
    s = Scheduler()
    s.worker_joins("w1")
    s.gateway_joins(b"g")
    assert s.sent() == ([(b"g", models(("m", 1024, 100, 1)))], [])
    assert s.core.gateways.keys() == {b"g"}


def test_submit_dispatches_and_relays_the_token_batch_to_its_gateway():
    s = Scheduler()
    s.worker_joins("w1")
    s.gateway_joins(b"g")
    s.sent()
    s.submit("g/1", gateway=b"g")
    assert s.sent() == ([], [(b"w1", submit("g/1", gateway=b"g"))])
    assert s.core.workers[b"w1"].requests == {"g/1"}

    first = s.worker_sends("w1", schema.TokenBatch([schema.RequestOutput("g/1", [7, 8])], b"g"))
    last = s.worker_sends("w1", schema.TokenBatch([schema.RequestOutput("g/1", [9], finish_reason="length")], b"g"))
    assert s.raw_to_gateways == [first, last]  # relayed as the bytes that arrived
    assert [identity for identity, _ in s.sent()[0]] == [b"g", b"g"]
    assert s.core.requests == {} and s.core.workers[b"w1"].requests == set()


def test_full_admission_queue_answers_resource_exhausted():
    s = Scheduler(max_queued=1)
    s.worker_joins("w1", max_batch_size=1)
    s.sent()
    before = metric("inflight_scheduler_requests_rejected_total", code=errors.RESOURCE_EXHAUSTED)
    s.submit("g/1")  # runs
    s.submit("g/2")  # waits
    s.submit("g/3")  # no room anywhere
    gateways, workers = s.sent()
    assert workers == [(b"w1", submit("g/1", gateway=b"g"))]
    assert gateways == [(b"g", error_batch("g/3", errors.RESOURCE_EXHAUSTED,
                                           "the admission queue is full (1 waiting); retry later"))]
    assert [q.request_id for q in s.core.queue.waiting()] == ["g/2"]
    assert set(s.core.requests) == {"g/1", "g/2"}
    assert metric("inflight_scheduler_requests_rejected_total", code=errors.RESOURCE_EXHAUSTED) == before + 1


def test_model_nobody_serves_is_unavailable():
    s = Scheduler()
    s.worker_joins("w1", model="m")
    s.sent()
    s.submit("g/1", model="other")
    assert s.sent() == ([(b"g", error_batch("g/1", errors.UNAVAILABLE, "no worker serves model 'other' right now"))], [])
    assert s.core.requests == {} and len(s.core.queue) == 0


def test_duplicate_request_id_is_already_exists():
    s = Scheduler()
    s.worker_joins("w1", max_batch_size=2)
    s.submit("g/1")
    s.sent()
    s.submit("g/1")
    assert s.sent() == ([(b"g", error_batch("g/1", errors.ALREADY_EXISTS, "request id g/1 is already in flight"))], [])
    # The first g/1 still runs and still holds its place on the worker until it ends.
    assert set(s.core.requests) == {"g/1"} and s.core.workers[b"w1"].requests == {"g/1"}
    s.worker_sends("w1", schema.TokenBatch([schema.RequestOutput("g/1", [3], finish_reason="length")], b"g"))
    assert s.core.requests == {} and s.core.workers[b"w1"].requests == set()


def test_abort_of_a_queued_request_tells_no_worker():
    s = Scheduler()
    s.worker_joins("w1", max_batch_size=1)
    s.submit("g/1")
    s.submit("g/2")
    s.sent()
    s.core.on_gateway_message(b"g", schema.Abort(["g/2", "g/unknown"]))
    assert s.sent() == ([], [])
    assert len(s.core.queue) == 0 and set(s.core.requests) == {"g/1"}


def test_abort_of_a_dispatched_request_reaches_its_worker_and_frees_its_place():
    s = Scheduler()
    s.worker_joins("w1", max_batch_size=1)
    s.submit("g/1")
    s.submit("g/2")  # queued behind g/1
    s.sent()
    s.core.on_gateway_message(b"g", schema.Abort(["g/1"]))
    assert s.sent() == ([], [(b"w1", schema.Abort(["g/1"])), (b"w1", submit("g/2", gateway=b"g"))])
    assert s.core.workers[b"w1"].requests == {"g/2"} and len(s.core.queue) == 0


def test_a_finished_request_drains_the_queue():
    s = Scheduler()
    s.worker_joins("w1", max_batch_size=1)
    s.submit("g/1")
    s.submit("g/2")
    s.sent()
    s.worker_sends("w1", schema.TokenBatch([schema.RequestOutput("g/1", [7])], b"g"))
    assert s.sent()[1] == []  # not finished: g/2 still waits
    s.worker_sends("w1", schema.TokenBatch([schema.RequestOutput("g/1", [], error_code=errors.INTERNAL)], b"g"))
    assert s.sent()[1] == [(b"w1", submit("g/2", gateway=b"g"))]
    assert s.core.workers[b"w1"].requests == {"g/2"} and len(s.core.queue) == 0


def test_a_joining_worker_drains_the_queue_and_is_announced():
    s = Scheduler()
    s.gateway_joins(b"g")
    s.worker_joins("w1", max_batch_size=1, max_seq_len=2048)
    s.submit("g/1")
    s.submit("g/2")
    s.sent()
    s.worker_joins("w2", max_batch_size=1, max_seq_len=1024)
    gateways, workers = s.sent()
    assert gateways == [(b"g", models(("m", 1024, 100, 2)))]  # the smaller max_seq_len holds
    assert workers == [(b"w2", submit("g/2", gateway=b"g"))]


def test_models_info_counts_workers_per_model_on_join_and_leave():
    s = Scheduler(worker_timeout=10.0)
    s.gateway_joins(b"g1")
    s.gateway_joins(b"g2")
    s.sent()
    s.worker_joins("w1", model="a")
    s.clock.now += 5
    s.worker_joins("w2", model="b")
    gateways, _ = s.sent()
    # Gateways are a set: the order between them is arbitrary, each one's own order is not.
    assert sorted(gateways, key=lambda sent: sent[0]) == [
        (b"g1", models(("a", 1024, 100, 1))), (b"g1", models(("a", 1024, 100, 1), ("b", 1024, 100, 1))),
        (b"g2", models(("a", 1024, 100, 1))), (b"g2", models(("a", 1024, 100, 1), ("b", 1024, 100, 1)))]
    s.core.sweep(s.clock.now + 6, 0.0)  # w1 silent for 11 s, w2 for 6 s
    gateways, _ = s.sent()
    assert sorted(gateways, key=lambda sent: sent[0]) == [(b"g1", models(("b", 1024, 100, 1))), (b"g2", models(("b", 1024, 100, 1)))]
    assert metric("inflight_scheduler_workers_alive", model="a") == 0
    assert metric("inflight_scheduler_workers_alive", model="b") == 1


def test_several_gateways_each_get_their_own_and_a_silent_one_is_forgotten_with_its_requests():
    """Two gateways (two processes behind one port): each gets the tokens and answers of its
    own requests. One goes silent past the gateway timeout: its requests are aborted on
    the worker (UNAVAILABLE toward it, should it come back), the other's go on; a hello
    brings it back."""
    s = Scheduler(gateway_timeout=10.0, worker_timeout=60.0)
    s.gateway_joins(b"g1")
    s.gateway_joins(b"g2")
    s.worker_joins("w1", max_batch_size=4)
    s.submit("g1/1", gateway=b"g1")
    s.submit("g2/1", gateway=b"g2")
    s.submit("g1/2", gateway=b"g1")
    s.sent()
    s.worker_sends("w1", schema.TokenBatch([schema.RequestOutput("g2/1", [7])], b"g2"))
    s.worker_sends("w1", schema.TokenBatch([schema.RequestOutput("g1/1", [8])], b"g1"))
    assert [(g, [i.request_id for i in m.items]) for g, m in s.sent()[0]] == [(b"g2", ["g2/1"]), (b"g1", ["g1/1"])]
    s.clock.now += 6
    s.gateway_joins(b"g2")  # its hello each second; g1 has stopped
    s.sent()
    s.core.sweep(s.clock.now + 4, 0.0)  # g1 silent for 10 s: not past the timeout yet
    assert s.sent() == ([], []) and s.core.gateways.keys() == {b"g1", b"g2"}
    s.core.sweep(s.clock.now + 4.5, 0.0)
    gateways, workers = s.sent()
    lost = "the scheduler lost contact with this gateway"
    assert gateways == [(b"g1", error_batch("g1/1", errors.UNAVAILABLE, lost)), (b"g1", error_batch("g1/2", errors.UNAVAILABLE, lost))]
    assert workers == [(b"w1", schema.Abort(["g1/1", "g1/2"]))]
    assert s.core.requests.keys() == {"g2/1"} and s.core.workers[b"w1"].requests == {"g2/1"}
    assert s.core.gateways.keys() == {b"g2"} and metric("inflight_scheduler_gateways_alive") == 1
    s.worker_sends("w1", schema.TokenBatch([schema.RequestOutput("g2/1", [9], finish_reason="length")], b"g2"))
    assert s.sent()[0][0][0] == b"g2"
    s.gateway_joins(b"g1")
    assert s.core.gateways.keys() == {b"g1", b"g2"}


def test_rehello_of_a_known_worker_only_refreshes_it():
    s = Scheduler()
    s.gateway_joins(b"g")
    s.worker_joins("w1")
    s.sent()
    s.clock.now += 3
    s.worker_joins("w1")
    assert s.sent() == ([], [])
    assert s.core.workers[b"w1"].last_seen == s.clock.now


def test_heartbeat_updates_cached_prefixes_and_kv_metrics():
    s = Scheduler()
    s.worker_joins("w1")
    stats = schema.EngineStats(running=1, queued=0, kv_blocks_total=100, kv_blocks_free=60, kv_blocks_in_use=30,
                               kv_blocks_cached=10, blocks_reused=0, blocks_evicted=0, prefix_cache_hit_rate=0.25,
                               preemptions=0, tokens_per_block=4)
    s.clock.now += 2
    s.core.on_worker_message(b"w1", schema.Heartbeat("w1", stats, stored_hashes=[1, 2, 3]), b"")
    w = s.core.workers[b"w1"]
    assert w.cached == {1, 2, 3} and w.last_seen == s.clock.now
    s.core.on_worker_message(b"w1", schema.Heartbeat("w1", stats, stored_hashes=[4], removed_hashes=[2, 3]), b"")
    assert w.cached == {1, 4}
    assert [metric("inflight_scheduler_worker_kv_blocks", worker="w1", state=state) for state in ("free", "in_use", "cached")] == [60, 30, 10]
    assert metric("inflight_scheduler_worker_prefix_cache_hit_rate", worker="w1") == 0.25
    assert s.sent() == ([], [])


def test_an_unknown_worker_is_asked_to_say_hello_and_nothing_it_sends_is_relayed():
    s = Scheduler()
    stats = schema.EngineStats(0, 0, 0, 0, 0, 0, 0, 0, 0.0, 0, 4)
    s.core.on_worker_message(b"ghost", schema.Heartbeat("ghost", stats), b"")
    s.worker_sends("ghost", schema.TokenBatch([schema.RequestOutput("g/1", [1])], b"g"))
    assert s.core.workers == {} and s.sent() == ([], [(b"ghost", schema.Reannounce()), (b"ghost", schema.Reannounce())])
    fresh = [RequestLifecycle(SchedulerConfig(), METRICS, False, print, print).incarnation for _ in range(2)]
    assert fresh[0] != fresh[1]  # each scheduler start tells gateways a new one


def test_silent_only_worker_is_dropped_and_its_requests_fail_unavailable():
    s = Scheduler(worker_timeout=10.0)
    s.gateway_joins(b"g")
    s.worker_joins("w1", max_batch_size=2)
    s.submit("g/1")
    s.submit("g/2")
    s.sent()
    joined = s.clock.now
    s.core.sweep(joined + 10.0, 0.0)  # not past the timeout yet
    assert s.sent() == ([], []) and b"w1" in s.core.workers
    s.core.sweep(joined + 10.5, 0.0)
    gateways, workers = s.sent()
    lost = "worker w1 stopped responding and no other serves model 'm'"
    assert gateways[0] == (b"g", models())
    assert gateways[1:] == [(b"g", error_batch("g/1", errors.UNAVAILABLE, lost)), (b"g", error_batch("g/2", errors.UNAVAILABLE, lost))]
    assert workers == [] and s.core.workers == {} and s.core.requests == {}


def test_a_silent_workers_requests_go_on_elsewhere_from_the_tokens_delivered():
    s = Scheduler(worker_timeout=10.0)
    s.worker_joins("w1", max_batch_size=2)
    s.submit("g/1")  # both idle: w1 takes the first
    s.submit("g/2")  # and w2 would take the next, but it joins later: w1 again
    s.worker_joins("w2", max_batch_size=2)
    s.worker_sends("w1", schema.TokenBatch([schema.RequestOutput("g/1", [7, 8]), schema.RequestOutput("g/2", [9])], b"g"))
    s.sent()
    before = metric("inflight_scheduler_requests_moved_total", why="silent")
    s.clock.now += 10.5
    s.core.on_worker_message(b"w2", schema.Heartbeat("w2", stats()), b"")  # w2 stays alive
    s.core.sweep(s.clock.now, 0.0)
    gateways, workers = s.sent()
    assert gateways == []  # no error: the streams go on
    assert workers == [(b"w2", submit("g/1", gateway=b"g", output_token_ids=[7, 8])),
                       (b"w2", submit("g/2", gateway=b"g", output_token_ids=[9]))]
    assert metric("inflight_scheduler_requests_moved_total", why="silent") == before + 2
    assert s.core.workers[b"w2"].requests == {"g/1", "g/2"} and b"w1" not in s.core.workers

    # w1 comes back (it was stopped, not dead): it joins anew, and what it still sends for
    # the moved requests reaches nobody but earns it an Abort; w2's tokens go through.
    s.worker_joins("w1", max_batch_size=2)
    s.sent()
    s.worker_sends("w1", schema.TokenBatch([schema.RequestOutput("g/1", [10])], b"g"))
    assert s.sent() == ([], [(b"w1", schema.Abort(["g/1"]))])
    raw = s.worker_sends("w2", schema.TokenBatch([schema.RequestOutput("g/1", [10], finish_reason="length")], b"g"))
    assert s.raw_to_gateways == [raw]
    assert s.core.requests["g/2"].delivered == [9] and "g/1" not in s.core.requests


def test_a_worker_that_makes_no_progress_is_stalled_and_its_requests_move():
    s = Scheduler(worker_timeout=10.0, progress_timeout=30.0)
    s.worker_joins("w1", max_batch_size=1)
    s.worker_joins("w2", max_batch_size=1)
    s.submit("g/1")  # to w1
    s.sent()
    start = s.clock.now
    for t in (9.0, 18.0, 27.0, 30.5):  # w1 heartbeats, so it is alive, but sends no tokens
        s.clock.now = start + t
        s.core.on_worker_message(b"w1", schema.Heartbeat("w1", stats()), b"")
        s.core.on_worker_message(b"w2", schema.Heartbeat("w2", stats()), b"")
        s.core.sweep(s.clock.now, 0.0)
    gateways, workers = s.sent()
    assert workers == [(b"w1", schema.Abort(["g/1"])), (b"w2", submit("g/1", gateway=b"g"))]
    assert b"w1" not in s.core.workers and s.core.workers[b"w2"].requests == {"g/1"}


def test_moved_requests_wait_at_the_head_of_the_queue_when_no_worker_has_room():
    s = Scheduler(worker_timeout=10.0)
    s.worker_joins("w1", max_batch_size=1)
    s.worker_joins("w2", max_batch_size=1)
    s.submit("g/1")  # w1
    s.submit("g/2")  # w2
    s.submit("g/3")  # queued
    s.sent()
    s.core.on_worker_message(b"w2", schema.Heartbeat("w2", stats()), b"")
    s.clock.now += 10.5
    s.core.on_worker_message(b"w2", schema.Heartbeat("w2", stats()), b"")
    s.core.sweep(s.clock.now, 0.0)  # w1 is lost; w2 is full
    assert [q.request_id for q in s.core.queue.waiting()] == ["g/1", "g/3"]
    s.sent()
    s.worker_sends("w2", schema.TokenBatch([schema.RequestOutput("g/2", [1], finish_reason="length")], b"g"))
    assert s.sent()[1] == [(b"w2", submit("g/1", gateway=b"g"))]


def test_a_heartbeat_keeps_a_worker_alive():
    s = Scheduler(worker_timeout=10.0)
    s.worker_joins("w1")
    joined = s.clock.now
    s.clock.now += 8
    s.worker_sends("w1", schema.TokenBatch([], b"g"))  # any message counts
    s.core.sweep(joined + 15, 0.0)
    assert b"w1" in s.core.workers


def test_expired_queued_request_fails_deadline_exceeded():
    s = Scheduler()
    s.worker_joins("w1", max_batch_size=1)
    s.submit("g/1")
    s.submit("g/2", deadline=500.0)
    s.submit("g/3")
    s.sent()
    s.core.sweep(s.clock.now, 499.0)
    assert s.sent() == ([], [])
    assert metric("inflight_scheduler_requests_queued") == 2 and metric("inflight_scheduler_requests_running") == 1
    s.core.sweep(s.clock.now, 500.0)
    assert s.sent() == ([(b"g", error_batch("g/2", errors.DEADLINE_EXCEEDED, "deadline passed while queued"))], [])
    assert [q.request_id for q in s.core.queue.waiting()] == ["g/3"] and "g/2" not in s.core.requests
    assert metric("inflight_scheduler_requests_queued") == 1


def test_queue_time_is_measured_on_the_given_clock():
    s = Scheduler()
    s.worker_joins("w1", max_batch_size=1)
    s.submit("g/1")
    s.submit("g/2")
    before = metric("inflight_scheduler_queue_time_seconds_sum")
    s.clock.now += 2.5
    s.worker_sends("w1", schema.TokenBatch([schema.RequestOutput("g/1", [1], finish_reason="stop")], b"g"))
    assert metric("inflight_scheduler_queue_time_seconds_sum") == pytest.approx(before + 2.5)


def test_a_worker_restarted_under_its_name_gets_back_what_its_old_process_held():
    s = Scheduler(worker_timeout=10.0)
    s.worker_joins("w1", max_batch_size=2)
    s.submit("g/1")
    s.worker_sends("w1", schema.TokenBatch([schema.RequestOutput("g/1", [5, 6])], b"g"))
    s.sent()
    again = hello("w1", max_batch_size=2)
    again.incarnation = "second"
    s.core.on_worker_message(b"w1", again, b"")  # the same id, a new process: it holds nothing
    gateways, workers = s.sent()
    assert workers == [(b"w1", submit("g/1", gateway=b"g", output_token_ids=[5, 6]))]
    assert not [m for _, m in gateways if isinstance(m, schema.TokenBatch)]  # no error reached the client
    assert s.core.workers[b"w1"].info.incarnation == "second" and s.core.workers[b"w1"].requests == {"g/1"}
    s.core.on_worker_message(b"w1", again, b"")  # its periodic hello changes nothing
    assert s.sent() == ([], [])


def test_a_leaving_worker_gets_nothing_new_finishes_what_it_holds_and_the_rest_moves_when_it_goes():
    s = Scheduler()
    s.gateway_joins(b"g")
    s.worker_joins("w1", max_batch_size=2)
    s.worker_joins("w2", max_batch_size=2)
    s.submit("g/1")
    s.submit("g/2")  # both on w1: the same prompt, cached there
    s.sent()
    s.core.on_worker_message(b"w1", schema.Leaving("w1"), b"")
    assert s.sent()[0] == [(b"g", models(("m", 1024, 100, 1)))]  # w1 no longer counts for new requests
    s.submit("g/3")
    s.submit("g/4")
    s.submit("g/5")
    assert [w for w, _ in s.sent()[1]] == [b"w2", b"w2"]  # g/5 waits: w2 is full, w1 leaving
    assert [q.request_id for q in s.core.queue.waiting()] == ["g/5"]
    s.worker_sends("w1", schema.TokenBatch([schema.RequestOutput("g/1", [4], finish_reason="length")], b"g"))  # it finishes
    s.worker_sends("w1", schema.TokenBatch([schema.RequestOutput("g/2", [4])], b"g"))
    assert s.core.requests.keys() == {"g/2", "g/3", "g/4", "g/5"}  # g/1's end drained the queue, but not onto w1
    assert [q.request_id for q in s.core.queue.waiting()] == ["g/5"]
    s.core.on_worker_message(b"w1", schema.Leaving("w1", gone=True), b"")
    gateways, workers = s.sent()
    assert b"w1" not in s.core.workers
    assert not [i for _, m in gateways if isinstance(m, schema.TokenBatch) for i in m.items if i.error_code]  # nobody saw an error
    assert s.core.requests["g/2"].worker is None and [q.request_id for q in s.core.queue.waiting()] == ["g/2", "g/5"]
    assert s.core.requests["g/2"].submit.output_token_ids == [4]
    assert metric("inflight_scheduler_requests_moved_total", why="drained") >= 1


def test_with_only_a_leaving_worker_new_requests_are_unavailable():
    s = Scheduler()
    s.worker_joins("w1")
    s.core.on_worker_message(b"w1", schema.Leaving("w1"), b"")
    s.sent()
    s.submit("g/1")
    assert s.sent()[0] == [(b"g", error_batch("g/1", errors.UNAVAILABLE, "no worker serves model 'm' right now"))]


@pytest.mark.parametrize("how", ["silent", "leaving"])
def test_queued_requests_end_unavailable_once_no_worker_serves_their_model(how):
    """Requests queued behind a full worker (no deadline of their own) end when the model's
    last worker goes silent or starts leaving; those of another model wait on."""
    s = Scheduler(worker_timeout=10.0)
    s.gateway_joins(b"g")
    s.worker_joins("w1", max_batch_size=1)
    s.worker_joins("o1", model="other", max_batch_size=1)
    s.submit("g/1")
    s.submit("g/2")  # queued: w1 is full
    s.submit("g/3", model="other")
    s.submit("g/4", model="other")  # queued: o1 is full
    assert [w for w, _ in s.sent()[1]] == [b"w1", b"o1"]  # g/3 did not wait behind g/2, queued for another model
    if how == "silent":
        s.clock.now += 10.5
        s.gateway_joins(b"g")
        s.core.on_worker_message(b"o1", hello("o1", "other"), b"")  # o1 stays alive
        s.core.sweep(s.clock.now, 0.0)
    else:
        s.core.on_worker_message(b"w1", schema.Leaving("w1"), b"")
    errors_sent = {i.request_id: i.error_message for _, m in s.sent()[0] if isinstance(m, schema.TokenBatch) for i in m.items}
    assert errors_sent.get("g/2") == "no worker serves model 'm' any more"
    assert "g/3" not in errors_sent and "g/4" not in errors_sent
    assert [q.request_id for q in s.core.queue.waiting()] == ["g/4"]
    assert ("g/1" in errors_sent) == (how == "silent")  # a leaving worker finishes what it holds
