"""The bottom layer: what every process shares, importing nothing else of ours.

- the protocol: `schema.py` (every ZeroMQ message), `sockets.py` (addresses, sockets,
  decoding), `sampling_params.py`, `errors.py` (gRPC status names), `validation.py` (the
  one request validator), `prefix_hash.py` (KV block hashes, for workers and routing);
- the public gRPC contract's generated stubs (`v1/`, built by `stubs.py`) and the Python
  client for internal services (`client.py`);
- process plumbing: `flags.py` (flags and INFLIGHT_* variables from config dataclasses),
  `process.py` (signals, the settled collector), `http_endpoints.py` (/metrics, /health,
  /ready), `telemetry.py`, `spans.py` and `span_export.py` (tracing).

gateway/, scheduler/ and worker/ sit above it and never import one another; cli/ is on top.
"""
