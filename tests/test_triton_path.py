"""The GPU path's Triton kernels against float64 references, and the engine on that path
(paged-decode kernel, fused kernels, per-sequence, prefix-cached and chunked prefill,
graph buffers, overlap) giving the same tokens as the reference path. Triton's
interpreter runs the kernels on the CPU here, in two subprocesses (tests/triton_path_check.py),
on a two-layer model of SmolLM2's shape; on a GPU, bench/kernel_check.py and
bench/gpu_reference_check.py run them for real on whole models."""

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton", reason="triton is installed with the test extras on x86-64")


# The checks in two shares of about the same interpreted work, run at once: the
# interpreter is single-threaded Python, so on two cores that halves the wait; one torch
# thread each, or they take each other's core (the same results, 17 s against 20-23).
# Together they are every check triton_path_check.py has.
SHARES = (["kernels", "reference", "triton", "triton+graphs", "triton+graphs+overlap+flat"],
          ["triton+graphs+overlap", "reference+fp8kv", "triton+graphs+overlap+fp8kv"])


@pytest.fixture(scope="module")
def checked(model_dir, tmp_path_factory) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path_factory.mktemp("triton_path")
    procs = []
    for i, share in enumerate(SHARES):
        with open(out / f"{i}.out", "w") as stdout, open(out / f"{i}.err", "w") as stderr:  # files: no pipe fills up
            procs.append(subprocess.Popen([sys.executable, "-m", "tests.triton_path_check", str(model_dir), *share],
                                          env=env, stdout=stdout, stderr=stderr, text=True))
    try:
        for p in procs:
            p.wait(timeout=600)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    merged = {"kernels": {}, "engine": {}}
    for i, p in enumerate(procs):
        assert p.returncode == 0, (out / f"{i}.err").read_text()[-3000:]
        part = json.loads((out / f"{i}.out").read_text().strip().splitlines()[-1])
        merged["kernels"].update(part["kernels"])
        merged["engine"].update(part["engine"])
    return merged


def test_paged_decode_kernel(checked):
    for splits, r in checked["kernels"]["paged_decode"].items():
        assert r["rel_err"] < 1e-6 and not r["nan"] and r["zero_row"], (splits, r)


def test_flat_decode_kernel(checked):
    for case, r in checked["kernels"]["flat_decode"].items():
        share = {"1 programs": [17, 17], "3 programs": [6, 17], "7 programs": [3, 17]}[case.split(", ")[1]]
        bound = 2e-3 if case.startswith("float8") else 1e-6  # FP8 tiles go to the dots as float16
        assert r["rel_err"] < bound and not r["nan"] and r["zero_row"] and r["share"] == share and r["map_right"], (case, r)


def test_paged_varlen_kernel(checked):
    r = checked["kernels"]["paged_varlen"]
    assert r["rel_err"] < 1e-6 and not r["nan"] and r["rest_untouched"] and r["padded_tiles"] > 0, r


def test_argmax_kernel_breaks_ties_low(checked):
    assert checked["kernels"]["argmax"] == {"float32": True, "bfloat16": True}


def test_gemv_kernel(checked):
    assert checked["kernels"]["gemv_rel_err"] < 1e-6


def test_one_row_gemv_on_the_cuda_cores(checked):
    r = checked["kernels"]["gemv_fma"]
    # float16 outputs: the error is the output's rounding (float64 sums would be exact)
    assert r["16bit"] < 1e-3 and r["float8_e4m3fn"] < 1e-3 and r["int8"] < 1e-3, r
    assert r["gated"]["rel_err"] < 2e-3 and r["gated"]["equals_unfused"], r
    assert r["float32_x"]["dtype"] == "torch.float32" and r["float32_x"]["rel_err"] < 1e-6, r
    assert r["rows"] < 1e-3 and r["rows_gated"] < 2e-3 and r["rows_fp8_x"] < 1e-6 and r["rows_as_alone"], r


def test_gated_gemv_kernel_equals_the_unfused_pair(checked):
    r = checked["kernels"]["gemv_gated"]
    assert r["float32"]["rel_err"] < 1e-6 and r["float16"]["rel_err"] < 3e-3, r
    assert r["float32"]["equals_unfused"] and r["float16"]["equals_unfused"], r


def test_add_rms_norm_kernel(checked):
    r = checked["kernels"]["add_rms_norm"]
    assert r["rel_err"] < 1e-6 and r["rel_err_no_residual"] < 1e-6, r
    assert r["residual_exact"] and r["no_residual_is_x"], r


def test_rope_and_cache_kernel(checked):
    r = checked["kernels"]["rope_and_cache"]
    assert r["q_rel_err"] < 1e-6 and r["k_rel_err"] < 1e-6, r
    assert r["k_cache_is_k"] and r["v_cache_is_v"] and r["v_untouched"] and r["other_slots_untouched"], r


def test_silu_and_mul_kernel(checked):
    assert checked["kernels"]["silu_and_mul_rel_err"] < 1e-6


@pytest.mark.parametrize("path", ["triton", "triton+graphs", "triton+graphs+overlap", "triton+graphs+overlap+flat"])
def test_engine_path_matches_reference(checked, path):
    ref, out = checked["engine"]["reference"], checked["engine"][path]
    assert out["first"] == ref["first"]
    assert out["again"] == ref["again"]
    assert out["reused"] > 0  # the prefix-cached prefill path really ran
    # With graphs every step, prefill chunks and decodes alike, ran the graph path's buffers.
    assert (out["steps_graph"] > 0, out["steps_eager"] > 0) == (("graphs" in path), ("graphs" not in path)), out
    assert (out["flat_calls"] > 0) == path.endswith("+flat"), out  # KernelConfig.decode_kernel chose the kernel


def test_fp8_kv_cache_kernels(checked):
    """kv_cache.dtype fp8: the attention kernels read float8 caches exactly as the float64
    reference reads the same values; the cache write rounds (and clamps) to float8."""
    r = checked["kernels"]["fp8_cache"]
    assert max(r["decode_splits_1"], r["decode_splits_8"], r["varlen"]) < 1e-6, r
    # bf16 queries: float16 dots over the widened tiles, a bf16 output (its rounding: 2**-9)
    assert max(r["decode_bf16"], r["varlen_bf16"]) < 5e-3, r
    # the "dot" read adds the query's rounding to float8, on keys of an ordinary range
    assert max(r["decode_fp8_dot_splits_1"], r["decode_fp8_dot_splits_2"]) < 1.5e-2, r
    assert r["decode_fp8_dot_vs_words"] > 1e-4, r  # it did round the query: not the words read's output
    assert r["decode_fp8_bits"] < 5e-3 and r["decode_fp8_bits_equals_words"], r  # 1/256 of each value, exactly
    assert r["decode_fp8_kcast_equals_words"], r  # K widened by a cast: the same float16 values
    assert r["k_equal"] and r["v_equal"] and not r["k_nan"] and not r["v_nan"], r
    assert r["v_clamped"] == [448.0, -448.0], r


def test_fp8_kv_cache_engine(checked):
    """The same engine over an FP8 KV cache: four times the blocks of the float32 model's
    cache in the same bytes, the prefix cache still reused, tokens close to the 32-bit
    cache's. The Triton path with graphs and overlap runs it end to end; its tokens are not
    compared with the reference path's here, because Triton's interpreter rounds float8
    its own way (test_fp8_kv_cache_kernels), which moves this random model's tokens."""
    auto, ref, fp8 = checked["engine"]["reference"], checked["engine"]["reference+fp8kv"], checked["engine"]["triton+graphs+overlap+fp8kv"]
    assert 4 * auto["kv_blocks"] <= ref["kv_blocks"] < 4 * (auto["kv_blocks"] + 1), (ref["kv_blocks"], auto["kv_blocks"])
    assert fp8["kv_blocks"] == ref["kv_blocks"]
    assert ref["reused"] > 0 and fp8["reused"] > 0 and fp8["steps_graph"] > 0 and fp8["steps_eager"] == 0, fp8
    assert [len(x) for x in fp8["again"]] == [len(x) for x in ref["again"]]
    # Rounding K and V to 3 mantissa bits moves the tokens only a little.
    same = sum(a == b for x, y in zip(auto["again"], ref["again"]) for a, b in zip(x, y))
    assert same >= 0.5 * sum(len(x) for x in auto["again"]), (auto["again"], ref["again"])
    assert all(x[0] == y[0] for x, y in zip(auto["again"], ref["again"])), (auto["again"], ref["again"])


@pytest.mark.parametrize("rows", [0, 5])
def test_fma_rows_the_kernel_cannot_take_are_refused_by_name(rows):
    from worker.embedded.engine import EmbeddedEngine
    from worker.engine_api import EngineConfig, EngineConfigError, KernelConfig

    with pytest.raises(EngineConfigError, match=f"fma_max_rows must be from 1 to 4, got {rows}"):
        EmbeddedEngine(EngineConfig(device="cpu", kernels=KernelConfig(fma_max_rows=rows)))


@pytest.mark.parametrize("modes", [
    dict(),
    dict(GATED=True, BLOCK_N=2, ACC_2D=False, UNROLL=1),
    dict(HAS_BIAS=True, BLOCK_N=8, UNROLL=2),
], ids=["plain", "gated", "bias"])
def test_one_row_kernel_modes_compile_for_hopper(modes):
    """The interpreter runs the kernel's logic but never compiles it: the engine's one-token
    modes are compiled for sm_90 here (Triton's bundled ptxas, no GPU)."""
    from bench.kernel_ir import compile_gemv_fma

    kernel = compile_gemv_fma(**modes)
    assert ".target sm_90" in kernel.asm["ptx"] and kernel.asm["cubin"], modes


def test_which_steps_run_the_cuda_core_matmul():
    """One row (the default): every projection but a vocabulary's lm_head. Up to
    fma_max_rows rows: only 16-bit projections that are not a fused gate_up; --one-row-matmul
    dot: none."""
    from worker.embedded.kernels.gemv import fma_faster
    from worker.engine_api import KernelConfig

    k = KernelConfig()
    assert fma_faster(k, 1, 2048) and fma_faster(k, 1, 2048, eight_bit=True) and fma_faster(k, 1, 8192, gated=True)
    assert not fma_faster(k, 1, 128256) and not fma_faster(k, 2, 3072)
    k2 = KernelConfig(fma_max_rows=2)
    assert fma_faster(k2, 2, 3072) and not fma_faster(k2, 2, 3072, eight_bit=True) and not fma_faster(k2, 2, 8192, gated=True)
    assert not fma_faster(k2, 3, 3072) and fma_faster(KernelConfig(fma_max_rows=4), 3, 3072)
    assert not fma_faster(KernelConfig(one_row_matmul="dot"), 1, 2048)


@pytest.mark.parametrize("tile", [100, 8, 512])
def test_a_decode_tile_the_kernel_cannot_take_is_refused_by_name(tile):
    from worker.embedded.engine import EmbeddedEngine
    from worker.engine_api import EngineConfig, EngineConfigError, KernelConfig

    with pytest.raises(EngineConfigError, match=f"decode_tile must be 0 .* got {tile}"):
        EmbeddedEngine(EngineConfig(device="cpu", kernels=KernelConfig(decode_tile=tile)))
