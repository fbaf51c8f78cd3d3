"""The gateway process (grpc.aio on uvloop), stateless: what every request goes through
whichever protocol brought it in `request_path.py`; the inflight.v1 gRPC API over it in
`servicer.py` (protobuf in and out at this edge only, `validation.py` translating
requests) and the OpenAI HTTP API in `openai_api.py` (uvicorn on the same loop;
`openai_protocol.py` translating its JSON); chat templates and tokenization (`tokenizer.py`), text deltas and stop strings
(`output.py`), batched events per stream (`stream.py`), the one socket to the scheduler
(`scheduler_client.py`), metrics and spans (`telemetry.py`); `main.py` starts it.
Imports inflight/ and models/ only."""
