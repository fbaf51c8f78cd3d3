# run 20, call 9: silu_and_mul_quant's two-pass variant against the one-program row, FP8
import json, os, torch
from bench.quant_kernels import fused_timing
from worker.embedded.kernels.fused import silu_and_mul, silu_and_mul_quant
from worker.embedded.kernels.qgemv import quantize_rows
from worker.embedded.quant import FP8
g = torch.Generator(device="cuda").manual_seed(3)
for dt in (FP8, torch.int8):
    for M, K in ((1, 14336), (300, 14336), (2048, 14336), (2048, 8192)):
        gu = torch.randn(M, 2 * K, generator=g, device="cuda").to(torch.bfloat16) * 3
        q0, s0 = quantize_rows(silu_and_mul(gu), dt)
        for c in (0, 512, 1024, 2048):
            q, s = silu_and_mul_quant(gu, dt, chunk=c)
            print(dt, M, K, c, "differ", int((q.view(torch.uint8) != q0.view(torch.uint8)).sum() + (s != s0).sum()))
r = fused_timing([64, 256, 1024, 2048], widths=(14336, 8192))
json.dump(r, open(os.environ["OUT"] + "/silu_chunks.json", "w"), indent=1)
