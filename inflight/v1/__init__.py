"""The generated inflight.v1 stubs (built from protos/ on first import if needed)."""

from inflight import stubs as _stubs

if _stubs.needs_build():
    _stubs.build()

from inflight.v1 import inflight_pb2 as pb  # noqa: E402
from inflight.v1 import inflight_pb2_grpc as pb_grpc  # noqa: E402

__all__ = ["pb", "pb_grpc"]
