"""One tile of the paged KV cache, as the attention kernels' dots take it.

A 16-bit cache is loaded as it is. An FP8 (E4M3) cache is loaded as 32-bit words of four
values and widened to float16 in registers, two values an instruction
(`cvt.rn.f16x2.e4m3x2`, sm_89 and up), before the tile reaches the dot; the query and the
softmax weights then go to the dot in float16 too. Given the float8 tile and a cast
instead, Triton keeps the tile in shared memory as bytes and widens each value after
reading it back one byte at a time: in the PTX of the paged-decode kernel for sm_90 that is
64 one-byte shared loads and 192 conversions a thread a tile (a float16 result still needs
64 of each), where the words take 10 sixteen-byte loads and 64 conversions, fewer
instructions a tile than the bf16 cache's kernel. `bench.paged_decode_tune --kv-cache-dtype
fp8` times both reads (`fp8_read`) in the same run.

float16 and not bfloat16 for the dots: E4M3 widens to float16 in one instruction and
exactly; bfloat16 takes a second conversion per value. float16 holds every FP8 value and
has more mantissa than bfloat16; the query is clamped to float16's range first."""

from __future__ import annotations

import triton
import triton.language as tl

FP8_READS = ("words", "cast")  # "cast": the float8 tile through Triton's own cast (the baseline)


@triton.jit
def _e4m3_words_to_f16(w, ROWS: tl.constexpr, COLS: tl.constexpr, ASM: tl.constexpr, UNSCALED: tl.constexpr):
    """[ROWS, COLS // 4] int32 words, four E4M3 values each, lowest byte first ->
    [ROWS, COLS] float16, exactly (UNSCALED, by bit arithmetic: the values / 256, exactly,
    for the caller to fold the 256 into a scale of its own)."""
    w = w.to(tl.uint32, bitcast=True)
    if ASM and not UNSCALED:
        lo, hi = tl.inline_asm_elementwise(
            "{ .reg .b16 l, h; mov.b32 {l, h}, $2; cvt.rn.f16x2.e4m3x2 $0, l; cvt.rn.f16x2.e4m3x2 $1, h; }",
            "=r,=r,r", [w], dtype=(tl.uint32, tl.uint32), is_pure=True, pack=1)
    else:
        # Triton's CPU interpreter runs no PTX: the same values by bit arithmetic. Each
        # byte's sign goes to bit 15 of a half word and its 7 exponent-and-mantissa bits to
        # bits 7-13, which reads as float16 of the value / 256 (the biases differ by 8;
        # subnormals included); the multiply below restores it. NaN (never stored: the
        # cache clamps) would read as 480.
        lo = ((w & 0xFF) << 8) | ((w & 0xFF00) << 16)
        hi = ((w >> 8) & 0xFF00) | (w & 0xFF000000)
        lo = ((lo >> 1) & 0x3F803F80) | (lo & 0x80008000)
        hi = ((hi >> 1) & 0x3F803F80) | (hi & 0x80008000)
    # join stacks on a new last axis: joining (0, 2) with (1, 3) lays out 0, 1, 2, 3
    x = tl.join(tl.join((lo & 0xFFFF).to(tl.uint16), (hi & 0xFFFF).to(tl.uint16)),
                tl.join((lo >> 16).to(tl.uint16), (hi >> 16).to(tl.uint16)))
    x = tl.reshape(x, (ROWS, COLS)).to(tl.float16, bitcast=True)
    if not ASM and not UNSCALED:
        x = x * 256.0
    return x


@triton.jit
def kv_tile(CACHE, rows, t_ok, HEAD_DIM: tl.constexpr, TILE: tl.constexpr, KV_FP8: tl.constexpr,
            FP8_WORDS: tl.constexpr, ASM: tl.constexpr, UNSCALED: tl.constexpr = False):
    """The [TILE, HEAD_DIM] tile of one KV head whose tokens start at element `rows` [TILE]
    of CACHE (in 32-bit words for an FP8 cache read as words); tokens not t_ok read 0. An
    FP8 cache read as words comes back as float16 (UNSCALED: divided by 256, widened by
    integer instructions instead of conversions); otherwise the tile is as stored (the
    caller casts it to the query's dtype, dot_query's)."""
    if KV_FP8 and FP8_WORDS:
        w = tl.load(CACHE + rows[:, None] + tl.arange(0, HEAD_DIM // 4)[None, :], mask=t_ok[:, None], other=0)
        x = _e4m3_words_to_f16(w, TILE, HEAD_DIM, ASM, UNSCALED)
    else:
        x = tl.load(CACHE + rows[:, None] + tl.arange(0, HEAD_DIM)[None, :], mask=t_ok[:, None], other=0.0)
    return x


@triton.jit
def dot_query(q, KV_FP8: tl.constexpr, FP8_WORDS: tl.constexpr, IEEE: tl.constexpr):
    """The query as the dots take it: float16 over an FP8 cache read as words (clamped to
    its range), unchanged otherwise; float32 models keep float32."""
    if KV_FP8 and FP8_WORDS and not IEEE:
        q = tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0).to(tl.float16)
    return q


def cache_view(cache, fp8_read: str = "words"):
    """The cache tensor a kernel is given and the unit of its strides: an FP8 cache read as
    words is viewed as int32 (its head dimension must be a multiple of 4)."""
    import torch

    if cache.dtype == torch.float8_e4m3fn and fp8_read == "words":
        if cache.shape[-1] % 4:
            raise ValueError(f"an FP8 KV cache needs a head dimension divisible by 4, not {cache.shape[-1]}")
        return cache.view(torch.int32)
    if fp8_read not in FP8_READS:
        raise ValueError(f"fp8_read must be one of {FP8_READS}, not {fp8_read!r}")
    return cache
