"""The GPU attention path (our Triton kernel and the per-sequence prefill) gives the same
tokens as the reference path. Triton's interpreter runs the kernel on the CPU here; on a
GPU, bench/kernel_check.py and bench/gpu_reference_check.py run it for real."""

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton", reason="triton is installed with the test extras on x86-64")


def test_triton_path_matches_reference(model_dir):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-m", "tests.triton_path_check", str(model_dir)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    for path in ("triton", "triton+graphs", "triton+graphs+overlap"):
        assert out[path]["first"] == out["reference"]["first"], path
        assert out[path]["again"] == out["reference"]["again"], path
        assert out[path]["reused"] > 0  # the prefix-cached prefill path really ran
    kernels = out["kernels"]
    for splits, r in kernels["paged_decode"].items():
        assert r["rel_err"] < 1e-6 and not r["nan"] and r["zero_row"], (splits, r)
    assert kernels["argmax"] == {"float32": True, "bfloat16": True}
    assert kernels["gemv_rel_err"] < 1e-6
