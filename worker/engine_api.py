"""The contract every engine serves: the embedded PyTorch engine and TensorRT-LLM's.

The worker loop drives an engine only through `Engine`: submit, abort, step, stats. Two
implement it: worker/embedded/ (ours) and worker/trtllm/ (TensorRT-LLM's LLM API). An
engine emits the wire types themselves (`RequestOutput`, `EngineStats` in
inflight/schema.py), which the worker sends on as they are, and checks what it is given
with the shared validator (inflight/validation.py).
Knob names follow TensorRT-LLM (`KvCacheConfig`, `SchedulerConfig`, `max_num_tokens`...)
so that one `EngineConfig` maps onto both engines.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Protocol, Sequence

from inflight.sampling_params import SamplingParams
from inflight.schema import EngineStats, RequestOutput

CapacityPolicy = Literal["GUARANTEED_NO_EVICT", "MAX_UTILIZATION"]


class EngineConfigError(ValueError):
    """A setting the engine cannot run with here; the message names it."""


@dataclasses.dataclass
class KvCacheConfig:
    free_gpu_memory_fraction: float = dataclasses.field(default=0.9, metadata={"help": "share of the GPU memory left free after loading the weights that the KV cache takes"})
    tokens_per_block: int = dataclasses.field(default=32, metadata={"help": "tokens per KV cache block"})
    enable_block_reuse: bool = dataclasses.field(default=True, metadata={"help": "keep finished prompts' blocks for reuse by later requests with the same prefix"})
    max_tokens: int | None = dataclasses.field(default=None, metadata={"help": "cap on the tokens the KV cache holds"})
    dtype: Literal["auto", "fp8"] = dataclasses.field(default="auto", metadata={"help": "what the KV cache stores: auto (the model's dtype) or fp8 (float8 E4M3: half the bytes of bf16, so twice the tokens; the embedded engine scales each layer's keys and values by factors calibrated at load on built-in prompts, clamping what lies beyond twice the largest magnitude seen there). Embedded engine: a GPU of compute capability 8.9 or newer, or the CPU; TensorRT-LLM: its KvCacheConfig.dtype"})
    cpu_bytes: int = dataclasses.field(default=512 * 2**20, metadata={"help": "KV cache size in bytes when running on the CPU"})


@dataclasses.dataclass
class SchedulerConfig:
    capacity_scheduler_policy: CapacityPolicy = dataclasses.field(default="GUARANTEED_NO_EVICT", metadata={"help": "admit only what can finish (GUARANTEED_NO_EVICT) or admit greedily and preempt (MAX_UTILIZATION)"})


# The most rows of x the CUDA-core skinny matmul takes (kernels/gemv.py's gemv_fma), the
# bound of KernelConfig.fma_max_rows.
FMA_MAX_ROWS = 4


@dataclasses.dataclass
class KernelConfig:
    """The embedded engine's kernel and path choices; BENCHMARKS.md holds what each was
    measured to buy."""

    attention: Literal["auto", "triton", "reference"] = dataclasses.field(default="auto", metadata={"help": "auto (Triton kernels on CUDA, the PyTorch reference elsewhere), triton or reference"})
    pdl: bool = dataclasses.field(default=True, metadata={"help": "programmatic dependent launch for small-batch decode kernels on Hopper"})
    l2_prefetch_bytes: int = dataclasses.field(default=4 * 2**20, metadata={"help": "bytes of each weight the skinny matmul pulls toward L2 before the previous kernel ends (with pdl); 0 = none"})
    varlen_prefill: bool = dataclasses.field(default=True, metadata={"help": "one varlen flash-attention call for a step's prefills, else SDPA per sequence"})
    mixed_decode_kernel: bool = dataclasses.field(default=True, metadata={"help": "in the CUDA graphs of steps with prompt tokens, the decodes' attention runs the paged-decode kernel (narrower programs) and the paged varlen kernel only the prompts'; off: the varlen kernel for every row"})
    decode_order: Literal["arrival", "longest-first"] = dataclasses.field(default="arrival", metadata={"help": "a step's decode rows and the paged-decode kernel's programs: arrival (the scheduler's order; the GPU starts the programs by KV head, then row) or longest-first (rows sorted by context, longest first, and each row's KV-head programs started together, so that the longest work starts first and the kernel does not end on a few long programs while the other SMs idle); arrival until longest-first is timed on a GPU"})
    decode_kernel: Literal["paged", "flat"] = dataclasses.field(default="paged", metadata={"help": "the decodes' attention on the Triton path: paged (one program a sequence and KV head, kernels/paged_decode.py) or flat (each KV head's context tiles over all decodes cut into equal shares, one a program, the loop running on from one sequence into the next: no program ends long after the others and short contexts' first loads overlap; kernels/flat_decode.py); paged until flat is timed on a GPU"})
    decode_tile: int = dataclasses.field(default=0, metadata={"help": "context tokens the paged-decode kernel reads a loop iteration (a power of two, 16-256); 0 = auto (128 over an FP8 cache, and over a 16-bit one with heads of 128 or more at batches that fill the GPU; else 64; kernels/paged_decode.py wide_tile)"})
    fused_silu: bool = dataclasses.field(default=True, metadata={"help": "steps of at most 16 tokens: the gate_up skinny matmul applies SiLU(gate) * up as it writes (one launch, not two) where that measured faster (gate_up weights up to 64M elements); off: a separate SiLU-and-multiply kernel"})
    fused_quant: bool = dataclasses.field(default=True, metadata={"help": "with --quantization fp8 or int8-smoothquant: the RMSNorm kernels before the qkv and gate_up projections, and in steps of more than 16 tokens the SiLU-and-multiply kernel before down_proj, quantize their output per token for them and write only that (one launch and one pass over memory, not two); off: a separate quantization kernel before each"})
    one_row_matmul: Literal["fma", "dot"] = dataclasses.field(default="fma", metadata={"help": "steps of one token (batch-1 decode): fma (the CUDA cores, weights loaded straight into registers; 8-bit weights then read 16-bit x, with no activation quantization) or dot (the tensor-core skinny matmul, x padded to 16 rows); the vocabulary's lm_head keeps the dot"})
    fma_max_rows: int = dataclasses.field(default=1, metadata={"help": f"with --one-row-matmul fma: steps of up to this many tokens (1-{FMA_MAX_ROWS}) run the CUDA-core kernel, above one token only on 16-bit projections that are not a fused gate_up; 1 because on an H200 two-token steps were no faster with 2 (0.99x the time on the 1B shape, 1.04x on the 8B) and the kernel was slower still at 3-4 tokens"})
    fp8_skinny_matmul: Literal["auto", "fp8", "upcast"] = dataclasses.field(default="auto", metadata={"help": "with --quantization fp8, steps of 2-16 tokens (and of one under --one-row-matmul dot): fp8 (activations quantized per token by one kernel, then an FP8 dot), upcast (the FP8 weight converted to 16-bit in the kernel, activations not quantized) or auto (upcast for weights under 8M elements, where it measured faster)"})


@dataclasses.dataclass
class EngineConfig:
    model: str | None = dataclasses.field(default=None, metadata={"help": "Hugging Face layout model directory; unset means the built-in SmolLM2-135M-Instruct"})
    device: str = dataclasses.field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    dtype: str = dataclasses.field(default="auto", metadata={"help": "auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16 or float16"})
    quantization: Literal["none", "fp8", "int8-weight-only", "int8-smoothquant"] = dataclasses.field(default="none", metadata={"help": "8-bit weights of the layers' projections, quantized at load with one scale per output channel: fp8 (E4M3 weights, activations quantized per token, FP8 tensor cores; compute capability 8.9+), int8-weight-only (W8A16) or int8-smoothquant (W8A8 after SmoothQuant smoothing from built-in calibration prompts); none keeps the checkpoint's own (16-bit, or the scheme of a checkpoint already quantized by compressed-tensors or Model Optimizer)"})
    fp8_weight_scales: Literal["search", "amax"] = dataclasses.field(default="search", metadata={"help": "with --quantization fp8 from a 16-bit checkpoint, each output channel's weight scale: search (r x amax/448 with r in [1, 2) chosen to minimise the channel's rounding error, each input column weighted by its mean squared input over built-in calibration prompts; the whole 16-bit model is loaded first, as for int8-smoothquant) or amax (amax/448, quantized as each tensor arrives)"})
    kv_cache: KvCacheConfig = dataclasses.field(default_factory=KvCacheConfig)
    scheduler: SchedulerConfig = dataclasses.field(default_factory=SchedulerConfig)
    enable_chunked_prefill: bool = dataclasses.field(default=True, metadata={"help": "split long prompts across steps so decodes keep flowing"})
    max_batch_size: int = dataclasses.field(default=256, metadata={"help": "requests running at once"})
    max_num_tokens: int | None = dataclasses.field(default=None, metadata={"help": "tokens one engine step computes at most, prefill and decode together; unset means 2048 on CUDA (each step then replays a CUDA graph, and the longest wait between a stream's tokens is one such step; more favours prompt throughput over that wait) and 512 on the CPU, where a step of 2048 prompt tokens takes seconds and holds up every stream and the worker's heartbeats"})
    step_time_target_ms: float = dataclasses.field(default=15.0, metadata={"help": "while streams are decoding, a step takes only as many prompt tokens as keep it within this many milliseconds (the wait between a stream's tokens), as predicted from the captured CUDA graphs' timings at start-up and, with step_time_learning, the steps measured since; prompts still get at least 128 tokens a step. 0: every step takes up to max_num_tokens. Embedded engine with CUDA graphs only"})
    step_time_learning: bool = dataclasses.field(default=True, metadata={"help": "refit the step-time prediction that step_time_target_ms sizes steps by to every graph step's measured device time while serving (CUDA events; recent steps weigh more); off: the start-up timings alone"})
    step_time_margin: bool = dataclasses.field(default=True, metadata={"help": "with step_time_learning: size steps to step_time_target_ms less how far the recent steps sized near it ran past their prediction (its 90th percentile, at most a tenth of the target), so that the wait between tokens stays within the target rather than near it on average; off: to the target itself"})
    kernels: KernelConfig = dataclasses.field(default_factory=KernelConfig, metadata={"flatten": True})
    overlap_scheduler: Literal["auto", "on", "off"] = dataclasses.field(default="auto", metadata={"help": "prepare and launch step N+1 while the device runs step N: auto turns it on for CUDA (on the CPU nothing runs asynchronously, so it would only delay each token by a step)"})
    cuda_graphs: bool = dataclasses.field(default=True, metadata={"help": "replay every step of up to 2048 tokens, decode-only or with prompt tokens, from CUDA graphs captured at start-up (CUDA only)"})
    max_seq_len: int | None = dataclasses.field(default=None, metadata={"help": "prompt plus output tokens at most; unset means the model's limit"})
    tensor_parallel_size: int = dataclasses.field(default=1, metadata={"help": "GPUs one worker spans, the model split across them (--engine trtllm; the embedded engine runs on one device)"})


class Engine(Protocol):
    vocab_size: int
    max_seq_len: int
    eos_token_ids: tuple[int, ...]

    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
               output_token_ids: Sequence[int] = ()) -> None:
        """Queue a request; raises RequestError naming the field when it is invalid.
        `output_token_ids`: tokens it already produced elsewhere (a worker that died); the
        engine continues after them as if it had made them (max_tokens, penalties, and a
        seeded request's draws count them)."""

    def abort(self, request_id: str) -> bool:
        """Drop a request and free its KV blocks (an engine that iterates on its own thread,
        as TensorRT-LLM does, frees them at its next iteration); nothing more of it is
        returned. False if the engine does not hold it."""

    def step(self) -> list[RequestOutput]:
        """Run one iteration, or, for an engine that iterates on its own thread, collect
        what it produced since the last call, waiting briefly for something; every request
        that produced tokens or ended appears once."""

    def has_work(self) -> bool: ...

    def stats(self) -> EngineStats: ...

    def kv_events(self) -> tuple[list[int], list[int]]:
        """Prefix-block hashes (inflight.prefix_hash) stored and evicted since last asked."""
