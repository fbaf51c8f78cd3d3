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
        self.steps = prom.Counter("inflight_worker_engine_steps", "forward passes by how they ran: a replayed CUDA graph "
                                  "or eager (a step larger than every graph, or no graphs)", ["mode"])
        self.late_compiles = prom.Counter("inflight_worker_kernel_compiles_late", "GPU kernels compiled after the engine "
                                          "reported ready: each held up a step (0 is expected)")
        self._seen = {"preemptions": 0, "graph": 0, "eager": 0, "late": 0}  # engine totals already counted

    def update(self, s: EngineStats) -> None:
        self.kv_blocks.labels("total").set(s.kv_blocks_total)
        self.kv_blocks.labels("free").set(s.kv_blocks_free)
        self.kv_blocks.labels("in_use").set(s.kv_blocks_in_use)
        self.kv_blocks.labels("cached").set(s.kv_blocks_cached)
        self.requests.labels("running").set(s.running)
        self.requests.labels("queued").set(s.queued)
        self.hit_rate.set(s.prefix_cache_hit_rate)
        self._count(self.preemptions, "preemptions", s.preemptions)
        self._count(self.steps.labels("graph"), "graph", s.steps_graph)
        self._count(self.steps.labels("eager"), "eager", s.steps_eager)
        self._count(self.late_compiles, "late", s.kernel_compiles_late)

    def _count(self, counter, key: str, total: int) -> None:
        """Move a counter up to an engine's running total."""
        if total > self._seen[key]:
            counter.inc(total - self._seen[key])
            self._seen[key] = total
