"""Programmatic dependent launch (Hopper and newer) for the decode step's Triton kernels.

A kernel launched with PDL may start while the kernel before it in the stream is still
finishing: its programs get onto the SMs early, and a weight-reading kernel can begin
pulling its weights into L2 (they never depend on the previous kernel). Each such kernel
must call `gdc_wait()` before it reads or writes anything an earlier kernel touches, and
then `gdc_launch_dependents()` to let the next one in. Ordering stays transitive because
a kernel only lets its successor start after its own wait returned. Captured into CUDA
graphs as programmatic edges.

Only for small batches (at most MAX_ROWS tokens): there launch latency is what a step is
made of, and PDL shortened the decode graph of every model shape measured; at larger
batches, whose big projections are cuBLAS's, it measured slower (BENCHMARKS.md, decode
latency, run 6). KernelConfig.pdl turns it off; each kernel takes that switch as its
`pdl` argument."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

MAX_ROWS = 16


def pdl_on(device: torch.device, rows: int, enabled: bool) -> bool:
    """Whether a kernel over `rows` tokens (or sequences) on `device` is launched with PDL,
    given the engine's switch (KernelConfig.pdl)."""
    return enabled and rows <= MAX_ROWS and device.type == "cuda" and _supported(device.index)


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
