"""The worker process, one per GPU: `main.py` (its socket and loop), `lifecycle.py` (the
requests it holds, without a socket: submissions and aborts in, one token batch per step
per gateway out, deadlines, heartbeats), `engine_api.py` (the contract every engine
serves, and `EngineConfig` with TensorRT-LLM's knob names), `embedded/` (our PyTorch
engine), `trtllm/` (the same contract over TensorRT-LLM's LLM API), `metrics.py`,
`tracing.py`. Imports inflight/ and models/ only."""
