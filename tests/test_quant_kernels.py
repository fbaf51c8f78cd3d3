"""The quantized projections' Triton kernels in Triton's interpreter on the CPU (a
subprocess: the interpreter is chosen when triton is imported); on a GPU,
bench/quant_kernels.py checks every path for real."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton is installed with the test extras on x86-64")


def test_qgemv_and_row_quantization_in_the_interpreter():
    res = subprocess.run([sys.executable, "-m", "tests.quant_kernel_check"], env={**os.environ, "TRITON_INTERPRET": "1"},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(res.stdout.strip().splitlines()[-1])
    for key in ("int8.upcast", "int8.prequantized", "float8_e4m3fn.upcast", "float8_e4m3fn.prequantized",
                "int8.w8a16_mm", "float8_e4m3fn.w8a16_mm",
                "QuantLinear.fp8", "QuantLinear.int8-weight-only", "QuantLinear.int8-smoothquant"):
        assert r[key] < 1e-6, (key, r)
    assert r["int8.quantize_rows_steps_off"] <= 1 and r["int8.quantize_rows_scale"] < 1e-6, r
    # The norm and SiLU kernels' own quantization (fused_quant) is the separate kernel's, bit
    # for bit, and QuantLinear uses what it is given rather than quantizing again.
    for key in ("int8.norm_quant_bytes_differ", "int8.norm_quant_out_differ", "float8_e4m3fn.norm_quant_bytes_differ",
                "float8_e4m3fn.norm_quant_out_differ", "int8.silu_quant_bytes_differ", "int8.silu_quant_scale_differ",
                "float8_e4m3fn.silu_quant_bytes_differ", "float8_e4m3fn.silu_quant_scale_differ",
                "QuantLinear.fp8.prequantized_differs", "QuantLinear.int8-smoothquant.prequantized_differs"):
        assert r[key] == 0, (key, r)
    assert {k.removeprefix("norm_quantizes_for."): v for k, v in r.items() if k.startswith("norm_quantizes_for.")} == {
        "fp8.4": None, "fp8.40": "torch.float8_e4m3fn", "int8-weight-only.4": None, "int8-weight-only.40": None,
        "int8-smoothquant.4": "torch.int8", "int8-smoothquant.40": "torch.int8"}, r
    assert {k.removeprefix("silu_quantizes_for."): v for k, v in r.items() if k.startswith("silu_quantizes_for.")} == {
        "fp8.4": None, "fp8.40": "torch.float8_e4m3fn", "int8-weight-only.4": None, "int8-weight-only.40": None,
        "int8-smoothquant.4": None, "int8-smoothquant.40": "torch.int8"}, r
