"""What every long-running process does around its main loop."""

from __future__ import annotations

import atexit
import gc
import os
import signal
import time

from inflight import telemetry

# Young objects allocated before a generation-0 collection (Python's default: 700). The
# serving loops allocate a few objects per token, so at the default a saturated gateway
# collects thousands of times a minute, some of them full collections walking every
# object the process ever kept (BENCHMARKS.md, "a settled collector"). Cyclic garbage
# just lives a little longer.
GEN0_THRESHOLD = 10_000
GC_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_watching = False


def settle_gc() -> None:
    """Once a process has started (model loaded, sockets bound): move everything it holds
    so far out of the collector's sight (gc.freeze; it is long-lived anyway) and collect
    the young generation less often. INFLIGHT_GC_SETTLE=0 leaves Python's defaults.
    Either way the collector's pauses are measured (inflight_gc_pause_seconds)."""
    _watch_gc()
    if os.environ.get("INFLIGHT_GC_SETTLE", "1") == "0":
        return
    gc.collect()
    gc.freeze()
    # At exit, let the collector see them again: objects still frozen when the interpreter
    # finalizes are never freed, and nanobind extensions (Triton's) then print a screen of
    # "leaked instance" warnings as the process stops.
    atexit.register(gc.unfreeze)
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)


def _watch_gc() -> None:
    """A histogram of this process's collector pauses by generation: a pause stops every
    stream the process serves, so it shows up in inter-token latency."""
    global _watching
    if _watching:
        return
    _watching = True
    import prometheus_client as prom

    hist = prom.Histogram("inflight_gc_pause_seconds", "garbage-collector pauses in this process, by generation",
                          ["generation"], buckets=GC_BUCKETS)
    by_generation = [hist.labels(str(g)) for g in range(3)]
    started = [0.0]

    def on_gc(phase: str, info: dict) -> None:  # collections never overlap: the GIL holds through one
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            by_generation[info["generation"]].observe(time.perf_counter() - started[0])

    gc.callbacks.append(on_gc)


def run_until_signalled(loop) -> None:
    """Run `loop.run()` until SIGTERM or SIGINT sets `loop.running` to False, then flush
    any spans still waiting for export. Each signal also counts in `loop.signals`, so that
    a loop that drains before it stops can stop at once on a second one."""

    def stop(*_):
        loop.running = False
        loop.signals = getattr(loop, "signals", 0) + 1

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    settle_gc()
    try:
        loop.run()
    finally:
        telemetry.shutdown_tracing()
