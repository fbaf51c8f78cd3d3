"""Compiles the paged-decode kernel (worker/embedded/kernels/paged_decode.py) for a GPU
architecture on any machine, no GPU needed (Triton's bundled ptxas), and prints what
bounds it there: the shared memory a program takes (with the registers, which only the
device reports, that decides how many programs an SM holds), and the loop's traffic
through shared memory as PTX instructions (cp.async, ld/st.shared, ldmatrix), next to its
MMAs, conversions and barriers, for each configuration given, and the bytes a thread moves
through shared memory in the code as written (a loop body once: per tile).

It is how a kernel change can be judged before a GPU is lent: on an H200 (ncu, run 21 in
BENCHMARKS.md) the FP8-cache kernel is held by shared-memory traffic, and the shared
memory reported here for sm_90 equals what ncu reported there (73,728 B for an FP8
cache's 128-token tiles, 38,912 B for a 16-bit cache's 64). What Triton makes of a kernel
changes between its versions (the FP8 "kcast" read saves shared memory under Triton 3.9, not
under the device's 3.6): install the device's version beside this one
(`pip install --target DIR triton==X`, then PYTHONPATH=DIR) to see what it will run. Pointers and strides are
compiled as divisible by 16, as the engine's launches are specialised.

    python -m bench.kernel_ir --kv-cache-dtype fp8 bf16 --fp8-reads words kcast --tiles 64 128 --stages 2 --dump ir/

compile_gemv_fma does the same for the one-row CUDA-core matmul's modes (tests compile each).
"""

from __future__ import annotations

import argparse
import itertools
import re
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from worker.embedded.kernels.paged_decode import _paged_decode, tile_reads

HEADS = {"8b": (4, 128), "1b": (4, 64)}  # query heads a KV head, head dim (Llama-3-8B, Llama-3.2-1B)
PTX_COUNTS = {  # what each column counts in the PTX
    "cp.async": r"cp\.async\.c[ag]",
    "ld.shared": r"ld\.shared",
    "st.shared": r"st\.shared",
    "ldmatrix": r"ldmatrix",
    "mma": r"mma\.sync",
    "wgmma": r"wgmma\.mma_async",
    "cvt e4m3": r"e4m3x2",
    "barriers": r"bar\.sync|barrier\.sync",
}


def shared_bytes(ptx: str) -> int:
    """Bytes one thread moves through shared memory in the kernel's code (each instruction
    once, as written: a loop body counts once): loads, stores, ldmatrix and cp.async."""
    total = 0
    for vec, bits in re.findall(r"(?:ld|st)\.shared(?:\.v(\d))?\.[bsuf](\d+)", ptx):
        total += int(vec or 1) * int(bits) // 8
    total += sum(4 * int(x) for x in re.findall(r"ldmatrix\.sync\.aligned\.m8n8\.x(\d)", ptx))
    total += sum(int(n, 0) for n in re.findall(r"cp\.async\.c[ag]\.shared\.global(?:\.[a-z0-9]+)*\s*\[[^]]*\],\s*\[[^]]*\],\s*(0x[0-9a-f]+|\d+)", ptx))
    return total


def compile_decode(kv_fp8: bool, heads: str, tile: int, warps: int, stages: int, arch: int, block_size: int = 32,
                   fp8_read: str = "words"):
    group, head_dim = HEADS[heads]
    k_read, v_read = tile_reads(fp8_read)
    cache = {"words": "*i32", "cast": "*fp8e4nv"} if kv_fp8 else {"words": "*bf16", "cast": "*bf16"}
    pointers = {"Q": "*bf16", "O": "*bf16", "K": cache[k_read], "V": cache[v_read],
                "PART_O": "*fp32", "PART_LSE": "*fp32", "TABLES": "*i32", "CTX_LENS": "*i32"}
    constants = dict(GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
                     BLOCK_SIZE=block_size, TILE=tile, IEEE=False, SPLITS=1, USE_GDC=False, KV_FP8=kv_fp8,
                     K_WORDS=k_read == "words", V_WORDS=v_read == "words", ASM=True, FP8_DOT=False, FP8_BITS=False,
                     ROWS_OUTER=False)
    return _compile(_paged_decode, pointers, constants, warps, stages, arch)


def _compile(fn, pointers: dict, constants: dict, warps: int, stages: int, arch: int):
    """An attention kernel compiled for `arch`: pointers typed as given, scales float32,
    strides int32 and, like the pointers, divisible by 16; the rest constexprs."""
    names = fn.arg_names
    signature = {n: pointers.get(n) or ("fp32" if n in ("scale", "v_scale") else
                                         "i32" if n.startswith("stride") else "constexpr") for n in names}
    divisible = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
                 if signature[n].startswith("*") or n.startswith("stride")}
    src = ASTSource(fn=fn, signature=signature, attrs=divisible,
                    constexprs={(names.index(n),): v for n, v in constants.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})


def compile_flat(kv_fp8: bool, heads: str, tile: int, warps: int, stages: int, arch: int, block_size: int = 32):
    """kernels/flat_decode.py's kernel, compiled as compile_decode compiles the paged one."""
    from worker.embedded.kernels.flat_decode import _flat_decode

    group, head_dim = HEADS[heads]
    cache = "*i32" if kv_fp8 else "*bf16"
    pointers = {"Q": "*bf16", "O": "*bf16", "K": cache, "V": cache, "PART_O": "*fp32", "PART_LSE": "*fp32",
                **dict.fromkeys(("PLAN", "TILE_ROW", "TILE_TOK", "TILE_LEN", "TILE_LAST", "TILE_BLOCKS"), "*i32")}
    constants = dict(GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
                     BLOCK_SIZE=block_size, TILE=tile, NB=max(1, tile // block_size), IEEE=False, KV_FP8=kv_fp8,
                     K_WORDS=kv_fp8, V_WORDS=kv_fp8, ASM=True)
    return _compile(_flat_decode, pointers, constants, warps, stages, arch)


def compile_gemv_fma(arch: int = 90, **modes):
    """kernels/gemv.py's one-row CUDA-core kernel compiled for `arch`, no GPU needed, in the
    modes given as its constexprs (GATED, HAS_BIAS, BLOCK_N, ...; the rest as the 1B shape's
    qkv launch takes them): what a change to it must survive before a GPU times it."""
    from worker.embedded.kernels.gemv import _gemv_fma

    names = _gemv_fma.arg_names
    consts = dict(HAS_SX=False, HAS_SW=False, HAS_BIAS=False, GATED=False, ROWS=1, BLOCK_N=4, BLOCK_K=1024, EVEN_K=True,
                  USE_GDC=True, PREFETCH_K=0, LINE=64, ACC_2D=True, UNROLL=4)
    consts.update(modes)
    pointers = {"X": "*bf16", "SX": "*fp32", "W": "*bf16", "SW": "*fp32", "B": "*bf16", "Y": "*bf16"}
    signature = {n: "constexpr" if n in consts else pointers.get(n, "i32") for n in names}
    src = ASTSource(fn=_gemv_fma, signature=signature, constexprs={(names.index(n),): v for n, v in consts.items()},
                    attrs={(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if signature[n].startswith("*")})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4, "num_stages": 1})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kv-cache-dtype", nargs="+", choices=["bf16", "fp8"], default=["fp8", "bf16"])
    ap.add_argument("--fp8-reads", nargs="+", choices=["words", "kcast"], default=["words"],
                    help="how the kernel reads an FP8 cache (paged_decode.DECODE_FP8_READS)")
    ap.add_argument("--heads", choices=list(HEADS), default="8b")
    ap.add_argument("--tiles", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--warps", type=int, nargs="+", default=[4])
    ap.add_argument("--stages", type=int, nargs="+", default=[2])
    ap.add_argument("--arch", type=int, default=90, help="compute capability as a number (90: Hopper)")
    ap.add_argument("--kernel", choices=["paged", "flat"], default="paged",
                    help="the paged-decode kernel, or kernels/flat_decode.py (KernelConfig.decode_kernel flat; words reads over FP8)")
    ap.add_argument("--dump", type=Path, help="also write each configuration's TTGIR and PTX into this folder")
    args = ap.parse_args()
    print(f"Triton {triton.__version__}, sm_{args.arch} (what a kernel compiles to depends on the Triton version: "
          "check the device's)")
    print(f"{'cache':>11} {'tile':>4} {'warps':>5} {'stages':>6} {'shared B':>9} "
          + " ".join(f"{c:>9}" for c in PTX_COUNTS) + f" {'shared B/thread':>15}  (PTX instructions in the kernel)")
    cases = [(dtype, read) for dtype in args.kv_cache_dtype for read in (args.fp8_reads if dtype == "fp8" else ["-"])]
    for (dtype, read), tile, warps, stages in itertools.product(cases, args.tiles, args.warps, args.stages):
        if args.kernel == "flat":
            kernel = compile_flat(dtype == "fp8", args.heads, tile, warps, stages, args.arch)
        else:
            kernel = compile_decode(dtype == "fp8", args.heads, tile, warps, stages, args.arch,
                                    fp8_read=read if dtype == "fp8" else "words")
        dtype = dtype if read == "-" else f"{dtype} {read}"
        ptx = kernel.asm["ptx"]
        counts = [len(re.findall(p, ptx)) for p in PTX_COUNTS.values()]
        print(f"{dtype:>11} {tile:>4} {warps:>5} {stages:>6} {kernel.metadata.shared:>9} "
              + " ".join(f"{c:>9}" for c in counts) + f" {shared_bytes(ptx):>15}", flush=True)
        if args.dump:
            args.dump.mkdir(parents=True, exist_ok=True)
            stem = args.dump / f"{args.kernel}_decode_{dtype.replace(' ', '_')}_{tile}_{warps}_{stages}_sm{args.arch}"
            stem.with_suffix(".ttgir").write_text(kernel.asm["ttgir"])
            stem.with_suffix(".ptx").write_text(ptx)


if __name__ == "__main__":
    main()
