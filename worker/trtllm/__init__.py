"""The TensorRT-LLM engine (`--engine trtllm`): the Engine contract over TensorRT-LLM
1.2's LLM API. `engine.py` (the adapter: TensorRT-LLM's asyncio streams behind the
worker's synchronous step()), `translate.py` (our config, sampling parameters, finish
reasons, logprobs and iteration stats to and from TensorRT-LLM's), `model_dir.py`
(a Hugging Face checkpoint or a prebuilt engine directory, and what the worker needs to
know of it). Imports `tensorrt_llm` only when the engine is built (pip install
'inflight[trtllm]')."""
