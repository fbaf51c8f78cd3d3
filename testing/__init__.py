"""What the tests and the benchmarks share, and the product never imports: a launcher for
the real stack on free loopback ports (stack.py), the model-free engine double
(engine_double.py) that isolates the serving path in benchmarks, and a double of
TensorRT-LLM's LLM API (fake_tensorrt_llm.py) for testing worker/trtllm/ without it."""
