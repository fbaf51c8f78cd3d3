"""The scheduler's Prometheus metrics: admission, routing and the fleet it sees."""

from __future__ import annotations

import prometheus_client as prom

QUEUE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class SchedulerMetrics:
    def __init__(self):
        self.queue_time = prom.Histogram("inflight_scheduler_queue_time_seconds", "from arrival at the scheduler to dispatch to a worker", buckets=QUEUE_BUCKETS)
        self.queued = prom.Gauge("inflight_scheduler_requests_queued", "requests waiting for a worker with room")
        self.running = prom.Gauge("inflight_scheduler_requests_running", "requests dispatched to workers and not finished")
        self.workers = prom.Gauge("inflight_scheduler_workers_alive", "workers registered and heartbeating", ["model"])
        self.gateways = prom.Gauge("inflight_scheduler_gateways_alive", "gateways heard from within the gateway timeout")
        self.rejected = prom.Counter("inflight_scheduler_requests_rejected", "requests refused by the scheduler", ["code"])
        self.moved = prom.Counter("inflight_scheduler_requests_moved", "requests continued on another worker after theirs died or stalled", ["why"])
        self.routed = prom.Counter("inflight_scheduler_requests_routed", "requests dispatched, by whether a cached prefix decided", ["by"])
        self.kv_blocks = prom.Gauge("inflight_scheduler_worker_kv_blocks", "KV blocks per worker as last reported", ["worker", "state"])
        self.hit_rate = prom.Gauge("inflight_scheduler_worker_prefix_cache_hit_rate", "prefix-cache hit rate per worker as last reported", ["worker"])
