"""One paged-decode launch per configuration for ncu: 8B heads, 256 x 1,536, one split."""
import sys
import torch
from bench.paged_decode_tune import make_case
from worker.embedded.kernels.paged_decode import paged_decode_attention

dtype = torch.float8_e4m3fn if sys.argv[1] == "fp8" else torch.bfloat16
tile, warps, stages = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]) or None
gen = torch.Generator(device="cuda").manual_seed(0)
q, caches, tables, lens, kv_bytes = make_case("8b", 256, "1536", gen, dtype)
k, v = caches[0]
out = torch.empty_like(q)
for _ in range(4):
    paged_decode_attention(q, k, v, tables, lens, 0.1, out, splits=1, tile=tile, num_warps=warps, num_stages=stages)
torch.cuda.synchronize()
print("kv bytes", kv_bytes)
