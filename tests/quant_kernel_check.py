"""Run under TRITON_INTERPRET=1 by tests/test_quant_kernels.py: the quantized projections'
Triton kernels (worker/embedded/kernels/qgemv.py) on the CPU, against float64 math on
the same 8-bit values, on fresh random inputs; prints one JSON line.

The interpreter rounds float32 to float8 differently from the GPU (bench/quant_kernels.py
checks that there), so FP8 is checked where no float8 is produced: the W8A16 path and
the dot of x already quantized by torch."""

from __future__ import annotations

import json

import torch

from worker.embedded.kernels.qgemv import qgemv, quantize_rows as quantize_rows_kernel, w8a16_mm
from worker.embedded.quant import FP8, quantize_rows


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref).norm() / ref.norm()).item()


def main() -> None:
    g = torch.Generator().manual_seed(11)
    out = {}
    # K not a multiple of the tile (masked tail), N not of block_n, M < 16, a bias.
    for dt in (torch.int8, FP8):
        name = str(dt).removeprefix("torch.")
        x = torch.randn(5, 300, generator=g)
        x[:, :3] *= 25
        wq, ws = quantize_rows(torch.randn(40, 300, generator=g), dt)
        w = wq.double() * ws.double()[:, None]
        bias = torch.randn(40, generator=g)
        xq, xs = quantize_rows(x, dt)
        xd = xq.double() * xs.double()[:, None]
        kw = dict(block_n=16, block_k=128, num_warps=4, num_stages=2, pdl=False)
        out[f"{name}.upcast"] = rel_err(qgemv(x, wq, ws, bias, **kw), x.double() @ w.T + bias.double())
        out[f"{name}.prequantized"] = rel_err(qgemv(xq, wq, ws, bias, xs[:, None], out_dtype=torch.float32, **kw),
                                              xd @ w.T + bias.double())
        # The tiled W8A16 kernel for decode batches: M over one row tile and not a
        # multiple of it, K and N not multiples of theirs.
        xm = torch.randn(40, 300, generator=g)
        out[f"{name}.w8a16_mm"] = rel_err(w8a16_mm(xm, wq, ws, bias), xm.double() @ w.T + bias.double())
        if dt == torch.int8:
            q, s = quantize_rows_kernel(x, dt)
            out[f"{name}.quantize_rows_steps_off"] = int((q.int() - xq.int()).abs().max())
            out[f"{name}.quantize_rows_scale"] = rel_err(s[:, 0], xs.double())
    # The RMSNorm and SiLU-and-multiply kernels quantizing their output (fused_quant):
    # the same bytes and scales as the separate kernel on their 16-bit output (the
    # interpreter's float8 rounding is the same in both, so FP8 is checked here too). 300
    # columns: masked tails; float16 (the interpreter's bfloat16 is broken).
    from worker.embedded.kernels.fused import add_rms_norm, silu_and_mul, silu_and_mul_quant

    for dt in (torch.int8, FP8):
        name = str(dt).removeprefix("torch.")
        h = torch.randn(5, 300, generator=g).half()
        res = torch.randn(5, 300, generator=g).half()
        nw = (torch.rand(300, generator=g) + 0.5).half()
        (q, s), new_res = add_rms_norm(h, nw, 1e-5, res, pdl=False, quant=dt)
        y0, res0 = add_rms_norm(h, nw, 1e-5, res, pdl=False)
        q0, s0 = quantize_rows_kernel(y0, dt)
        out[f"{name}.norm_quant_bytes_differ"] = int((q.view(torch.uint8) != q0.view(torch.uint8)).sum())
        out[f"{name}.norm_quant_out_differ"] = int((new_res != res0).sum() + (s != s0).sum())
        gu = (torch.randn(5, 600, generator=g) * 3).half()
        q, s = silu_and_mul_quant(gu, dt, pdl=False)
        q0, s0 = quantize_rows_kernel(silu_and_mul(gu, pdl=False), dt)
        out[f"{name}.silu_quant_bytes_differ"] = int((q.view(torch.uint8) != q0.view(torch.uint8)).sum())
        out[f"{name}.silu_quant_scale_differ"] = int((s != s0).sum())
    # QuantLinear's Triton path as the engine calls it (tiles from qgemv_config, K = 576 as
    # SmolLM2's), against its own CPU emulation; FP8 under "auto" runs W8A16 at this size.
    from worker.embedded.quant import SCHEMES, QuantizedRows, QuantLinear
    from worker.engine_api import KernelConfig

    for scheme in SCHEMES.values():
        lin = torch.nn.Linear(576, 96, bias=True)
        m = QuantLinear.from_linear(lin, scheme)
        m.kernels = KernelConfig(pdl=False)
        x = torch.randn(4, 576, generator=g)
        y = m._cuda(x)  # the interpreter runs the GPU path's kernels on the CPU
        if scheme.activation is not None:  # given its input already quantized (fused_quant): the same output
            m.kernels = KernelConfig(pdl=False, fp8_skinny_matmul="fp8")
            xq, xs = quantize_rows_kernel(x, scheme.activation)
            yq = m(QuantizedRows(xq, xs, x.dtype))
            out[f"QuantLinear.{scheme.name}.prequantized_differs"] = int((yq != m._cuda(x)).sum())
        if scheme.name == "fp8":
            ref = x.double() @ (m.weight.double() * m.weight_scale.double()[:, None]).T + lin.bias.double()
        else:
            ref = m._emulate(x).double()
        out[f"QuantLinear.{scheme.name}"] = rel_err(y, ref)
    # The RMSNorm before a projection quantizes for it (fused_quant) only in the steps whose
    # row count has it quantize: not for an FP8 weight the skinny kernel upcasts (under 8M
    # elements, up to 16 rows), nor for int8 weights alone. The SiLU kernel before down_proj
    # quantizes only past the skinny kernel's 16 rows (one program a row).
    from types import SimpleNamespace

    from worker.embedded.llama import MLP, RMSNorm
    from worker.embedded.quant import quantizes_input

    class Seen(Exception):
        pass

    def stop_with_input(module, args):
        raise Seen(str(args[0].q.dtype) if isinstance(args[0], QuantizedRows) else None)

    for scheme in SCHEMES.values():
        m = QuantLinear.from_linear(torch.nn.Linear(96, 64, bias=False), scheme)
        norm = RMSNorm(96, 1e-5)
        norm.kernels = KernelConfig(pdl=False)
        norm.next_quantization = m.input_quantization if quantizes_input(m) else None
        mlp = MLP(SimpleNamespace(hidden_size=96, intermediate_size=64))
        mlp.kernels = KernelConfig(pdl=False)
        mlp.gate_up_proj = torch.nn.Linear(96, 128, bias=False).half()
        mlp.down_proj = QuantLinear.from_linear(torch.nn.Linear(64, 96, bias=False), scheme)
        mlp.next_quantization = mlp.down_proj.input_quantization if quantizes_input(mlp.down_proj) else None
        mlp.down_proj.register_forward_pre_hook(stop_with_input)
        for rows in (4, 40):
            y, _ = norm(torch.randn(rows, 96, generator=g).half())
            out[f"norm_quantizes_for.{scheme.name}.{rows}"] = str(y.q.dtype) if isinstance(y, QuantizedRows) else None
            try:
                mlp(torch.randn(rows, 96, generator=g).half())
            except Seen as seen:
                out[f"silu_quantizes_for.{scheme.name}.{rows}"] = seen.args[0]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
