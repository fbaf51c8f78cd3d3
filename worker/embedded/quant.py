"""Quantized projections (EngineConfig.quantization): the fused qkv, o, gate_up and down
projections of every layer hold 8-bit weights with one float32 scale per output channel
(w ~= q * scale); embeddings, norms and lm_head stay in the model's dtype.

Schemes:
- fp8: float8 E4M3 weights (scale amax/448 per channel); activations quantized to E4M3
  per token at run time; the matmul runs on FP8 tensor cores.
- int8-weight-only (W8A16): int8 weights (scale amax/127 per channel, symmetric);
  activations stay 16-bit.
- int8-smoothquant (W8A8): int8 weights and per-token int8 activations, after the
  SmoothQuant smoothing (smoothquant.py, run first by the engine) moved activation
  outliers into the weights.

Where each runs:
- CUDA: up to 16 rows on the Triton path, kernels/qgemv.py (activations quantized by its
  per-row kernel, then an 8-bit dot; or W8A16, which KernelConfig.fp8_skinny_matmul also
  picks for small FP8 weights, where it measured faster); more rows, torch._scaled_mm
  with row-wise scales (fp8), torch._int_mm (W8A8), or the weight converted to 16-bit
  before F.linear (W8A16).
- elsewhere (the CPU the tests run on): an emulation computing the same function, the
  dequantized weight (kept in the compute dtype, so memory does not shrink there) times
  the activation rounded per token to the 8-bit grid and back.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from worker.engine_api import EngineConfigError, KernelConfig

FP8 = torch.float8_e4m3fn
PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")  # module names, in every layer
SKINNY_ROWS = 16  # kernels/qgemv.py's most rows
# Above SKINNY_ROWS and up to W8A16_MM_ROWS rows, int8-weight-only runs kernels/qgemv.py's
# tiled W8A16 matmul (the weight read as 8 bits, converted in registers): a 32-row decode
# step of the Llama-3-8B shape took 5.23 ms there against 24.1 ms converting each whole
# weight for cuBLAS (one H200: BENCHMARKS.md, 'FP8 and INT8 projections'). Above it the
# step is compute-bound and the whole weight is converted once a call. FP8 through the
# same kernel (its weight widened to bf16) measured slower than torch._scaled_mm at 32 rows
# (6.56 against 4.92 ms a step) with the kernel's untuned tiles: FP8 above 16 rows is the
# quantization of x plus torch._scaled_mm.
W8A16_MM_ROWS = 256


@dataclasses.dataclass(frozen=True)
class QuantScheme:
    name: str
    weight: torch.dtype  # FP8 or torch.int8
    activation: torch.dtype | None  # the weight's dtype (per-token quantized) or None (16-bit)


SCHEMES = {
    "fp8": QuantScheme("fp8", FP8, FP8),
    "int8-weight-only": QuantScheme("int8-weight-only", torch.int8, None),
    "int8-smoothquant": QuantScheme("int8-smoothquant", torch.int8, torch.int8),
}


def scheme_for(name: str) -> QuantScheme | None:
    """The scheme of an EngineConfig.quantization value; None for "none"."""
    if name == "none":
        return None
    try:
        return SCHEMES[name]
    except KeyError:
        raise EngineConfigError(f"--quantization must be one of none, {', '.join(SCHEMES)}; got {name!r}") from None


def check_device(scheme: QuantScheme, device: torch.device) -> None:
    """FP8 matmuls need FP8 tensor cores (compute capability 8.9: Ada, Hopper and later)."""
    if scheme.activation == FP8 and device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 9):
            raise EngineConfigError(f"--quantization fp8 needs a GPU of compute capability 8.9 or later; "
                                    f"{torch.cuda.get_device_name(device)} is {cap[0]}.{cap[1]} (int8 schemes run there)")


def check_shapes(scheme: QuantScheme, hidden: int, intermediate: int, q_size: int, kv_size: int,
                 device: torch.device) -> None:
    """cuBLAS's 8-bit matmuls take dimensions in multiples of 16 (FP8) or 8 (int8 W8A8)."""
    multiple = {FP8: 16, torch.int8: 8}.get(scheme.activation)
    if device.type != "cuda" or multiple is None:
        return
    sizes = {"hidden_size": hidden, "intermediate_size": intermediate, "q size (heads x head_dim)": q_size,
             "kv size": kv_size}
    odd = [f"{name} {n}" for name, n in sizes.items() if n % multiple]
    if odd:
        raise EngineConfigError(f"--quantization {scheme.name} needs projection sizes in multiples of {multiple} on CUDA; "
                                f"this model has {', '.join(odd)}")


def qmax(dtype: torch.dtype) -> float:
    return 127.0 if dtype == torch.int8 else torch.finfo(dtype).max


def quantize_rows(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric quantization of each row of t [R, C] to `dtype` (FP8 or int8): (q [R, C],
    scale [R] float32) with t ~= q * scale[:, None], scale = amax(row) / qmax."""
    t = t.float()
    scale = (t.abs().amax(dim=-1) / qmax(dtype)).clamp(min=1e-12)
    return rows_to(t, scale, dtype), scale


def rows_to(t: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t [R, C] / scale [R] on `dtype`'s grid: int8 rounded (torch.round), then clamped;
    FP8 clamped, then rounded by the cast."""
    q = t.float() / scale[:, None]
    if dtype == torch.int8:
        q = q.round()
    return q.clamp(-qmax(dtype), qmax(dtype)).to(dtype)


# Multiples of amax/448 that search_fp8_scales tries for a channel's FP8 scale. Above 1
# nothing clips, and the E4M3 grid slides over the channel's values; below 1 (clipping)
# never did better on the default model (BENCHMARKS.md, 'FP8 weight scales').
FP8_SCALE_RATIOS = tuple(1 + 0.02 * i for i in range(50))


@torch.no_grad()
def search_fp8_scales(w: torch.Tensor, col_weight: torch.Tensor, chunk_elems: int | None = None) -> torch.Tensor:
    """Per row of w [N, K], the scale r * amax / 448 (r of FP8_SCALE_RATIOS) whose E4M3
    rounding error, each column's squared error weighted by col_weight [K] (the mean
    squared input of that column), is least: the output error the rounding causes on
    such inputs. r = 1 comes first, so no row does worse than amax/448 by that measure."""
    fmax = qmax(FP8)
    col_weight = col_weight.float().to(w.device)
    scales = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    # Elements a pass: big on a GPU (few launches; the temporaries take ~1 GB), small on the CPU (cache).
    chunk_elems = chunk_elems or (2**26 if w.is_cuda else 2**22)
    rows = max(1, chunk_elems // w.shape[1])
    for i in range(0, w.shape[0], rows):
        wc = w[i:i + rows].float()
        base = (wc.abs().amax(1) / fmax).clamp(min=1e-12)
        best_e = torch.full_like(base, float("inf"))
        best = base.clone()
        for r in FP8_SCALE_RATIOS:
            s = base * r
            d = _widen_fp8((wc / s[:, None]).clamp_(-fmax, fmax).to(FP8)).mul_(s[:, None]).sub_(wc)
            e = d.pow_(2) @ col_weight
            better = e < best_e
            best_e, best = torch.where(better, e, best_e), torch.where(better, s, best)
        scales[i:i + rows] = best
    return scales


def _widen_fp8(q: torch.Tensor) -> torch.Tensor:
    """q (float8 E4M3) as float32. On the CPU through a 256-entry table indexed by int32:
    torch's own float8 cast there took 7.4 ms against 2.3 for the lookup on 4M values (2
    threads), and was most of the scale search's time. The same values either way."""
    if q.is_cuda:
        return q.float()
    return _fp8_table().index_select(0, q.view(torch.uint8).reshape(-1).int()).view(q.shape)


@functools.cache
def _fp8_table() -> torch.Tensor:
    return torch.arange(256, dtype=torch.uint8).view(FP8).float()


def fake_quantize_rows(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x rounded per row to `dtype`'s grid and back, in x's dtype: what a per-token
    quantized activation stands for."""
    q, scale = quantize_rows(x, dtype)
    return (q.float() * scale[:, None]).to(x.dtype)


class QuantizedRows(NamedTuple):
    """An activation [T, K] made only in its per-token quantized form (q [T, K] 8-bit,
    scale [T, 1] float32) by the kernel before a projection (kernels/fused.py's
    add_rms_norm with `quant` and silu_and_mul_quant, KernelConfig.fused_quant), for a
    QuantLinear that reads exactly that; `dtype` is the 16-bit dtype the rows stand for,
    the projection's output dtype. No 16-bit copy is written: nothing would read it."""

    q: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype


def quantizes_input(m: nn.Module) -> bool:
    """Whether `m` is a projection that may quantize its input (FP8 or W8A8)."""
    return isinstance(m, QuantLinear) and m.scheme.activation is not None


class QuantLinear(nn.Module):
    """y = x @ (weight * weight_scale[:, None]).T + bias, weight 8-bit [out, in]."""

    kernels: KernelConfig | None = None  # set on the Triton path (LlamaForCausalLM.use_kernels)

    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: QuantScheme,
                 device: torch.device | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.weight = nn.Parameter(torch.empty((out_features, in_features), dtype=scheme.weight, device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, dtype=torch.float32, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        self._dequantized: tuple | None = None  # the emulation's weight: (version, dtype, tensor)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, scheme: QuantScheme, col_weight: torch.Tensor | None = None) -> "QuantLinear":
        """`col_weight` [in_features]: FP8 scales searched with these column weights
        (search_fp8_scales); else amax/qmax per row."""
        w = linear.weight
        m = cls(w.shape[1], w.shape[0], linear.bias is not None, scheme, w.device, w.dtype)
        if col_weight is not None and scheme.weight == FP8:
            s = search_fp8_scales(w, col_weight)
            q = rows_to(w, s, FP8)
        else:
            q, s = quantize_rows(w, scheme.weight)
        m.weight.copy_(q)
        m.weight_scale.copy_(s)
        if linear.bias is not None:
            m.bias.copy_(linear.bias)
        return m

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.name}"

    def forward(self, x: torch.Tensor | QuantizedRows) -> torch.Tensor:
        if isinstance(x, QuantizedRows):
            if x.q.dtype != self.scheme.activation:  # the engine quantizes only for a projection that reads it
                raise ValueError(f"{self.scheme.name} projection given {x.q.dtype} rows; it reads {self.scheme.activation}")
            return self._dot_8bit(x.q, x.scale, x.dtype)
        if x.device.type == "cuda":
            return self._cuda(x)
        return self._emulate(x)

    def _emulate(self, x: torch.Tensor) -> torch.Tensor:
        cached = self._dequantized
        if cached is None or cached[0] != self.weight._version or cached[1] != x.dtype:
            w = (self.weight.float() * self.weight_scale[:, None]).to(x.dtype)
            cached = self._dequantized = (self.weight._version, x.dtype, w)
        if self.scheme.activation is not None:
            x = fake_quantize_rows(x.reshape(-1, x.shape[-1]), self.scheme.activation).reshape(x.shape)
        return F.linear(x, cached[2], self.bias)

    def _cuda(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        M = x.shape[0]
        kernels = self.kernels
        path = cuda_path(self.scheme.activation, M) if kernels is not None else "torch"
        act = self.input_quantization(M, kernels) if kernels is not None else self.scheme.activation
        if act is not None:
            xq, xs = quantize_activation(x, act, triton=kernels is not None, pdl=path == "skinny" and kernels.pdl)
            return self._dot_8bit(xq, xs, x.dtype).reshape(*shape[:-1], -1)
        if path == "skinny" and self.few_rows_fma(M, kernels):
            from worker.embedded.kernels.gemv import fma_projection

            y = fma_projection(x, self.weight, kernels, self.weight_scale, self.bias)
        elif path == "skinny":  # W8A16, or FP8 weights upcast
            from worker.embedded.kernels.qgemv import qgemv, qgemv_config

            bn, bk, nw, ns = qgemv_config(self.out_features, self.in_features, x.element_size())
            y = qgemv(x, self.weight, self.weight_scale, self.bias, block_n=bn, block_k=bk, num_warps=nw,
                      num_stages=ns, pdl=kernels.pdl, prefetch_bytes=kernels.l2_prefetch_bytes)
        elif path == "w8a16_mm":
            from worker.embedded.kernels.qgemv import w8a16_mm

            y = w8a16_mm(x.contiguous(), self.weight, self.weight_scale, self.bias)
        else:  # W8A16 over many rows: the 16-bit weight is made for the call (compute-bound)
            y = F.linear(x, self.weight.to(x.dtype)) * self.weight_scale.to(x.dtype)
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(*shape[:-1], -1)

    def _dot_8bit(self, xq: torch.Tensor, xs: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """x quantized per token (xq [M, K], xs [M, 1] float32) times the 8-bit weight, in
        out_dtype: our skinny kernel up to SKINNY_ROWS rows on the Triton path, else
        torch._scaled_mm (FP8) or torch._int_mm (int8)."""
        M, kernels = xq.shape[0], self.kernels
        if kernels is not None and cuda_path(self.scheme.activation, M) == "skinny":
            from worker.embedded.kernels.qgemv import qgemv, qgemv_config

            bn, bk, nw, ns = qgemv_config(self.out_features, self.in_features, 1)
            return qgemv(xq, self.weight, self.weight_scale, self.bias, xs, out_dtype=out_dtype, block_n=bn, block_k=bk,
                         num_warps=nw, num_stages=ns, pdl=kernels.pdl, prefetch_bytes=kernels.l2_prefetch_bytes)
        if xq.dtype == FP8:
            y = torch._scaled_mm(xq, self.weight.t(), scale_a=xs, scale_b=self.weight_scale[None, :], out_dtype=out_dtype)
        else:
            if M <= 16:  # torch._int_mm takes more than 16 rows
                xq = F.pad(xq, (0, 0, 0, 17 - M))
            y = (torch._int_mm(xq, self.weight.t())[:M].float() * xs * self.weight_scale[None, :]).to(out_dtype)
        return y + self.bias if self.bias is not None else y

    def few_rows_fma(self, rows: int, kernels: KernelConfig) -> bool:
        """Whether `rows` rows run kernels/gemv.py's gemv_fma (16-bit x, no activation
        quantization), as KernelConfig.one_row_matmul and fma_max_rows say."""
        from worker.embedded.kernels.gemv import fma_faster

        return self.scheme.activation in (None, FP8) and fma_faster(kernels, rows, self.out_features, eight_bit=True)

    def input_quantization(self, rows: int, kernels: KernelConfig) -> torch.dtype | None:
        """What an input of `rows` rows is quantized to on the Triton path; None where the
        kernel reads it 16-bit (W8A16, and FP8 weights upcast in the skinny kernel)."""
        act = self.scheme.activation
        if act == FP8 and cuda_path(act, rows) == "skinny" and (
                fp8_upcast(kernels.fp8_skinny_matmul, self.out_features, self.in_features) or self.few_rows_fma(rows, kernels)):
            return None
        return act


def cuda_path(activation: torch.dtype | None, rows: int) -> str:
    """Which kernel QuantLinear runs for `rows` rows on the Triton path: "skinny"
    (kernels/qgemv.py's qgemv), "w8a16_mm" (16-bit x, int8-weight-only) or "torch"
    (torch._scaled_mm, torch._int_mm, or the whole weight widened for cuBLAS)."""
    if rows <= SKINNY_ROWS:
        return "skinny"
    if activation is None and rows <= W8A16_MM_ROWS:
        return "w8a16_mm"
    return "torch"


# FP8 weights smaller than this many elements run W8A16 in the skinny kernel under
# fp8_skinny_matmul "auto": there the separate quantization kernel cost more than the
# 8-bit dot saved (Llama-3.2-1B's qkv and o_proj); from Llama-3-8B's o_proj (16M) up the
# 8-bit dot was as fast or faster (one H200: BENCHMARKS.md, 'FP8 and INT8 projections').
FP8_UPCAST_BELOW = 8 * 2**20


def fp8_upcast(choice: str, n: int, k: int) -> bool:
    """Whether an FP8 weight of [n, k] runs W8A16 (upcast) in the skinny kernel."""
    return choice == "upcast" or (choice == "auto" and n * k < FP8_UPCAST_BELOW)


def quantize_activation(x: torch.Tensor, dtype: torch.dtype, triton: bool,
                        pdl: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token quantization of x [M, K]: (q [M, K], scale [M, 1] float32); `pdl`: the
    Triton kernel's launch (quantize_rows)."""
    if triton:
        from worker.embedded.kernels.qgemv import quantize_rows as quantize_rows_kernel

        return quantize_rows_kernel(x.contiguous(), dtype, pdl)
    q, s = quantize_rows(x, dtype)
    return q, s[:, None]


def projections(model: nn.Module):
    """(parent module, attribute name, module) of every quantizable projection."""
    for layer in model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in PROJECTIONS:
                if hasattr(parent, name):
                    yield parent, name, getattr(parent, name)


# The Hugging Face names of the weights that the fused projections are made of.
CHECKPOINT_PROJECTIONS = tuple(f".{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                         "down_proj"))


def quantize_on_load(named, scheme: QuantScheme, dtype: torch.dtype, device: torch.device):
    """A 16/32-bit checkpoint's tensors (name, tensor), in `dtype` on `device`, with each
    projection weight quantized as it arrives (rows are independent, so q, k and v each
    alone) and followed by its `weight_scale`: what replace_with_empty's modules load, and
    the model in 16 bits never whole on the device."""
    for name, t in named:
        t = t.to(device=device, dtype=dtype)
        if name.endswith(CHECKPOINT_PROJECTIONS):
            q, s = quantize_rows(t, scheme.weight)
            yield name, q
            yield name.removesuffix("weight") + "weight_scale", s
        else:
            yield name, t


def replace_with_empty(model: nn.Module, scheme: QuantScheme) -> None:
    """Projections become QuantLinear modules of the same shapes, to be loaded with
    8-bit tensors (a checkpoint quantized beforehand, or quantize_on_load's)."""
    for parent, name, linear in projections(model):
        q = QuantLinear(linear.in_features, linear.out_features, linear.bias is not None, scheme,
                        linear.weight.device, linear.weight.dtype)
        setattr(parent, name, q)


@torch.no_grad()
def quantize_model(model: nn.Module, scheme: QuantScheme, col_weights: dict | None = None) -> None:
    """Quantize the loaded 16/32-bit projections in place (int8-smoothquant: after
    smoothquant.smooth_model; FP8 with `col_weights`, projection -> mean squared input per
    column, from smoothquant.input_mean_squares: searched scales), one projection's 16-bit
    copy freed at a time."""
    from tqdm import tqdm

    todo = list(projections(model))
    # Searched FP8 scales take seconds on a CPU (about 11 s for the default model on two threads): a bar.
    for parent, name, linear in tqdm(todo, desc="Quantizing projections", unit="proj", disable=None if col_weights else True):
        col_weight = col_weights.get(linear) if col_weights else None
        setattr(parent, name, QuantLinear.from_linear(linear, scheme, col_weight))
        del linear


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter (a tied embedding counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total
