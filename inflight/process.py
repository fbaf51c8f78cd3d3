"""What every long-running process does around its main loop."""

from __future__ import annotations

import signal

from inflight import telemetry


def run_until_signalled(loop) -> None:
    """Run `loop.run()` until SIGTERM or SIGINT sets `loop.running` to False, then flush
    any spans still waiting for export."""

    def stop(*_):
        loop.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        loop.run()
    finally:
        telemetry.shutdown_tracing()
