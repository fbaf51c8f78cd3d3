"""Run in a subprocess with TRITON_INTERPRET=1 (see test_triton_path.py): the engine's
GPU attention path (Triton paged-decode kernel, per-sequence prefill, prefix-cached and
chunked prefill) on the CPU, against the reference path, on the real model. Prints JSON."""

import json
import sys

import torch

from inflight.sampling_params import SamplingParams
from worker.embedded.engine import EmbeddedEngine
from worker.engine_api import EngineConfig, KernelConfig, KvCacheConfig


def kernel_checks() -> dict:
    """Fresh random inputs against higher-precision references: the paged-decode kernel
    with one split and with split-K (incl. a padding row of context 0 and splits that get
    no tokens), and the greedy argmax (incl. ties, which go to the lowest index)."""
    from worker.embedded.kernels.argmax import argmax_rows
    from worker.embedded.kernels.paged_decode import paged_decode_attention, paged_decode_reference

    gen = torch.Generator().manual_seed(0)
    B, hq, hkv, d, bs = 3, 6, 2, 16, 4
    ctx = torch.tensor([300, 0, 70], dtype=torch.int32)  # 5 tiles of 64, none, 2
    blocks = -(-300 // bs)
    kc, vc = (torch.randn(B * blocks + 1, bs, hkv, d, generator=gen) for _ in range(2))
    tables = torch.randperm(B * blocks + 1, generator=gen)[: B * blocks].reshape(B, blocks).int()
    q = torch.randn(B, hq, d, generator=gen)
    ref = paged_decode_reference(q, kc, vc, tables, ctx, d ** -0.5)
    decode = {}
    for splits in (1, 2, 8, None):
        out = torch.full_like(q, float("nan"))
        paged_decode_attention(q, kc, vc, tables, ctx, d ** -0.5, out, splits)
        decode[str(splits)] = {"rel_err": ((out.double() - ref).norm() / ref.norm()).item(),
                               "nan": bool(out.isnan().any()), "zero_row": bool((out[1] == 0).all())}
    x = torch.randn(5, 10_000, generator=gen)
    x[1, 123] = x[1, 9_000] = x[1].max() + 1  # a tie across chunks
    x[2, 4095] = x[2, 4096] = x[2].max() + 1  # a tie across the chunk border
    argmax = {dt: argmax_rows(x.to(getattr(torch, dt))).tolist() == x.to(getattr(torch, dt)).float().argmax(-1).tolist()
              for dt in ("float32", "bfloat16")}
    from worker.embedded.kernels.gemv import gemv

    x, w, bias = torch.randn(5, 300, generator=gen), torch.randn(70, 300, generator=gen), torch.randn(70, generator=gen)
    want = x.double() @ w.double().T + bias.double()
    gemv_err = max(((gemv(x, w, bias, bn, bk).double() - want).norm() / want.norm()).item() for bn, bk in ((16, 64), (32, 128)))
    x, w = torch.randn(3, 256, generator=gen), torch.randn(40, 256, generator=gen)  # K a multiple of BLOCK_K
    want = x.double() @ w.double().T
    gemv_err = max(gemv_err, ((gemv(x, w, None, 16, 128).double() - want).norm() / want.norm()).item())
    return {"paged_decode": decode, "argmax": argmax, "gemv_rel_err": gemv_err}


def main() -> None:
    model = sys.argv[1]
    prompts = [[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 30, 2], [1, 4093, 198, 22464, 17, 2],
               [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 30, 2, 198, 1, 4093, 198, 504, 3575, 282, 4649, 314, 2]]
    out = {}
    for attention, graphs, overlap in (("reference", False, "off"), ("triton", False, "off"), ("triton", True, "off"),
                                       ("triton", True, "on")):
        # cuda_graphs on the CPU runs the graph path's static buffers eagerly.
        cfg = EngineConfig(model=model, device="cpu", kernels=KernelConfig(attention=attention), max_num_tokens=16,  # chunked prefill
                           kv_cache=KvCacheConfig(tokens_per_block=4, cpu_bytes=64 * 2**20), cuda_graphs=graphs,
                           max_batch_size=4, max_seq_len=256, overlap_scheduler=overlap)
        engine = EmbeddedEngine(cfg)
        params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        first = engine.generate(prompts[:2], params)
        again = engine.generate(prompts, params)  # the third shares a cached prefix with the first
        out[attention + ("+graphs" if graphs else "") + ("+overlap" if overlap == "on" else "")] = {"first": first, "again": again, "reused": engine.stats().blocks_reused}
    out["kernels"] = kernel_checks()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
