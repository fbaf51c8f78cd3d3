"""Accuracy of each --quantization mode against the unquantized model, on the real default
model (SmolLM2-135M-Instruct) or a --model directory.

For each prompt of a fixed set (English and Chinese chat prompts, their chat template
applied), the unquantized engine's greedy continuation is appended, and both models are
run over the whole sequence: per position, the KL divergence KL(P_ref || P_quant) of the
next-token distributions and whether their top-1 tokens agree, over every position of
every prompt. Then each mode's greedy answers to a few chat prompts, through the engine.
On the CPU the quantized modes run their emulation (worker/embedded/quant.py); on a GPU
their kernels. Prints a table and writes JSON.

    python -m bench.quant_accuracy --out quant_accuracy.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from gateway.tokenizer import TextTokenizer
from inflight.sampling_params import SamplingParams
from models.config import ModelConfig
from models.loader import iter_safetensors
from models.locate import locate_model
from worker.embedded.engine import EmbeddedEngine
from worker.embedded.quant import QuantLinear, weight_bytes
from worker.embedded.smoothquant import forward_prompt
from worker.engine_api import EngineConfig, KvCacheConfig

# --quantization modes, and "+kv-fp8" for --kv-cache-dtype fp8 on top ("kv-fp8" alone: 16/32-bit projections);
# "fp8-one-row": FP8 weights times 16-bit activations at every position, what a step of one
# token computes under --quantization fp8 on a GPU (KernelConfig.one_row_matmul "fma").
# "bf16", "fp16": no quantization, the whole model in that 16-bit dtype. Against a float32
# reference (the CPU's), they are the metric's resolution: what rounding to the GPU's own
# dtype alone does to KL and top-1 (on a GPU, where the reference is already bf16, "bf16"
# compares it with itself).
MODES = ["fp8", "fp8-one-row", "int8-weight-only", "int8-smoothquant", "kv-fp8", "fp8+kv-fp8"]
DTYPE_MODES = {"bf16": "bfloat16", "fp16": "float16"}
PROMPTS = [  # none of them is in smoothquant.CALIBRATION_TEXTS
    "What is the capital of France?",
    "Explain in two sentences why the sky is blue.",
    "Write a haiku about autumn leaves.",
    "Give me three tips for learning to cook.",
    "What is 17 times 23? Show your steps.",
    "Write a Python function that reverses a string.",
    "法国的首都是哪里？",
    "请解释一下什么是机器学习。",
    "用三句话描述春天。",
    "给我推荐三本好书，并说明理由。",
    "太阳系有几颗行星？",
    "如何学习一门新的语言？",
]
ANSWER_PROMPTS = ["What is the capital of France?", "法国的首都是哪里？", "Write a haiku about autumn leaves."]


def build(model_dir, cfg: EngineConfig, mc: ModelConfig, tensors: dict) -> EmbeddedEngine:
    return EmbeddedEngine(cfg, dataclasses.replace(mc), tensors.items(), tokenizer_file=model_dir / "tokenizer.json")


@torch.no_grad()
def compare(ref_logits: list[torch.Tensor], engine: EmbeddedEngine, sequences: list[list[int]]) -> dict:
    kls, agree, n = [], 0, 0
    for ref, ids in zip(ref_logits, sequences):
        logits = forward_prompt(engine.model, ids, every_position=True, kv_dtype=engine.kv_dtype).float().cpu()
        p_log = torch.log_softmax(ref, -1)
        q_log = torch.log_softmax(logits, -1)
        kls.append((p_log.exp() * (p_log - q_log)).sum(-1))
        agree += int((ref.argmax(-1) == logits.argmax(-1)).sum())
        n += len(ids)
    kl = torch.cat(kls)
    return {"tokens": n, "kl_mean": float(kl.mean()), "kl_p99": float(kl.quantile(0.99)), "kl_max": float(kl.max()),
            "top1_agreement": agree / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: the built-in SmolLM2-135M-Instruct)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--modes", nargs="+", default=MODES, choices=[*MODES, *DTYPE_MODES],
                    help="--quantization modes; kv-fp8: the KV cache in FP8 (--kv-cache-dtype fp8), alone or with fp8; "
                         "bf16, fp16: unquantized in that dtype (against the CPU's float32: the metric's resolution)")
    ap.add_argument("--continuation", type=int, default=48, help="greedy tokens of the unquantized model appended to each prompt")
    ap.add_argument("--answer-tokens", type=int, default=32)
    ap.add_argument("--out", default="quant_accuracy.json")
    args = ap.parse_args()

    model_dir = locate_model(args.model)
    mc = ModelConfig.from_dir(model_dir)
    tensors = dict(iter_safetensors(model_dir))
    tok = TextTokenizer.from_dir(model_dir)
    base = EngineConfig(device=args.device, kv_cache=KvCacheConfig(cpu_bytes=128 * 2**20, free_gpu_memory_fraction=0.3))
    greedy = SamplingParams(max_tokens=args.continuation, temperature=0, ignore_eos=True)
    answer = SamplingParams(max_tokens=args.answer_tokens, temperature=0)
    prompts = [tok.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    answer_ids = [tok.encode_chat([{"role": "user", "content": p}]) for p in ANSWER_PROMPTS]

    ref = build(model_dir, base, mc, tensors)
    sequences = [p + out for p, out in zip(prompts, ref.generate(prompts, greedy))]
    with torch.no_grad():
        ref_logits = [forward_prompt(ref.model, ids, every_position=True).float().cpu() for ids in sequences]
    results = {"model": mc.name, "device": str(ref.device), "dtype": str(ref.dtype), "prompts": len(prompts),
               "modes": {"none": {"weight_bytes": weight_bytes(ref.model),
                                  "answers": [tok.decode(o) for o in ref.generate(answer_ids, answer)]}}}
    del ref
    for mode in args.modes:
        t0 = time.monotonic()
        quant = mode.removesuffix("kv-fp8").removesuffix("+").removesuffix("-one-row") or "none"
        kv = dataclasses.replace(base.kv_cache, dtype="fp8" if mode.endswith("kv-fp8") else "auto")
        cfg = dataclasses.replace(base, quantization=quant, kv_cache=kv)
        if mode in DTYPE_MODES:
            cfg = dataclasses.replace(base, dtype=DTYPE_MODES[mode])
        engine = build(model_dir, cfg, mc, tensors)
        if mode.endswith("-one-row"):  # every row as a one-row step computes it: activations not quantized
            for m in engine.model.modules():
                if isinstance(m, QuantLinear):
                    m.scheme = dataclasses.replace(m.scheme, activation=None)
            engine.model.use_kernels(engine.model.layers[0].input_layernorm.kernels)  # the norms stop quantizing
        row = {"load_s": time.monotonic() - t0, "weight_bytes": weight_bytes(engine.model),
               **compare(ref_logits, engine, sequences),
               "answers": [tok.decode(o) for o in engine.generate(answer_ids, answer)]}
        results["modes"][mode] = row
        del engine

    print(f"{mc.name} on {results['device']} ({results['dtype']}), {len(prompts)} chat prompts + {args.continuation} "
          f"greedy tokens, {results['modes'][args.modes[0]]['tokens']} positions")
    print(f"{'mode':>18} {'weights MB':>10} {'KL mean':>9} {'KL p99':>9} {'KL max':>8} {'top-1 agree':>11}")
    for mode, r in results["modes"].items():
        if mode == "none":
            print(f"{mode:>18} {r['weight_bytes'] / 1e6:>10.1f}")
            continue
        print(f"{mode:>18} {r['weight_bytes'] / 1e6:>10.1f} {r['kl_mean']:>9.4f} {r['kl_p99']:>9.4f} {r['kl_max']:>8.3f} "
              f"{r['top1_agreement']:>11.2%}")
    for mode, r in results["modes"].items():
        for p, a in zip(ANSWER_PROMPTS, r["answers"]):
            print(f"[{mode}] {p} -> {a!r}")
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1, ensure_ascii=False)


if __name__ == "__main__":
    main()
