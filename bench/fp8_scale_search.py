"""How FP8 (and int8-weight-only) weights and activations are quantized, against the
unquantized default model (SmolLM2-135M-Instruct) or a --model directory, on the CPU
emulation, with bench/quant_accuracy.py's prompts, positions and metrics (KL mean / p99 /
max and top-1 agreement over every position of its 12 chat prompts plus the unquantized
model's greedy continuation).

Everything keeps the GPU kernels' data layout: E4M3 (or int8) weights with one float32
scale per output channel, E4M3 activations with one scale per token. What varies is how
the scales are chosen:

- weights `amax`: scale = amax / 448 per output channel (worker/embedded/quant.py's
  quantize_rows, what --quantization fp8 did).
- weights `mse`: per output channel, scale = r * amax / 448 with the clipping ratio r
  (--ratios) that minimises the channel's squared rounding error sum_j (w_j - q_j s)^2.
- weights `awmse`: the same search, each input channel's error weighted by the mean x_j^2
  of that projection's input over smoothquant.CALIBRATION_TEXTS (collected from the
  unquantized model as smoothquant.activation_samples does): the expected squared error
  of the channel's output.
- weights `load`: quantize_weight_rows below, the candidate for the engine's load
  (fp8: `mse` over r in [1, 2) step 0.04, the search chunked and vectorised over rows;
  int8: amax). Not adopted at load: on the default model it took top-1 from 86.98% to
  89.32% (KL mean 0.0728 -> 0.0436, McNemar p 0.044) but KL max rose (0.741 -> 0.893)
  and the greedy answer to "What is the capital of France?" turned French and lost
  "Paris" (tests/test_quant.py's check); the gain comes largely from the 4-bit GGUF
  source weights, whose block grids some E4M3 alignments fit.
- weights `nwmse`: the same search, weighted without calibration: qkv's and gate_up's
  input channels by the square of the RMSNorm weight in front of them; o's and down's
  unweighted (what a load that sees only the checkpoint could do).
- activations `fp8`: per token, scale = c * amax / 448 (c = 1: what the kernels do;
  c < 1 clips the token's largest entries); `16`: not quantized.

Modes (--modes; names are `<weights>[:<ratio set>]/<activations>`, see MODES), then a
sensitivity ranking: each projection (layer, kind) alone kept 16-bit, the rest in the
best full mode, sorted by the top-1 gained; then the top-k of that ranking kept 16-bit
together until --target top-1 is reached (information only: the kernels have no
mixed mode). Also times the weight search on a 4096 x 14336 random weight (Llama-3-8B's
down_proj shape). Prints tables and writes JSON.

    python -m bench.fp8_scale_search --out fp8_scale_search.json
    python -m bench.fp8_scale_search --modes fp8-amax fp8-mse --no-sensitivity
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from bench.quant_accuracy import ANSWER_PROMPTS, PROMPTS, build, compare
from gateway.tokenizer import TextTokenizer
from inflight.sampling_params import SamplingParams
from models.config import ModelConfig
from models.loader import iter_safetensors
from models.locate import locate_model
from worker.embedded.quant import FP8, projections, qmax, quantize_rows
from worker.embedded.smoothquant import activation_samples, calibration_token_ids, forward_prompt
from worker.engine_api import EngineConfig, KvCacheConfig

ANSWER = SamplingParams(max_tokens=12, temperature=0)
KINDS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
RATIO_SETS = {
    "a": [round(0.60 + 0.02 * i, 2) for i in range(21)],  # 0.60..1.00 step 0.02 (the brief's)
    "w": [round(0.50 + 0.01 * i, 2) for i in range(51)],  # 0.50..1.00 step 0.01: a whole octave of the E4M3 grid
    "i8": [round(0.70 + 0.01 * i, 2) for i in range(31)],  # int8 clipping
    # E4M3's grid repeats every factor of 2 (bar its ends), so r in [1, 2) moves each
    # channel's grid over a whole octave of alignments without clipping anything.
    "up": [round(1.00 + 0.02 * i, 2) for i in range(50)],
    "up4": [round(1.00 + 0.04 * i, 2) for i in range(25)],
    "mix": [round(0.60 + 0.02 * i, 2) for i in range(70)],  # 0.60..1.98
}


@dataclasses.dataclass(frozen=True)
class Mode:
    weight: str  # "16", "amax", "mse", "awmse", "nwmse", "load" (quantize_weight_rows)
    wdtype: torch.dtype = FP8
    ratios: str = "a"
    act: str = "fp8"  # "fp8" or "16"
    act_clip: float = 1.0


MODES = {
    "fp8-amax": Mode("amax"),
    "fp8-mse": Mode("mse"),
    "fp8-mse-wide": Mode("mse", ratios="w"),
    "fp8-awmse": Mode("awmse"),
    "fp8-awmse-wide": Mode("awmse", ratios="w"),
    "fp8-amax-act0.95": Mode("amax", act_clip=0.95),
    "fp8-amax-act0.9": Mode("amax", act_clip=0.9),
    "fp8-amax-act0.8": Mode("amax", act_clip=0.8),
    "fp8w-amax/a16": Mode("amax", act="16"),
    "fp8w-mse/a16": Mode("mse", act="16"),
    "fp8w-awmse/a16": Mode("awmse", act="16"),
    "fp8w-awmse-wide/a16": Mode("awmse", ratios="w", act="16"),
    "fp8-awmse-wide-act0.95": Mode("awmse", ratios="w", act_clip=0.95),
    "fp8-mse-up": Mode("mse", ratios="up"),
    "fp8-mse-up4": Mode("mse", ratios="up4"),
    "fp8-mse-mix": Mode("mse", ratios="mix"),
    "fp8-awmse-up": Mode("awmse", ratios="up"),
    "fp8-awmse-mix": Mode("awmse", ratios="mix"),
    "fp8-nwmse-up4": Mode("nwmse", ratios="up4"),
    "fp8-load": Mode("load"),
    "fp8w-load/a16": Mode("load", act="16"),
    "fp8w-mse-up/a16": Mode("mse", ratios="up", act="16"),
    "fp8w-awmse-up/a16": Mode("awmse", ratios="up", act="16"),
    "int8wo-amax": Mode("amax", torch.int8, act="16"),
    "int8wo-mse": Mode("mse", torch.int8, ratios="i8", act="16"),
    "int8wo-awmse": Mode("awmse", torch.int8, ratios="i8", act="16"),
}


# E4M3's grid repeats every factor of 2 (3 mantissa bits), so r over [1, 2) slides a
# channel's grid across an octave of alignments without clipping anything.
FP8_WEIGHT_RATIOS = tuple(1 + 0.04 * i for i in range(25))  # 1.00, 1.04, ..., 1.96
SEARCH_CHUNK = 2**24  # elements of a weight searched at a time (bounds the temporaries)


@torch.no_grad()
def quantize_weight_rows(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A projection weight w [N, K] per output channel: (q [N, K] in `dtype`, scale [N]
    float32), w ~= q * scale[:, None]. int8: quantize_rows's (amax/127). FP8: each row's
    scale r * amax/448, r of FP8_WEIGHT_RATIOS (1 first: never more error than amax/448)
    by least squared error, vectorised over the rows of SEARCH_CHUNK elements at a time,
    on the weight's device: what a load-time search would run."""
    if dtype != FP8:
        return quantize_rows(w, dtype)
    n, k = w.shape
    q = torch.empty((n, k), dtype=FP8, device=w.device)
    scale = torch.empty(n, dtype=torch.float32, device=w.device)
    fmax = qmax(FP8)
    step = max(1, SEARCH_CHUNK // max(k, 1))
    for i in range(0, n, step):
        wc = w[i:i + step].float()
        base = (wc.abs().amax(dim=-1) / fmax).clamp(min=1e-12)
        best_s, best_e = base, None
        for r in FP8_WEIGHT_RATIOS:
            s = base * r
            d = (wc / s[:, None]).clamp_(-fmax, fmax).to(FP8).float().mul_(s[:, None]).sub_(wc)
            e = torch.linalg.vector_norm(d, dim=-1)
            if best_e is None:
                best_e = e
                continue
            better = e < best_e
            best_e, best_s = torch.where(better, e, best_e), torch.where(better, s, best_s)
        q[i:i + step] = (wc / best_s[:, None]).clamp_(-fmax, fmax).to(FP8)
        scale[i:i + step] = best_s
    return q, scale


@torch.no_grad()
def search_scales(w: torch.Tensor, dtype: torch.dtype, ratios, col_weight: torch.Tensor | None = None,
                  chunk_elems: int = 2**22) -> torch.Tensor:
    """Per row of w [N, K], scale = r * amax / qmax with r of `ratios` minimising the
    row's squared rounding error (each column's weighted by col_weight [K] if given)."""
    w = w.float()
    best_s = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    rows = max(1, chunk_elems // w.shape[1])
    for i in range(0, w.shape[0], rows):
        wc = w[i:i + rows]
        base = (wc.abs().amax(1) / qmax(dtype)).clamp(min=1e-12)
        best_e = torch.full_like(base, float("inf"))
        bs = base.clone()
        for r in ratios:
            s = base * r
            q = wc / s[:, None]
            if dtype == torch.int8:
                q = q.round_()
            q = q.clamp_(-qmax(dtype), qmax(dtype)).to(dtype).float().mul_(s[:, None]).sub_(wc)
            e = q.pow_(2) @ col_weight if col_weight is not None else q.pow_(2).sum(1)
            better = e < best_e
            best_e = torch.where(better, e, best_e)
            bs = torch.where(better, s, bs)
        best_s[i:i + rows] = bs
    return best_s


def dequantized(w: torch.Tensor, mode: Mode, x2: torch.Tensor | None) -> torch.Tensor:
    """w as its quantized weight stands for (float32)."""
    w = w.float()
    if mode.weight == "16":
        return w
    if mode.weight == "amax":
        q, s = quantize_rows(w, mode.wdtype)
    elif mode.weight == "load":
        q, s = quantize_weight_rows(w, mode.wdtype)
    else:
        s = search_scales(w, mode.wdtype, RATIO_SETS[mode.ratios], x2 if mode.weight in ("awmse", "nwmse") else None)
        q = w / s[:, None]
        if mode.wdtype == torch.int8:
            q = q.round()
        q = q.clamp(-qmax(mode.wdtype), qmax(mode.wdtype)).to(mode.wdtype)
    return q.float() * s[:, None]


def fake_quant_act(x: torch.Tensor, clip: float) -> torch.Tensor:
    shape = x.shape
    x = x.reshape(-1, shape[-1]).float()
    s = (x.abs().amax(-1) * clip / 448.0).clamp(min=1e-12)
    q = (x / s[:, None]).clamp(-448.0, 448.0).to(FP8).float() * s[:, None]
    return q.reshape(shape)


class FakeQuant(nn.Module):
    def __init__(self, w: torch.Tensor, bias, act: str, clip: float):
        super().__init__()
        self.w, self.bias, self.act, self.clip = w, bias, act, clip

    def forward(self, x):
        if self.act == "fp8":
            x = fake_quant_act(x, self.clip).to(x.dtype)
        return F.linear(x, self.w.to(x.dtype), self.bias)


class Harness:
    def __init__(self, model_dir, continuation: int):
        mc = ModelConfig.from_dir(model_dir)
        tensors = dict(iter_safetensors(model_dir))
        tok = TextTokenizer.from_dir(model_dir)
        base = EngineConfig(device="cpu", kv_cache=KvCacheConfig(cpu_bytes=128 * 2**20, free_gpu_memory_fraction=0.3))
        greedy = SamplingParams(max_tokens=continuation, temperature=0, ignore_eos=True)
        prompts = [tok.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
        self.engine = build(model_dir, base, mc, tensors)
        self.tok = tok
        self.answer_ids = [tok.encode_chat([{"role": "user", "content": p}]) for p in ANSWER_PROMPTS]
        self.name = mc.name
        self.sequences = [p + out for p, out in zip(prompts, self.engine.generate(prompts, greedy))]
        model = self.engine.model
        with torch.no_grad():
            self.ref_logits = [forward_prompt(model, ids, every_position=True).float().cpu() for ids in self.sequences]
        # every projection: (layer, kind) -> (parent, attribute, original linear)
        self.projs = {}
        for i, layer in enumerate(model.layers):
            for parent in (layer.self_attn, layer.mlp):
                for kind in KINDS:
                    if hasattr(parent, kind):
                        self.projs[(i, kind)] = (parent, kind, getattr(parent, kind))
        assert len(self.projs) == 4 * len(model.layers) == len(list(projections(model)))
        samples = activation_samples(model, calibration_token_ids(model_dir / "tokenizer.json", mc.vocab_size))
        self.x = {key: samples[lin] for key, (_, _, lin) in self.projs.items()}
        self.x2 = {key: x.pow(2).mean(0) for key, x in self.x.items()}
        self.norm2 = {}
        for i, layer in enumerate(model.layers):
            self.norm2[(i, "qkv_proj")] = layer.input_layernorm.weight.data.float().pow(2)
            self.norm2[(i, "gate_up_proj")] = layer.post_attention_layernorm.weight.data.float().pow(2)
        self._cache: dict = {}

    def weight(self, key, mode: Mode) -> torch.Tensor:
        ck = (key, mode.weight, mode.wdtype, mode.ratios)
        if ck not in self._cache:
            x2 = self.norm2.get(key) if mode.weight == "nwmse" else self.x2[key]
            self._cache[ck] = dequantized(self.projs[key][2].weight.data, mode, x2)
        return self._cache[ck]

    def weight_error(self, mode: Mode) -> float:
        """Mean over projections of ||X (W_q - W)^T||^2 / ||X W^T||^2 on the calibration
        inputs X (16-bit X: the weights' share of the error alone)."""
        errs = []
        for key, (_, _, lin) in self.projs.items():
            x, w = self.x[key], lin.weight.data.float()
            errs.append(float((x @ (self.weight(key, mode) - w).T).pow(2).sum() / (x @ w.T).pow(2).sum()))
        return sum(errs) / len(errs)

    @torch.no_grad()
    def evaluate(self, mode: Mode, keep16=(), positions: bool = False) -> dict:
        """quant_accuracy.compare's metrics with the projections in `mode` (those in
        keep16 left 16-bit); with `positions`, also each position's top-1 agreement."""
        for key, (parent, attr, lin) in self.projs.items():
            if key in keep16:
                setattr(parent, attr, lin)
            else:
                setattr(parent, attr, FakeQuant(self.weight(key, mode), lin.bias, mode.act, mode.act_clip))
        try:
            if not positions:
                return compare(self.ref_logits, self.engine, self.sequences)
            answers = [self.tok.decode(o) for o in self.engine.generate(self.answer_ids, ANSWER)]
            agree = []
            for ref, ids in zip(self.ref_logits, self.sequences):
                logits = forward_prompt(self.engine.model, ids, every_position=True).float().cpu()
                agree.append(ref.argmax(-1) == logits.argmax(-1))
            return {**compare(self.ref_logits, self.engine, self.sequences), "agree": torch.cat(agree), "answers": answers}
        finally:
            for parent, attr, lin in self.projs.values():
                setattr(parent, attr, lin)


def mcnemar(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value of b against c discordant pairs."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def time_search(dtype, shape=(4096, 14336)) -> dict:
    """quantize_weight_rows (what the engine loads) against amax/448 on a random bf16 weight."""
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)
    t0 = time.perf_counter()
    q0, s0 = quantize_rows(w, dtype)
    t_amax = time.perf_counter() - t0
    t0 = time.perf_counter()
    q, s = quantize_weight_rows(w, dtype)
    t = time.perf_counter() - t0
    wf = w.float()
    err0 = float((q0.float() * s0[:, None] - wf).pow(2).sum())
    err = float((q.float() * s[:, None] - wf).pow(2).sum())
    gib = w.numel() * 2 / 2**30
    return {"shape": list(shape), "ratios": len(FP8_WEIGHT_RATIOS), "amax_s": t_amax, "search_s": t,
            "search_s_per_bf16_gib": t / gib, "threads": torch.get_num_threads(), "sq_err_vs_amax": err / err0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: the built-in SmolLM2-135M-Instruct)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--continuation", type=int, default=48)
    ap.add_argument("--sensitivity-mode", default="fp8-amax", choices=list(MODES),
                    help="the full mode the sensitivity ranking keeps projections 16-bit from")
    ap.add_argument("--no-sensitivity", action="store_true")
    ap.add_argument("--granularity", default="projection", choices=["projection", "layer"],
                    help="what the sensitivity ranking keeps 16-bit: one projection (120 runs on the default model) "
                         "or one layer's four")
    ap.add_argument("--target", type=float, default=0.97)
    ap.add_argument("--max-kept", type=int, default=16, help="most projections the top-k ranking keeps 16-bit")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--out", default="fp8_scale_search.json")
    args = ap.parse_args()

    torch.set_flush_denormal(True)  # squared errors of tiny weights are denormal floats, slow on the CPU
    t_start = time.monotonic()
    h = Harness(locate_model(args.model), args.continuation)
    results = {"model": h.name, "positions": sum(len(s) for s in h.sequences), "setup_s": time.monotonic() - t_start,
               "modes": {}}
    print(f"{h.name}: {len(h.sequences)} prompts, {results['positions']} positions (setup {results['setup_s']:.1f} s)",
          flush=True)
    print("w-err: weights' relative output error on the calibration inputs (mean over projections); "
          "+/-: positions this mode gets right and the first mode wrong, and the reverse (McNemar p)")
    print(f"{'mode':>24} {'w-err':>9} {'KL mean':>9} {'KL p99':>9} {'KL max':>8} {'top-1':>8} {'+/-':>9} {'p':>6} "
          f"{'s':>6}", flush=True)
    first = None
    for name in args.modes:
        t0 = time.monotonic()
        r = h.evaluate(MODES[name], positions=True)
        r["weight_rel_err"] = h.weight_error(MODES[name])
        agree = r.pop("agree")
        first = agree if first is None else first
        r["gained"], r["lost"] = int((agree & ~first).sum()), int((~agree & first).sum())
        r["mcnemar_p"] = mcnemar(r["gained"], r["lost"])
        r["s"] = time.monotonic() - t0
        results["modes"][name] = {**dataclasses.asdict(MODES[name]) | {"wdtype": str(MODES[name].wdtype)}, **r}
        print(f"{name:>24} {r['weight_rel_err']:>9.2e} {r['kl_mean']:>9.4f} {r['kl_p99']:>9.4f} {r['kl_max']:>8.3f} "
              f"{r['top1_agreement']:>8.2%} {r['gained']:>4}/{r['lost']:<4} {r['mcnemar_p']:>6.3f} {r['s']:>6.1f}",
              flush=True)
    for name, r in results["modes"].items():
        print(f"  [{name}] {ANSWER_PROMPTS[0]} -> {r['answers'][0]!r}")

    if not args.no_sensitivity:
        mode = MODES[args.sensitivity_mode]
        full = h.evaluate(mode)
        units = ({(layer, "all"): [(layer, k) for k in KINDS] for layer in sorted({k[0] for k in h.projs})}
                 if args.granularity == "layer" else {key: [key] for key in h.projs})
        rank = []
        for key, members in units.items():
            r = h.evaluate(mode, keep16=set(members))
            rank.append({"layer": key[0], "kind": key[1], "top1": r["top1_agreement"], "kl_mean": r["kl_mean"]})
        rank.sort(key=lambda r: (-r["top1"], r["kl_mean"]))
        print(f"\nsensitivity ({args.sensitivity_mode}, all: {full['top1_agreement']:.2%} / KL {full['kl_mean']:.4f}): "
              f"one {args.granularity} kept 16-bit")
        for r in rank[:15]:
            print(f"  layer {r['layer']:>2} {r['kind']:>12}: top-1 {r['top1']:.2%}  KL {r['kl_mean']:.4f}")
        greedy = []
        for k in range(1, len(rank) + 1):
            keep = {m for r in rank[:k] for m in units[(r["layer"], r["kind"])]}
            r = h.evaluate(mode, keep16=keep)
            greedy.append({"kept_16bit": k, "top1": r["top1_agreement"], "kl_mean": r["kl_mean"], "kl_p99": r["kl_p99"]})
            print(f"  top {k:>2} ({args.granularity}s) kept 16-bit: top-1 {r['top1_agreement']:.2%}  KL {r['kl_mean']:.4f}", flush=True)
            if r["top1_agreement"] >= args.target or k >= args.max_kept:
                break
        results["sensitivity"] = {"mode": args.sensitivity_mode, "granularity": args.granularity, "all": full, "one_kept_16bit": rank, "top_k": greedy}

    if not args.no_timing:
        t = results["timing"] = time_search(FP8)
        print(f"quantize_weight_rows (fp8, {t['ratios']} ratios) on a {t['shape']} random bf16 weight: {t['search_s']:.2f} s "
              f"({t['search_s_per_bf16_gib']:.1f} s/GiB, {t['threads']} CPU threads; amax/448: {t['amax_s']:.2f} s); "
              f"squared error {t['sq_err_vs_amax']:.3f} x amax/448's")
    results["total_s"] = time.monotonic() - t_start
    print(f"total {results['total_s']:.0f} s")
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
