"""The gateway process (grpc.aio on uvloop), stateless: the inflight.v1 API in
`servicer.py` (protobuf in and out at this edge only, `validation.py` translating
requests), chat templates and tokenization (`tokenizer.py`), text deltas and stop strings
(`output.py`), batched events per stream (`stream.py`), the one socket to the scheduler
(`scheduler_client.py`), metrics and spans (`telemetry.py`); `main.py` starts it.
Imports inflight/ and models/ only."""
