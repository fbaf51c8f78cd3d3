"""The worker's request bookkeeping on the model-free engine double, with a list for the
socket: submissions, outputs to their gateways, errors, aborts, deadlines, failed steps."""

import time

import prometheus_client

from inflight import errors, schema
from inflight.sampling_params import SamplingParams
from inflight.schema import RequestOutput, error_output
from testing.engine_double import CYCLE, InstantEngine
from worker.engine_api import EngineConfig
from worker.lifecycle import WorkerRequests
from worker.metrics import WorkerMetrics

METRICS = WorkerMetrics()  # Prometheus takes a metric name once a process: one for every test here


def metric(name: str, **labels) -> float:
    return prometheus_client.REGISTRY.get_sample_value(name, labels) or 0.0


class BrokenEngine(InstantEngine):
    def step(self):
        raise RuntimeError("a bug in the engine")


def worker(engine=None, tracing: bool = False) -> tuple[WorkerRequests, list]:
    """The worker's bookkeeping and the list of messages it sent, decoded."""
    sent: list = []
    engine = engine or InstantEngine(EngineConfig())
    w = WorkerRequests(engine, lambda raw: sent.append(schema.worker_to_scheduler.decode(raw)), "w1", "m",
                       4, METRICS, tracing)
    return w, sent


def submit(rid: str, gateway: bytes = b"g", max_tokens: int = 2, deadline: float | None = None, prompt=(1, 2, 3)) -> schema.Submit:
    return schema.Submit(rid, "m", list(prompt), SamplingParams(max_tokens=max_tokens), deadline=deadline, gateway=gateway)


def test_submit_runs_on_the_engine_and_outputs_go_to_their_gateway():
    w, sent = worker()
    out: dict = {}
    w.handle(submit("a/1", b"a"), out)
    w.handle(submit("b/1", b"b", max_tokens=1), out)
    assert out == {} and w.owner == {"a/1": b"a", "b/1": b"b"} and set(w.engine.requests) == {"a/1", "b/1"}
    before = metric("inflight_worker_generation_tokens_total")
    w.step(out)
    at = out[b"a"][0].scheduled_at  # the step that first ran them: one for both
    assert at is not None and abs(at - time.time()) < 60
    assert out == {b"a": [RequestOutput("a/1", [CYCLE[0]], prompt_tokens=3, scheduled_at=at)],
                   b"b": [RequestOutput("b/1", [CYCLE[0]], "length", prompt_tokens=3, scheduled_at=at)]}
    assert metric("inflight_worker_generation_tokens_total") == before + 2
    assert w.owner == {"a/1": b"a"}
    w.flush(out)  # one TokenBatch per gateway
    assert sent == [schema.TokenBatch(out[b"a"], b"a"), schema.TokenBatch(out[b"b"], b"b")]
    out = {}
    w.step(out)
    assert out == {b"a": [RequestOutput("a/1", [CYCLE[1]], "length", prompt_tokens=3)]}
    assert w.owner == {} and not w.engine.has_work()


def test_engine_request_error_comes_back_as_an_error_output():
    w, _ = worker()
    out: dict = {}
    w.handle(submit("g/1", prompt=[49152]), out)
    assert out == {b"g": [error_output("g/1", errors.INVALID_ARGUMENT,
                                       "prompt_token_ids: token id 49152 is outside the vocabulary [0, 49152)")]}
    assert w.owner == {} and not w.engine.has_work()


def test_abort_drops_the_request():
    w, _ = worker(tracing=True)
    out: dict = {}
    w.handle(submit("g/1"), out)
    w.handle(submit("g/2"), out)
    w.handle(schema.Abort(["g/1", "g/unknown"]), out)
    assert out == {} and w.owner == {"g/2": b"g"} and set(w.engine.requests) == {"g/2"} and set(w.traces) == {"g/2"}
    w.step(out)
    assert [o.request_id for o in out[b"g"]] == ["g/2"]


def test_deadlines_expire():
    w, _ = worker()
    out: dict = {}
    w.handle(submit("g/1", deadline=100.0), out)
    w.handle(submit("g/2", deadline=200.0), out)
    w.handle(submit("g/3"), out)
    w.expire(99.0, out)
    assert out == {} and len(w.owner) == 3
    w.expire(100.0, out)
    assert out == {b"g": [error_output("g/1", errors.DEADLINE_EXCEEDED, "deadline passed in the worker")]}
    assert set(w.owner) == {"g/2", "g/3"} and set(w.engine.requests) == {"g/2", "g/3"} and w.deadlines == {"g/2": 200.0}


def test_a_finished_request_forgets_its_deadline():
    w, _ = worker()
    out: dict = {}
    w.handle(submit("g/1", max_tokens=1, deadline=100.0), out)
    w.step(out)
    assert w.deadlines == {} and w.owner == {}


def test_a_failed_engine_step_fails_every_held_request_with_internal():
    w, _ = worker(BrokenEngine(EngineConfig()), tracing=True)
    out: dict = {}
    w.handle(submit("a/1", b"a"), out)
    w.handle(submit("b/1", b"b"), out)
    before = metric("inflight_worker_requests_finished_total", finish_reason="error")
    w.step(out)
    assert out == {b"a": [error_output("a/1", errors.INTERNAL, "engine step failed")],
                   b"b": [error_output("b/1", errors.INTERNAL, "engine step failed")]}
    assert w.owner == {} and w.traces == {} and not w.engine.has_work()
    assert metric("inflight_worker_requests_finished_total", finish_reason="error") == before + 2


class FlakyEngine(InstantEngine):
    """Fails the steps whose numbers are in `failing`, counting from 1."""

    def __init__(self, config, failing):
        super().__init__(config)
        self.failing, self.steps = set(failing), 0

    def step(self):
        self.steps += 1
        if self.steps in self.failing:
            raise RuntimeError("a device error")
        return super().step()


def test_only_steps_failing_one_after_another_make_the_engine_broken():
    w, _ = worker(FlakyEngine(EngineConfig(), failing={1, 2, 4, 5, 6}))
    seen = []
    for i in range(6):
        w.handle(submit(f"g/{i}", max_tokens=1), {})
        w.step({})
        seen.append((w.failed_steps, w.engine_broken))
    assert seen == [(1, False), (2, False), (0, False), (1, False), (2, False), (3, True)]


def test_a_worker_whose_engine_keeps_failing_stops_to_be_started_afresh():
    """Its loop ends (the process then exits 1: `inflight serve` or Kubernetes starts a new
    one) instead of failing every request routed to it while looking idle."""
    import threading

    from testing.stack import free_port
    from worker.main import Worker, WorkerConfig

    class StuckEngine(BrokenEngine):
        def has_work(self):
            return True

    config = WorkerConfig(scheduler_address=f"tcp://127.0.0.1:{free_port()}", heartbeat_interval=60)
    w = Worker(config, StuckEngine(EngineConfig()), "w1", METRICS, False)
    done = threading.Thread(target=w.run, daemon=True)
    done.start()
    done.join(30)
    assert not done.is_alive() and w.broken and w.lifecycle.failed_steps == 3


def test_outputs_of_requests_it_does_not_hold_are_dropped():
    w, _ = worker()
    out: dict = {}
    assert w.deliver(RequestOutput("g/9", [1, 2]), out) == 0 and out == {}


def test_tracing_keeps_a_record_until_the_end():
    w, _ = worker(tracing=True)
    out: dict = {}
    w.handle(submit("g/1", max_tokens=2), out)
    w.step(out)
    assert w.traces["g/1"].tokens == 1 and w.traces["g/1"].prompt_tokens == 3
    w.step(out)
    assert w.traces == {}


def test_hello_and_heartbeat_carry_the_engine_and_its_stats():
    w, sent = worker()
    w.handle(submit("g/1"), {})
    w.hello()
    w.heartbeat()
    stats = schema.EngineStats(1, 0, 0, 0, 0, 0, 0, 0, 0.0, 0, 16)
    assert sent == [schema.WorkerHello("w1", "m", max_seq_len=8192, vocab_size=49152, tokens_per_block=16,
                                       kv_blocks_total=0, max_batch_size=4, incarnation=w.incarnation),
                    schema.Heartbeat("w1", stats, [], [])]
    assert len(w.incarnation) == 12 and worker()[0].incarnation != w.incarnation  # each process start its own
    assert metric("inflight_worker_requests", state="running") == 1


def test_asked_to_reannounce_the_worker_says_hello_at_once():
    w, sent = worker()
    w.handle(schema.Reannounce(), {})
    assert [type(m) for m in sent] == [schema.WorkerHello] and sent[0].incarnation == w.incarnation
