"""The worker's Prometheus metrics, refreshed from engine stats at each heartbeat."""

from __future__ import annotations

import prometheus_client as prom

from worker.engine_api import EngineStats


class WorkerMetrics:
    def __init__(self):
        self.kv_blocks = prom.Gauge("inflight_worker_kv_blocks", "KV cache blocks by state (free counts evictable cached blocks)", ["state"])
        self.requests = prom.Gauge("inflight_worker_requests", "requests the engine holds", ["state"])
        self.submitted = prom.Counter("inflight_worker_requests_submitted", "requests the worker accepted")
        self.finished = prom.Counter("inflight_worker_requests_finished", "requests the engine finished", ["finish_reason"])
        self.prompt_tokens = prom.Counter("inflight_worker_prompt_tokens", "prompt tokens of finished requests")
        self.cached_tokens = prom.Counter("inflight_worker_cached_prompt_tokens", "prompt tokens served from the prefix cache")
        self.generated_tokens = prom.Counter("inflight_worker_generation_tokens", "tokens generated")
        self.hit_rate = prom.Gauge("inflight_worker_prefix_cache_hit_rate", "prompt tokens served from the prefix cache / prompt tokens")
        self.preemptions = prom.Counter("inflight_worker_preemptions", "requests preempted and later recomputed")
        self._preemptions_seen = 0

    def update(self, s: EngineStats) -> None:
        self.kv_blocks.labels("total").set(s.kv_blocks_total)
        self.kv_blocks.labels("free").set(s.kv_blocks_free)
        self.kv_blocks.labels("in_use").set(s.kv_blocks_in_use)
        self.kv_blocks.labels("cached").set(s.kv_blocks_cached)
        self.requests.labels("running").set(s.running)
        self.requests.labels("queued").set(s.queued)
        self.hit_rate.set(s.prefix_cache_hit_rate)
        if s.preemptions > self._preemptions_seen:
            self.preemptions.inc(s.preemptions - self._preemptions_seen)
            self._preemptions_seen = s.preemptions
