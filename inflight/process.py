"""What every long-running process does around its main loop."""

from __future__ import annotations

import gc
import signal

from inflight import telemetry

# Young objects allocated before a generation-0 collection (Python's default: 700). The
# serving loops allocate a few objects per token; at the default the gateway, saturated
# with 256 streams, spent about 7% of its CPU in the collector (2,000 collections in 12 s,
# 20 of them full, each walking every object the process ever kept), and 0.5% after
# settle_gc. Cyclic garbage just lives a little longer.
GEN0_THRESHOLD = 10_000


def settle_gc() -> None:
    """Once a process has started (model loaded, sockets bound): move everything it holds
    so far out of the collector's sight (gc.freeze; it is long-lived anyway) and collect
    the young generation less often."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)


def run_until_signalled(loop) -> None:
    """Run `loop.run()` until SIGTERM or SIGINT sets `loop.running` to False, then flush
    any spans still waiting for export."""

    def stop(*_):
        loop.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    settle_gc()
    try:
        loop.run()
    finally:
        telemetry.shutdown_tracing()
