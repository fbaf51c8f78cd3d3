"""Run in a subprocess with TRITON_INTERPRET=1 (see test_triton_path.py; the interpreter
must be on before triton is imported). Each Triton kernel on fresh random inputs against a
float64 PyTorch reference; then the engine's GPU path (Triton kernels, per-sequence,
prefix-cached and chunked prefill, graph buffers, overlap) against its reference path on
a model of SmolLM2's layer shape cut to two layers, random weights. Prints JSON: errors
and outputs, which the test asserts on. Arguments after the model directory pick a share
of the checks ("kernels" and engine paths by name, as in PATHS), so that the test can run
two shares at once on two cores; none: all of them."""

import dataclasses
import functools
import json
import sys

import torch
import torch.nn.functional as F

from bench.shapes import random_weights
from inflight.sampling_params import SamplingParams
from models.config import ModelConfig
from worker.embedded.engine import EmbeddedEngine
from worker.engine_api import EngineConfig, KernelConfig, KvCacheConfig


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).norm() / ref.double().norm()).item()


def check_paged_decode(gen: torch.Generator) -> dict:
    """One split and split-K, incl. a padding row of context 0 and splits that get no tokens."""
    from worker.embedded.kernels.paged_decode import paged_decode_attention, paged_decode_reference

    B, hq, hkv, d, bs = 3, 6, 2, 16, 4
    ctx = torch.tensor([300, 0, 70], dtype=torch.int32)  # 5 tiles of 64, none, 2
    blocks = -(-300 // bs)
    kc, vc = (torch.randn(B * blocks + 1, bs, hkv, d, generator=gen) for _ in range(2))
    tables = torch.randperm(B * blocks + 1, generator=gen)[: B * blocks].reshape(B, blocks).int()
    q = torch.randn(B, hq, d, generator=gen)
    ref = paged_decode_reference(q, kc, vc, tables, ctx, d ** -0.5)
    out = {}
    # (splits, tile, rows_outer): 128-token tiles are what batches that fill a GPU run over
    # 128-wide heads; rows_outer is the grid of KernelConfig.decode_order "longest-first"
    for splits, tile, rows_outer in ((1, None, False), (2, None, False), (8, None, False), (None, None, False),
                                     (1, 128, False), (1, None, True), (4, None, True)):
        o = torch.full_like(q, float("nan"))
        paged_decode_attention(q, kc, vc, tables, ctx, d ** -0.5, o, splits, tile=tile, rows_outer=rows_outer)
        out[f"{splits}" + (f", tile {tile}" if tile else "") + (", rows outer" if rows_outer else "")] = {
            "rel_err": rel_err(o, ref), "nan": bool(o.isnan().any()), "zero_row": bool((o[1] == 0).all())}
    return out


def check_flat_decode(gen: torch.Generator) -> dict:
    """kernels/flat_decode.py (KernelConfig.decode_kernel "flat"): rows of very unequal
    length, one cut over several programs and several whole in one, a row of length 0 (a
    graph's padding), grouped heads, 32-bit and FP8 caches, against the float64 reference;
    and its map, made by tensor operations, against the tiles counted here."""
    from worker.embedded.attention import to_cache
    from worker.embedded.kernels.flat_decode import flat_decode_attention, flat_plan
    from worker.embedded.kernels.paged_decode import paged_decode_reference

    B, hq, hkv, d, bs, tile = 6, 6, 2, 16, 4, 8
    lens = [37, 0, 3, 64, 9, 1]  # 5 tiles, none, 1, 8, 2, 1: 17 tiles
    width = -(-max(lens) // bs)
    ctx = torch.tensor(lens, dtype=torch.int32)
    tables = torch.randperm(B * width + 1, generator=gen)[: B * width].reshape(B, width).int()
    q = torch.randn(B, hq, d, generator=gen)
    rows = [r for r, n in enumerate(lens) for _ in range(-(-n // tile))]
    toks = [t * tile for n in lens for t in range(-(-n // tile))]
    lens_of_tiles = [min(tile, lens[r] - t) for r, t in zip(rows, toks)]
    blocks_of_tiles = [[int(tables[r, t // bs + j]) for j in range(tile // bs)] for r, t in zip(rows, toks)]
    ends = [sum(-(-n // tile) for n in lens[: r + 1]) for r in range(len(lens))]
    last_of_tiles = [ends[r] - 1 for r in rows]
    out = {}
    for cache in (torch.float32, torch.float8_e4m3fn):
        kc, vc = (to_cache(torch.randn(B * width + 1, bs, hkv, d, generator=gen), cache) for _ in range(2))
        ref = paged_decode_reference(q, kc.float(), vc.float(), tables, ctx, d ** -0.5)
        for programs in (1, 3, 7):
            p = flat_plan(ctx, tables, bs, programs, tile, hq, d)
            o = torch.full_like(q, float("nan"))
            flat_decode_attention(q, kc, vc, d ** -0.5, o, p)
            out[f"{str(cache).removeprefix('torch.')}, {programs} programs"] = {
                "rel_err": rel_err(o, ref), "nan": bool(o.isnan().any()), "zero_row": bool((o[1] == 0).all()),
                "share": p.share_total.tolist(), "map_right": p.tile_row[:17].tolist() == rows and p.tile_tok[:17].tolist() == toks
                and bool((p.tile_row[17:] == -1).all()) and p.tile_len[:17].tolist() == lens_of_tiles
                and p.tile_blocks[:17].tolist() == blocks_of_tiles and p.tile_last[:17].tolist() == last_of_tiles}
    return out


def check_paged_varlen(gen: torch.Generator) -> dict:
    """Any mix of query lengths: decodes, a fresh prefill, prefills continuing a cached
    context over several tiles, GQA with a padded group (3 of 4), a map sized for more
    tiles than used, and rows of no sequence left as they were."""
    from worker.embedded.kernels.paged_varlen import block_q, max_tiles, paged_varlen_attention, paged_varlen_reference, tile_map

    hq, hkv, d, bs = 9, 3, 16, 4
    q_lens, ctx = [1, 37, 5, 1, 20], [50, 37, 90, 1, 300]
    starts = [0, 1, 38, 43, 44]
    S, T = len(q_lens), sum(q_lens) + 3
    width = -(-max(ctx) // bs)
    kc, vc = (torch.randn(S * width + 1, bs, hkv, d, generator=gen) for _ in range(2))
    tables = torch.randperm(S * width + 1, generator=gen)[: S * width].reshape(S, width)
    q = torch.randn(T, hq, d, generator=gen)
    bq = block_q(hq // hkv)
    tile_seq, tile_q = (torch.from_numpy(a) for a in tile_map(q_lens, bq, max_tiles(T, 8, bq)))
    seq = [torch.tensor(x) for x in (starts, q_lens, ctx)]
    ref = paged_varlen_reference(q, kc, vc, *seq, tables, d ** -0.5)
    o = torch.full_like(q, float("nan"))
    paged_varlen_attention(q, kc, vc, o, tile_seq, tile_q, *seq, tables, d ** -0.5)
    n = sum(q_lens)
    return {"rel_err": rel_err(o[:n], ref[:n]), "nan": bool(o[:n].isnan().any()), "rest_untouched": bool(o[n:].isnan().all()),
            "padded_tiles": int((tile_seq < 0).sum())}


def check_fp8_cache(gen: torch.Generator) -> dict:
    """kv_cache.dtype fp8: both attention kernels over float8 caches against the float64
    reference over the same values widened, and rope_and_cache writing float8 as torch
    rounds it, clamped. (Triton's interpreter drops the carry when a value rounds up to a
    power of two, writing half of it, and rounds subnormals (below 2^-6) down: those
    values are left out here.)"""
    from worker.embedded.attention import to_cache
    from worker.embedded.kernels.fused import rope_and_cache
    from worker.embedded.kernels.paged_decode import paged_decode_attention, paged_decode_reference
    from worker.embedded.kernels.paged_varlen import block_q, max_tiles, paged_varlen_attention, paged_varlen_reference, tile_map

    fp8 = torch.float8_e4m3fn
    ks, vs = 0.05, 0.003  # calibrated scales: the cache holds keys / ks and values / vs
    out = {}
    B, hq, hkv, d, bs = 3, 6, 2, 16, 4
    ctx = torch.tensor([300, 0, 70], dtype=torch.int32)
    blocks = -(-300 // bs)
    kc, vc = (to_cache(torch.randn(B * blocks + 1, bs, hkv, d, generator=gen), fp8) for _ in range(2))
    tables = torch.randperm(B * blocks + 1, generator=gen)[: B * blocks].reshape(B, blocks).int()
    # Every finite float8 value somewhere in the keys the first sequence reads.
    kc.view(torch.uint8).view(-1)[:256] = torch.arange(256, dtype=torch.uint8)
    kc.view(torch.uint8).view(-1)[[0x7F, 0xFF]] = 0  # the two NaNs
    tables[0, : -(-256 // (hkv * d * bs))] = torch.arange(-(-256 // (hkv * d * bs)), dtype=torch.int32)
    q = torch.randn(B, hq, d, generator=gen)
    ref = paged_decode_reference(q, kc.float() * ks, vc.float() * vs, tables, ctx, d ** -0.5)
    for splits in (1, 8):
        o = torch.full_like(q, float("nan"))
        paged_decode_attention(q, kc, vc, tables, ctx, d ** -0.5 * ks, o, splits, v_scale=vs)
        out[f"decode_splits_{splits}"] = rel_err(o, ref)
    # A 16-bit model: the tiles widen to float16 and both dots run in float16.
    q16 = q.bfloat16()
    ref16 = paged_decode_reference(q16, kc.float() * ks, vc.float() * vs, tables, ctx, d ** -0.5)
    o = torch.full_like(q16, float("nan"))
    paged_decode_attention(q16, kc, vc, tables, ctx, d ** -0.5 * ks, o, 2, v_scale=vs)
    out["decode_bf16"] = rel_err(o, ref16)
    # The "bits" read (bench.paged_decode_tune's experiment): the tiles widened by integer
    # arithmetic to 1/256 of their values, the 256 folded into the scales: powers of two
    # throughout, so the same output as the words read's, bit for bit.
    bits = torch.full_like(q16, float("nan"))
    paged_decode_attention(q16, kc, vc, tables, ctx, d ** -0.5 * ks, bits, 2, v_scale=vs, fp8_read="bits")
    out["decode_fp8_bits"] = rel_err(bits, ref16)
    out["decode_fp8_bits_equals_words"] = torch.equal(bits, o)
    # The "kcast" read: K as float8 bytes widened by a cast on its way into the dot, V as words.
    # Both widen exactly to float16, so the same output as the words read's, bit for bit.
    kcast = torch.full_like(q16, float("nan"))
    paged_decode_attention(q16, kc, vc, tables, ctx, d ** -0.5 * ks, kcast, 2, v_scale=vs, fp8_read="kcast")
    out["decode_fp8_kcast_equals_words"] = torch.equal(kcast, o)
    # The "dot" read (bench.paged_decode_tune's experiment): the query rounded to float8 per
    # head and QK^T on float8 operands; against the reference with the query unrounded. Keys
    # of an ordinary range here: among every float8 value above, up to 448, the query's
    # rounding error alone moves the scores by whole units (and the interpreter's own float8
    # rounding, above, halves some query values).
    kd = to_cache(torch.randn(B * blocks + 1, bs, hkv, d, generator=gen), fp8)
    ref_dot = paged_decode_reference(q16, kd.float() * ks, vc.float() * vs, tables, ctx, d ** -0.5)
    words = torch.full_like(q16, float("nan"))
    paged_decode_attention(q16, kd, vc, tables, ctx, d ** -0.5 * ks, words, 2, v_scale=vs)
    for splits in (1, 2):
        o = torch.full_like(q16, float("nan"))
        paged_decode_attention(q16, kd, vc, tables, ctx, d ** -0.5 * ks, o, splits, v_scale=vs, fp8_read="dot")
        out[f"decode_fp8_dot_splits_{splits}"] = rel_err(o, ref_dot)
    out["decode_fp8_dot_vs_words"] = rel_err(o, words.double())
    hq, hkv = 9, 3
    q_lens, lens, starts = [1, 37, 5], [50, 37, 90], [0, 1, 38]
    width = -(-max(lens) // bs)
    kc, vc = (to_cache(torch.randn(3 * width + 1, bs, hkv, d, generator=gen), fp8) for _ in range(2))
    tables = torch.randperm(3 * width + 1, generator=gen)[: 3 * width].reshape(3, width)
    q = torch.randn(sum(q_lens), hq, d, generator=gen)
    bq = block_q(hq // hkv)
    tile_seq, tile_q = (torch.from_numpy(a) for a in tile_map(q_lens, bq, max_tiles(len(q), 4, bq)))
    seq = [torch.tensor(x) for x in (starts, q_lens, lens)]
    ref = paged_varlen_reference(q, kc.float() * ks, vc.float() * vs, *seq, tables, d ** -0.5)
    o = torch.full_like(q, float("nan"))
    paged_varlen_attention(q, kc, vc, o, tile_seq, tile_q, *seq, tables, d ** -0.5 * ks, v_scale=vs)
    out["varlen"] = rel_err(o, ref)
    q16 = q.bfloat16()
    ref16 = paged_varlen_reference(q16, kc.float() * ks, vc.float() * vs, *seq, tables, d ** -0.5)
    o = torch.full_like(q16, float("nan"))
    paged_varlen_attention(q16, kc, vc, o, tile_seq, tile_q, *seq, tables, d ** -0.5 * ks, v_scale=vs)
    out["varlen_bf16"] = rel_err(o, ref16)
    # The write: rotary k and v, one value of each far beyond float8's range.
    T, hq, hkv, d = 5, 9, 3, 64
    qkv = torch.randn(T, (hq + 2 * hkv) * d, generator=gen)
    q, k, v = (t.view(T, -1, d) for t in qkv.split([hq * d, hkv * d, hkv * d], dim=-1))
    v[0, 0, 0], v[1, 0, 0] = 1000.0 * vs, -1000.0 * vs
    pos, slots = torch.arange(T) * 7, torch.randperm(8 * bs, generator=gen)[:T]
    inv = 1.0 / (100000.0 ** (torch.arange(0, d, 2).float() / d))
    freqs = torch.outer(torch.arange(64, dtype=torch.float32), inv)
    kc8, vc8 = (torch.zeros(8, bs, hkv, d, dtype=fp8) for _ in range(2))
    rope_and_cache(q, k, v, freqs.cos(), freqs.sin(), pos, slots, kc8, vc8, k_scale=ks, v_scale=vs)
    for name, cache, src, scale in (("k", kc8, k, ks), ("v", vc8, v, vs)):
        got, want = cache.view(-1, hkv, d)[slots].float(), to_cache(src, fp8, scale).float()
        x = src.float() * (1.0 / scale)
        carry = ((torch.frexp(want).mantissa.abs() == 0.5) & (x.abs() < want.abs())) | (x.abs() < 2.0 ** -6)
        out[f"{name}_equal"] = torch.equal(got[~carry], want[~carry])
        out[f"{name}_carries"] = int(carry.sum())
        out[f"{name}_nan"] = bool(got.isnan().any())
    out["v_clamped"] = vc8.view(-1, hkv, d)[slots][:2, 0, 0].float().tolist()
    return out


def check_argmax(gen: torch.Generator) -> dict:
    """Greedy argmax, incl. ties (the lowest index wins) within and across chunks."""
    from worker.embedded.kernels.argmax import argmax_rows

    x = torch.randn(5, 10_000, generator=gen)
    x[1, 123] = x[1, 9_000] = x[1].max() + 1  # a tie across chunks
    x[2, 4095] = x[2, 4096] = x[2].max() + 1  # a tie across the chunk border
    x[3, 7] = x[3, 9] = x[3].max() + 1  # a tie inside one chunk
    return {dt: argmax_rows(x.to(getattr(torch, dt))).tolist() == x.to(getattr(torch, dt)).float().argmax(-1).tolist()
            for dt in ("float32", "bfloat16")}


def check_gemv(gen: torch.Generator) -> float:
    """Skinny matmul with a bias and a ragged K, and with K a multiple of BLOCK_K."""
    from worker.embedded.kernels.gemv import gemv

    x, w, bias = torch.randn(5, 300, generator=gen), torch.randn(70, 300, generator=gen), torch.randn(70, generator=gen)
    want = x.double() @ w.double().T + bias.double()
    err = max(rel_err(gemv(x, w, bias, bn, bk), want) for bn, bk in ((16, 64), (32, 128)))
    x, w = torch.randn(3, 256, generator=gen), torch.randn(40, 256, generator=gen)
    return max(err, rel_err(gemv(x, w, None, 16, 128), x.double() @ w.double().T))


def check_gemv_gated(gen: torch.Generator) -> dict:
    """The gated skinny matmul (SiLU(gate) * up in its epilogue) against float64, and equal
    to the unfused pair (gemv, then silu_and_mul) bit for bit; a ragged K and a partial
    last block of columns, in float16 and float32."""
    from worker.embedded.kernels.fused import silu_and_mul
    from worker.embedded.kernels.gemv import gemv

    out = {}
    for dt in (torch.float16, torch.float32):
        x, w = torch.randn(5, 300, generator=gen).to(dt), (torch.randn(2 * 70, 300, generator=gen) / 300**0.5).to(dt)
        gate, up = (x.double() @ w.double().T).chunk(2, dim=-1)
        ours = gemv(x, w, None, 16, 128, gated=True)
        out[str(dt).removeprefix("torch.")] = {"rel_err": rel_err(ours, F.silu(gate) * up),
                                              "equals_unfused": torch.equal(ours, silu_and_mul(gemv(x, w, None, 16, 128)))}
    return out


def check_gemv_fma(gen: torch.Generator) -> dict:
    """The one-row matmul on the CUDA cores (batch-1 decode's default) against float64:
    16-bit weights with a bias, a ragged K and a partial last block of rows, both of its
    sums (acc_2d) and an unrolled K loop; 8-bit weights (FP8 and int8) with per-row scales
    read by 16-bit x; and its gated form equal to itself then silu_and_mul bit for bit."""
    from worker.embedded.kernels.fused import silu_and_mul
    from worker.embedded.kernels.gemv import gemv_fma
    from worker.embedded.quant import FP8, quantize_rows

    x, w, bias = torch.randn(1, 300, generator=gen).half(), torch.randn(70, 300, generator=gen).half(), torch.randn(70, generator=gen).half()
    want = x.double() @ w.double().T + bias.double()
    out = {"16bit": max(rel_err(gemv_fma(x, w, None, bias, block_n=bn, block_k=bk, unroll=u, acc_2d=acc, pdl=False), want)
                        for bn, bk, u, acc in ((16, 64, 1, False), (8, 128, 2, True), (4, 512, 4, True)))}
    for dt in (FP8, torch.int8):
        wq, ws = quantize_rows(torch.randn(40, 300, generator=gen), dt)
        want = x.double() @ (wq.double() * ws.double()[:, None]).T
        out[str(dt).removeprefix("torch.")] = max(
            rel_err(gemv_fma(x, wq, ws, block_n=bn, block_k=bk, acc_2d=acc, pdl=False), want)
            for bn, bk, acc in ((8, 128, True), (16, 256, False)))
    # float32 x (a float32 engine's quantized projection) keeps float32; a strided row is read right
    xs = torch.randn(300, 2, generator=gen)[:, :1].T
    y32 = gemv_fma(xs, wq, ws, block_n=8, block_k=128, pdl=False)
    out["float32_x"] = {"dtype": str(y32.dtype), "rel_err": rel_err(y32, xs.double() @ (wq.double() * ws.double()[:, None]).T)}
    # 2-4 rows (KernelConfig.fma_max_rows): 16-bit x, both sums, each row bit for bit as
    # if alone (its own sums, the same order); 8-bit x with a scale a row; the gated form
    xm = torch.randn(4, 300, generator=gen).half()
    w16 = torch.randn(70, 300, generator=gen).half()
    fma = functools.partial(gemv_fma, block_n=8, block_k=128, unroll=2, pdl=False)
    out["rows"] = max(rel_err(fma(xm[:m], w16, None, bias, acc_2d=acc), xm[:m].double() @ w16.double().T + bias.double())
                      for m in (2, 3, 4) for acc in (False, True))
    out["rows_as_alone"] = all(torch.equal(fma(xm[:m], w16, None, bias, acc_2d=acc)[r], fma(xm[r:r + 1], w16, None, bias, acc_2d=acc)[0])
                               for m in (2, 4) for acc in (False, True) for r in range(m))
    xq, xqs = quantize_rows(xm.float(), FP8)
    out["rows_fp8_x"] = rel_err(fma(xq, wq, ws, x_scale=xqs[:, None], out_dtype=torch.float32),
                                (xq.double() * xqs.double()[:, None]) @ (wq.double() * ws.double()[:, None]).T)
    wg = (torch.randn(2 * 70, 300, generator=gen) / 300**0.5).half()
    gm, um = (xm.double() @ wg.double().T).chunk(2, dim=-1)
    out["rows_gated"] = max(rel_err(fma(xm[:m], wg, gated=True, acc_2d=acc), (F.silu(gm) * um)[:m]) for m in (3, 4) for acc in (False, True))
    gate, up = (x.double() @ wg.double().T).chunk(2, dim=-1)
    ours = gemv_fma(x, wg, gated=True, block_n=8, block_k=128, pdl=False)
    out["gated"] = {"rel_err": rel_err(ours, F.silu(gate) * up),
                    "equals_unfused": torch.equal(ours, silu_and_mul(gemv_fma(x, wg, block_n=8, block_k=128, pdl=False)))}
    return out


def check_add_rms_norm(gen: torch.Generator) -> dict:
    """Residual add and RMSNorm; N=300 leaves most of the power-of-two block masked."""
    from worker.embedded.kernels.fused import add_rms_norm

    T, N, eps = 5, 300, 1e-5
    x, r = torch.randn(T, N, generator=gen), torch.randn(T, N, generator=gen)
    w = torch.randn(N, generator=gen)
    x_before = x.clone()

    def norm(h):
        h = h.double()
        return w.double() * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)

    out, res = add_rms_norm(x, w, eps, r)
    plain, same = add_rms_norm(x, w, eps)
    return {"rel_err": rel_err(out, norm(x + r)), "residual_exact": torch.equal(res, x + r),
            "rel_err_no_residual": rel_err(plain, norm(x)), "no_residual_is_x": same is x and torch.equal(x, x_before)}


def check_rope_and_cache(gen: torch.Generator) -> dict:
    """Rotary of q and k in place (views into one fused qkv row, SmolLM2's 9 query and 3
    KV heads: padded head ranges) and k, v into the paged cache at their slots only."""
    from worker.embedded.kernels.fused import rope_and_cache

    T, hq, hkv, d, bs, nblocks, max_pos = 7, 9, 3, 64, 4, 8, 8192
    qkv = torch.randn(T, (hq + 2 * hkv) * d, generator=gen)
    q, k, v = (t.view(T, -1, d) for t in qkv.split([hq * d, hkv * d, hkv * d], dim=-1))
    q0, k0, v0 = q.double(), k.double(), v.clone()
    pos = torch.randint(0, max_pos, (T,), generator=gen)
    pos[0] = max_pos - 1
    slots = torch.randperm(nblocks * bs, generator=gen)[:T]
    inv = 1.0 / (100000.0 ** (torch.arange(0, d, 2).float() / d))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv)
    cos, sin = freqs.cos(), freqs.sin()

    def rot(x):
        c, s = cos[pos].double()[:, None], sin[pos].double()[:, None]
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)

    kc = torch.full((nblocks, bs, hkv, d), float("nan"))
    vc = torch.full_like(kc, float("nan"))
    rope_and_cache(q, k, v, cos, sin, pos, slots, kc, vc)
    others = torch.ones(nblocks * bs, dtype=torch.bool)
    others[slots] = False
    return {"q_rel_err": rel_err(q, rot(q0)), "k_rel_err": rel_err(k, rot(k0)),
            "k_cache_is_k": torch.equal(kc.view(-1, hkv, d)[slots], k), "v_cache_is_v": torch.equal(vc.view(-1, hkv, d)[slots], v0),
            "v_untouched": torch.equal(v, v0), "other_slots_untouched": bool(kc.view(-1, hkv, d)[others].isnan().all()
                                                                            and vc.view(-1, hkv, d)[others].isnan().all())}


def check_silu_and_mul(gen: torch.Generator) -> float:
    """SiLU(gate) * up over SmolLM2's 1536 columns (a full block of 1024 and a ragged one),
    from a strided view."""
    from worker.embedded.kernels.fused import silu_and_mul

    T, n = 5, 1536
    gate_up = torch.randn(T, 2 * n + 40, generator=gen)[:, : 2 * n]
    g, u = gate_up.double().chunk(2, dim=-1)
    return rel_err(silu_and_mul(gate_up), F.silu(g) * u)


def kernel_checks() -> dict:
    gen = torch.Generator().manual_seed(0)
    return {"paged_decode": check_paged_decode(gen), "paged_varlen": check_paged_varlen(gen), "argmax": check_argmax(gen), "gemv_rel_err": check_gemv(gen),
            "gemv_gated": check_gemv_gated(gen), "gemv_fma": check_gemv_fma(gen),
            "add_rms_norm": check_add_rms_norm(gen), "rope_and_cache": check_rope_and_cache(gen),
            "silu_and_mul_rel_err": check_silu_and_mul(gen), "fp8_cache": check_fp8_cache(gen),
            "flat_decode": check_flat_decode(gen)}


PROMPTS = [[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 30, 2], [1, 4093, 198, 22464, 17, 2],
           [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 30, 2, 198, 1, 4093, 198, 504, 3575, 282, 4649, 314, 2]]


# Each engine path by name: (attention, cuda_graphs, overlap_scheduler, kv_cache dtype, decode_kernel).
PATHS = {
    "reference": ("reference", False, "off", "auto", "paged"),
    "triton": ("triton", False, "off", "auto", "paged"),
    "triton+graphs": ("triton", True, "off", "auto", "paged"),
    "triton+graphs+overlap": ("triton", True, "on", "auto", "paged"),
    "triton+graphs+overlap+flat": ("triton", True, "on", "auto", "flat"),
    "reference+fp8kv": ("reference", False, "off", "fp8", "paged"),
    "triton+graphs+overlap+fp8kv": ("triton", True, "on", "fp8", "paged"),
}


def engine_paths(model_dir: str, names=tuple(PATHS)) -> dict:
    import worker.embedded.kernels.flat_decode as flat

    calls = {"flat": 0}
    kernel = flat.flat_decode_attention

    def counted(*args, **kwargs):  # which decode kernel a path really ran
        calls["flat"] += 1
        return kernel(*args, **kwargs)

    flat.flat_decode_attention = counted
    # SmolLM2's layer shape (9 query heads over 3 KV heads, 64 wide, its rope) in two
    # layers: the same code paths as the whole model for a fifteenth of the interpreted work.
    model = dataclasses.replace(ModelConfig.from_dir(model_dir), num_layers=2)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)  # 3 decode steps after each prefill: overlap reads a step late
    out = {}
    for name in names:
        calls["flat"] = 0
        attention, graphs, overlap, kv_dtype, decode_kernel = PATHS[name]
        # cuda_graphs on the CPU runs the graph path's static buffers eagerly.
        # The flat kernel with 16-token tiles: these short contexts then span two tiles, and
        # rows are cut between its programs (one tile each here), as long ones are on a GPU.
        kernels = KernelConfig(attention=attention, decode_kernel=decode_kernel, decode_tile=16 if decode_kernel == "flat" else 0)
        cfg = EngineConfig(device="cpu", kernels=kernels,
                           max_num_tokens=16,  # chunked prefill
                           kv_cache=KvCacheConfig(tokens_per_block=4, cpu_bytes=16 * 2**20, dtype=kv_dtype),
                           cuda_graphs=graphs, max_batch_size=4, max_seq_len=256, overlap_scheduler=overlap)
        engine = EmbeddedEngine(cfg, model, random_weights(model))
        first = engine.generate(PROMPTS[:2], params)
        again = engine.generate(PROMPTS, params)  # the third shares a cached prefix with the first
        stats = engine.stats()
        out[name] = {
            "first": first, "again": again, "reused": stats.blocks_reused, "steps_graph": stats.steps_graph,
            "steps_eager": stats.steps_eager, "kv_blocks": engine.pool.num_blocks, "flat_calls": calls["flat"]}
    return out


def main() -> None:
    model_dir, *share = sys.argv[1:]
    share = share or ["kernels", *PATHS]
    unknown = set(share) - {"kernels", *PATHS}
    assert not unknown, f"no such check: {sorted(unknown)}"
    print(json.dumps({"kernels": kernel_checks() if "kernels" in share else {},
                      "engine": engine_paths(model_dir, [name for name in PATHS if name in share])}))


if __name__ == "__main__":
    main()
