"""Greedy sampling's argmax over the vocabulary, in two passes: chunks of each row in
parallel, then one program per row over the chunk winners. torch.argmax on one row of
Llama-3's 128,256 logits ran as a single slow reduction, after a copy turning bfloat16
logits into float32; this reads the logits as they are (BENCHMARKS.md, decode latency,
run 5). Ties go to the lowest index, as with torch.argmax."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 4096


@triton.jit
def _argmax_chunks(X, VAL, IDX, N, stride_x, NCHUNK, CHUNK: tl.constexpr):
    b = tl.program_id(0)
    c = tl.program_id(1)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(X + b * stride_x + offs, mask=offs < N, other=float("-inf")).to(tl.float32)
    best, at = tl.max(x, 0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(VAL + b * NCHUNK + c, best)
    tl.store(IDX + b * NCHUNK + c, c * CHUNK + at)


@triton.jit
def _argmax_rows(VAL, IDX, OUT, NCHUNK, NPAD: tl.constexpr):
    b = tl.program_id(0)
    c = tl.arange(0, NPAD)
    v = tl.load(VAL + b * NCHUNK + c, mask=c < NCHUNK, other=float("-inf"))
    _, j = tl.max(v, 0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(OUT + b, tl.load(IDX + b * NCHUNK + j))


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """Index of each row's largest value ([B, N] -> [B] int64)."""
    B, N = x.shape
    nchunk = triton.cdiv(N, CHUNK)
    val = torch.empty((B, nchunk), dtype=torch.float32, device=x.device)
    idx = torch.empty((B, nchunk), dtype=torch.int64, device=x.device)
    out = torch.empty(B, dtype=torch.int64, device=x.device)
    _argmax_chunks[(B, nchunk)](x, val, idx, N, x.stride(0), nchunk, CHUNK=CHUNK, num_warps=8)
    _argmax_rows[(B,)](val, idx, out, nchunk, NPAD=triton.next_power_of_2(nchunk), num_warps=1)
    return out
