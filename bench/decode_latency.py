"""Decode latency of the embedded engine on a GPU against the bandwidth floor.

For each batch size: B requests with random 128-token prompts are prefilled, then the
steady decode steps are timed. ms per step is the time each sequence waits for its next
token. The floor is the bytes a step must read (all weights once, plus every sequence's
KV context) over the HBM bandwidth measured by a device copy in this same run. Each
batch runs with and without CUDA graphs and overlap scheduling; "graph GPU ms" is the
device time of the captured decode graph alone (no host work). Baseline
in the same run: Hugging Face transformers `generate` on the same weights. Random weights
of a real shape; prints a table and writes JSON.

    python -m bench.decode_latency --shape llama-3.2-1b --batches 1 8 32 --out decode_latency.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bench.shapes import SHAPES, hf_llama, model_config
from inflight.sampling_params import SamplingParams
from worker.embedded.engine import EmbeddedEngine
from worker.engine_api import EngineConfig, KernelConfig, KvCacheConfig


def copy_bandwidth() -> float:
    """Bytes read plus written per second by a large device-to-device copy."""
    import triton.testing

    src = torch.randn(512 * 2**20 // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=200, return_mode="median")
    return 2 * src.numel() * 4 / (ms / 1000)


def weight_bytes(engine: EmbeddedEngine) -> int:
    seen, total = set(), 0
    for p in engine.model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def time_decode(engine: EmbeddedEngine, batch: int, prompt_len: int, steps: int, gen: torch.Generator,
                windows: int = 5) -> tuple[float, float, float | None]:
    """ms per decode step, the median over `windows` runs of `steps` consecutive steps,
    the mean context length, and the device time of one replay of the step's graph.

    Steps run back to back, as in serving: with overlap scheduling a step returns the
    previous step's tokens, so per-step timing with a device sync would measure nothing
    real. Every token still reaches the host (the last ones in the drain). The median
    window keeps one host hiccup (a GC pass, a preempted thread) out of the number."""
    vocab = engine.vocab_size
    # main() sizes the KV cache for this many tokens a request.
    params = SamplingParams(max_tokens=windows * steps + 264, temperature=0, ignore_eos=True)
    for i in range(batch):
        engine.submit(f"b{batch}-{i}", torch.randint(0, vocab, (prompt_len,), generator=gen).tolist(), params)
    # Prefill and a few decodes, until every sequence decodes: steps sized by time
    # (step_time_target_ms) may hold later prompts back while the first ones decode.
    seen: dict[str, int] = {}
    for _ in range(256):
        for o in engine.step():
            seen[o.request_id] = seen.get(o.request_id, 0) + len(o.new_token_ids)
        if len(seen) == batch and min(seen.values()) >= 2:
            break
    torch.cuda.synchronize()
    times = []
    for _ in range(windows):
        t = time.perf_counter()
        got = sum(len(o.new_token_ids) for _ in range(steps) for o in engine.step())
        times.append(time.perf_counter() - t)
        assert got == batch * steps, (got, batch * steps)
    # Before the drain: the graph's inputs are still this batch's last step (the graphs
    # share one input buffer, and the drain's last steps write other layouts over it).
    gpu_ms = graph_gpu_ms(engine, batch) if engine.config.cuda_graphs else None
    while engine.has_work():
        engine.step()
    return 1000 * sorted(times)[windows // 2] / steps, prompt_len + sum(seen.values()) / batch + windows * steps / 2, gpu_ms


def graph_gpu_ms(engine: EmbeddedEngine, batch: int) -> float | None:
    """Device time of one replay of the decode graph for `batch`: the kernels alone, no
    host work; the gap to ms/step is what the host adds."""
    runner = engine.runner
    sizes = [g for g in runner.graph_sizes if g >= batch]
    if not sizes:
        return None
    replay = runner.graphs[sizes[0]]
    torch.cuda.synchronize()  # the engine's last step may still run
    for _ in range(5):
        replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(50):
        replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 50


@torch.no_grad()
def hf_decode_ms(hf, batch: int, prompt_len: int, new: int, gen: torch.Generator) -> float:
    ids = torch.randint(0, hf.config.vocab_size, (batch, prompt_len), generator=gen).cuda()
    mask = torch.ones_like(ids)
    hf.generate(ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    t = time.perf_counter()
    hf.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t) / new


# (cuda graphs, overlap, variant): the default table, and --ablation's.
MODES = [(True, "on", "all"), (True, "off", "all"), (False, "on", "all"), (False, "off", "all")]
ABLATION = [(True, "on", v) for v in ("all", "pdl+prefetch", "pdl", "none")]


def apply(variant: str) -> KernelConfig:
    """The decode-kernel changes for an engine: "all", "none" or a "+"-joined subset of
    pdl (programmatic dependent launch), prefetch[MB] (weights pulled into L2 before the
    previous kernel ends; needs pdl), silu (SiLU-and-multiply in the gate_up skinny
    matmul's epilogue) and quant (the per-token quantization of FP8 and W8A8 projections'
    inputs in the RMSNorm kernels before them); "+dot": one-row projections on the tensor
    cores (KernelConfig.one_row_matmul "dot"; else the CUDA cores, its default); "+fmaN":
    steps of up to N tokens on the CUDA cores (KernelConfig.fma_max_rows); "+flat": the decodes'
    attention by kernels/flat_decode.py (KernelConfig.decode_kernel); "+longest": decode rows
    longest context first (KernelConfig.decode_order)."""
    parts = set(variant.split("+")) - {"none"}
    if "all" in parts:
        parts = parts - {"all"} | {"pdl", "prefetch", "silu", "quant"}
    mb = [p.removeprefix("prefetch") for p in parts if p.startswith("prefetch")]
    return KernelConfig(pdl="pdl" in parts, fused_silu="silu" in parts, fused_quant="quant" in parts,
                        decode_kernel="flat" if "flat" in parts else KernelConfig.decode_kernel,
                        decode_order="longest-first" if "longest" in parts else KernelConfig.decode_order,
                        one_row_matmul="dot" if "dot" in parts else KernelConfig.one_row_matmul,
                        fma_max_rows=max([int(p.removeprefix("fma")) for p in parts if p.startswith("fma")] or [KernelConfig.fma_max_rows]),
                        l2_prefetch_bytes=(int(mb[0]) * 2**20 if mb[0] else KernelConfig.l2_prefetch_bytes) if mb else 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=128, help="steps per timed window (the median of 5 windows is reported)")
    ap.add_argument("--hf-new-tokens", type=int, default=32, help="tokens per transformers baseline run (0 skips it)")
    ap.add_argument("--ablation", action="store_true",
                    help="instead of graphs/overlap on and off, take away one decode-kernel change at a time "
                         "(the fused SiLU, weight prefetch into L2, programmatic dependent launch)")
    ap.add_argument("--variants", nargs="+", default=None,
                    help="instead of the default table or --ablation: these kernel variants (see apply: all, none, or "
                         "+-joined pdl, prefetch[MB], silu, quant, dot, fmaN, flat, longest), graphs and overlap on")
    ap.add_argument("--quantization", nargs="+", default=["none"],
                    choices=["none", "fp8", "fp8-upcast", "int8-weight-only", "int8-smoothquant"],
                    help="projection weights, one run each (fp8-upcast: fp8 with --fp8-skinny-matmul upcast); "
                         "with more than none, every run has graphs and overlap on")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"], help="what the KV cache stores, every run")
    ap.add_argument("--out", default="decode_latency.json")
    args = ap.parse_args()

    bw = copy_bandwidth()
    cfg = model_config(args.shape)
    kv = KvCacheConfig(tokens_per_block=32, max_tokens=max(args.batches) * (args.prompt_len + 5 * args.steps + 264 + 64) + 4096,
                       dtype=args.kv_cache_dtype)
    gen = torch.Generator().manual_seed(0)
    rows = []
    modes = ([(True, "on", v) for v in args.variants] if args.variants else ABLATION if args.ablation
             else MODES if args.quantization == ["none"] else MODES[:1])
    runs = [(q, *m) for q in args.quantization for m in modes]
    for quant, graphs, overlap, variant in runs:
        kernels = apply(variant)
        if quant == "fp8-upcast":
            kernels.fp8_skinny_matmul = "upcast"
        engine = EmbeddedEngine(EngineConfig(device="cuda", dtype="bfloat16", kv_cache=kv, max_seq_len=4096,
                                             max_batch_size=max(args.batches), cuda_graphs=graphs,
                                             overlap_scheduler=overlap, kernels=kernels,
                                             quantization=quant.removesuffix("-upcast")), cfg)
        wbytes = weight_bytes(engine)
        for b in args.batches:
            ms, ctx, gpu_ms = time_decode(engine, b, args.prompt_len, args.steps, gen)
            kv_bytes = b * ctx * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * (1 if args.kv_cache_dtype == "fp8" else 2)
            floor_ms = 1000 * (wbytes + kv_bytes) / bw
            rows.append({"quantization": quant, "weight_bytes": wbytes, "variant": variant, "cuda_graphs": graphs, "overlap": overlap, "batch": b, "ms_per_step": ms, "floor_ms": floor_ms,
                         "of_floor": floor_ms / ms, "tok_per_s": b * 1000 / ms,
                         "graph_gpu_ms": gpu_ms})
        del engine
        torch.cuda.empty_cache()

    hf_rows = {}
    if args.hf_new_tokens:
        hf = hf_llama(args.shape, dtype=torch.bfloat16)
        for b in args.batches:
            hf_rows[b] = hf_decode_ms(hf, b, args.prompt_len, args.hf_new_tokens, gen)
        del hf

    print(f"\n{args.shape} decode on {torch.cuda.get_device_name()}, bf16, prompt {args.prompt_len}, "
          f"copy bandwidth {bw / 1e12:.2f} TB/s")
    print(f"{'quantization':>16} {'weights GB':>10} {'variant':>11} {'graphs':>6} {'overlap':>7} {'batch':>5} {'ms/step':>8} {'graph GPU ms':>12} {'floor ms':>9} {'of floor':>9} "
          f"{'tok/s':>8} {'HF ms/tok':>10} {'vs HF':>6}")
    for r in rows:
        h = hf_rows.get(r["batch"])
        r["hf_ms_per_step"] = h
        g = r["graph_gpu_ms"]
        print(f"{r['quantization']:>16} {r['weight_bytes'] / 1e9:>10.2f} {r['variant']:>11} {str(r['cuda_graphs']):>6} {r['overlap']:>7} {r['batch']:>5} {r['ms_per_step']:>8.3f} {(f'{g:.3f}' if g else '-'):>12} "
              f"{r['floor_ms']:>9.3f} {r['of_floor']:>9.1%} {r['tok_per_s']:>8.0f} {h or 0:>10.2f} {(h / r['ms_per_step']) if h else 0:>5.1f}x")
    with open(args.out, "w") as f:
        json.dump({"shape": args.shape, "device": torch.cuda.get_device_name(), "copy_bandwidth": bw,
                   "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
