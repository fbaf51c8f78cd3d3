"""Programmatic dependent launch (Hopper and newer) for the decode step's Triton kernels.

A kernel launched with PDL may start while the kernel before it in the stream is still
finishing: its programs get onto the SMs early, and a weight-reading kernel can begin
pulling its weights into L2 (they never depend on the previous kernel). Each such kernel
must call `gdc_wait()` before it reads or writes anything an earlier kernel touches, and
then `gdc_launch_dependents()` to let the next one in. Ordering stays transitive because
a kernel only lets its successor start after its own wait returned. Captured into CUDA
graphs as programmatic edges.

Only for small batches (at most MAX_ROWS tokens), where launch latency is what a step is
made of: on an H100, PDL cut Llama-3.2-1B's batch-1 decode graph from 1.289 to 1.176 ms
and SmolLM2-135M's from 0.885 to 0.704 ms, but at batch 32, where the big GEMMs are
cuBLAS's, it added 1.3-1.4% on the SmolLM2 and Llama-3-8B shapes (docs/gpu-run-6.md).

`ENABLED` is a switch for benchmarks (bench/decode_latency.py measures what PDL buys);
engines read it when they build their graphs."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

ENABLED = True
MAX_ROWS = 16


def on(device: torch.device, rows: int) -> bool:
    """Whether a kernel over `rows` tokens (or sequences) on `device` is launched with PDL."""
    return ENABLED and rows <= MAX_ROWS and device.type == "cuda" and _supported(device.index)


@functools.cache
def _supported(index: int | None) -> bool:
    from triton.backends.nvidia.compiler import CUDAOptions

    has_option = "launch_pdl" in CUDAOptions.__dataclass_fields__  # Triton 3.4 and newer
    return has_option and torch.cuda.get_device_capability(index)[0] >= 9


def launch_options(use: bool) -> dict:
    """Extra launch keywords: Triton's interpreter knows no `launch_pdl`, so it is only
    passed when on."""
    return {"launch_pdl": True} if use else {}


@triton.jit
def enter(USE_GDC: tl.constexpr):
    """Wait for the kernels before this one, then let the next one start."""
    if USE_GDC:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
