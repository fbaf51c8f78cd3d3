"""The embedded engine, in nano-vllm's shape: `engine.py` (the Engine contract: submit,
step, abort, stats), `scheduler.py` (which requests run in a step, and how far),
`block_pool.py` (paged KV blocks with a prefix cache), `sequence.py` (one request's
state), `model_runner.py` (tensors in, CUDA graphs, sampling out), `llama.py` (the
decoder), `attention.py` (paged attention, reference and GPU paths), `sampler.py`, and
`kernels/` (our Triton kernels)."""
