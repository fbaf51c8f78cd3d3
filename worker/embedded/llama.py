"""Llama-family decoder (Llama incl. llama3 rope scaling, Mistral, Qwen2, SmolLM) in plain
PyTorch, over a paged KV cache. q/k/v and gate/up projections are fused at load time.
On the Triton path (`use_kernels`) the norms, rotary, SiLU and small-batch projections
run our Triton kernels, launched as the KernelConfig says."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from worker.embedded.attention import AttentionMetadata, paged_attention, write_kv
from worker.embedded.quant import SKINNY_ROWS, QuantizedRows, QuantLinear, quantizes_input

try:
    from worker.embedded.kernels.fused import add_rms_norm, rope_and_cache, silu_and_mul, silu_and_mul_quant
    from worker.embedded.kernels.gemv import MAX_ROWS, gated_faster, gemv, gemv_config, gemv_gated_config, fma_faster, fma_projection
except ImportError:  # no Triton here: the PyTorch path only
    add_rms_norm = rope_and_cache = silu_and_mul = silu_and_mul_quant = None
from models.config import ModelConfig
from worker.engine_api import KernelConfig


# The SiLU kernel quantizes for down_proj (one program a row) only in steps of more rows
# than this: at one row it was slower than the SiLU kernel and the separate quantization
# (run 19); past the skinny kernel's rows there are programs for every SM, and it saves the
# 16-bit intermediate's write and read.
SILU_QUANT_MIN_ROWS = SKINNY_ROWS


class RMSNorm(nn.Module):
    """RMSNorm of (x + residual); returns it and the new residual stream."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.kernels: KernelConfig | None = None  # set on the Triton path: the fused kernel
        # Set on the Triton path where the projection after this norm may quantize its input
        # (KernelConfig.fused_quant): its input_quantization, a bound method (a module here
        # would be registered as this one's child). The kernel quantizes its output for the
        # projection in the steps whose row count has it quantize.
        self.next_quantization: Callable[[int, KernelConfig], torch.dtype | None] | None = None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """(RMSNorm(x + residual), x + residual); the first a QuantizedRows where the
        projection it feeds quantizes x."""
        if self.kernels is not None:
            quant = self.next_quantization(x.shape[0], self.kernels) if self.next_quantization is not None else None
            out, res = add_rms_norm(x, self.weight, self.eps, residual, pdl=self.kernels.pdl, quant=quant)
            return (QuantizedRows(*out, x.dtype) if quant is not None else out), res
        if residual is not None:
            x = x + residual
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype), x


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind not in (None, "default"):
        raise ValueError(f"rope_scaling type {kind!r} is not supported")
    return inv_freq


class Rotary(nn.Module):
    """Rotary embedding in the rotate-half layout Hugging Face checkpoints use."""

    def __init__(self, cfg: ModelConfig, max_positions: int):
        super().__init__()
        self.cfg, self.max_positions = cfg, max_positions
        self.register_buffer("cos", torch.empty(max_positions, cfg.head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(max_positions, cfg.head_dim // 2), persistent=False)
        self.build()

    def build(self) -> None:
        """(Re)compute the tables on their current device (after meta-device creation)."""
        if self.cos.is_meta:
            return
        t = torch.arange(self.max_positions, dtype=torch.float32)
        freqs = torch.outer(t, rope_inv_freq(self.cfg))
        self.cos = freqs.cos().to(self.cos.device)
        self.sin = freqs.sin().to(self.sin.device)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # x: [T, H, D]
        cos = self.cos[positions][:, None, :]
        sin = self.sin[positions][:, None, :]
        x1, x2 = x.float().chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return out.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: Rotary):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = SkinnyLinear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = SkinnyLinear(self.q_size, cfg.hidden_size, bias=False)
        self.rotary = rotary
        self.scale = cfg.head_dim**-0.5
        self.kernels: KernelConfig | None = None  # set on the Triton path: the rotary-and-cache kernel
        # An FP8 cache holds keys / k_scale and values / v_scale (kv_quant.calibrate_kv_scales);
        # a 16- or 32-bit cache holds them as they are.
        self.k_scale = self.v_scale = 1.0

    def forward(self, x, positions, k_cache, v_cache, meta: AttentionMetadata):
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        kernels = self.kernels
        ks, vs = (self.k_scale, self.v_scale) if k_cache.dtype == torch.float8_e4m3fn else (1.0, 1.0)
        if kernels is not None:
            rope_and_cache(q, k, v, self.rotary.cos, self.rotary.sin, positions, meta.slot_mapping, k_cache, v_cache,
                           pdl=kernels.pdl, k_scale=ks, v_scale=vs)
        else:
            q, k = self.rotary(q, positions), self.rotary(k, positions)
            write_kv(k_cache, v_cache, k, v, meta.slot_mapping, ks, vs)
        out = paged_attention(q, k, v, k_cache, v_cache, meta, self.scale, pdl=kernels is not None and kernels.pdl,
                              k_scale=ks, v_scale=vs, decode_tile=(kernels.decode_tile or None) if kernels is not None else None,
                              rows_outer=kernels is not None and kernels.decode_order == "longest-first")
        return self.o_proj(out.reshape(-1, self.q_size))


class SkinnyLinear(nn.Linear):
    """nn.Linear that, on the Triton path, runs decode-sized inputs (at most 16 rows,
    16-bit) through our skinny-matmul kernel: with cold L2 it measured faster than cuBLAS
    on each of Llama-3.2-1B's projections, most on down_proj, where cuBLAS split K and
    reduced in a second kernel (BENCHMARKS.md, decode latency, run 5; bench/gemv_tune.py),
    and on an H200 on the vocabulary's lm_head and Llama-3-8B's gate_up too (run 18)."""

    kernels: KernelConfig | None = None  # set on the Triton path

    def skinny(self, x: torch.Tensor) -> bool:
        """Whether `x` goes to our kernel rather than cuBLAS."""
        return self.kernels is not None and x.dim() == 2 and x.shape[0] <= MAX_ROWS and x.dtype != torch.float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.skinny(x):
            if fma_faster(self.kernels, x.shape[0], self.weight.shape[0]):
                return fma_projection(x, self.weight, self.kernels, bias=self.bias)
            return gemv(x, self.weight, self.bias, *gemv_config(*self.weight.shape),
                        pdl=self.kernels.pdl, prefetch_bytes=self.kernels.l2_prefetch_bytes)
        return super().forward(x)

    def gated(self, x: torch.Tensor) -> torch.Tensor:
        """SiLU(gate) * up of this fused [gate; up] projection, from one skinny-matmul
        launch (call only where skinny(x))."""
        n, k = self.weight.shape[0] // 2, self.weight.shape[1]
        if fma_faster(self.kernels, x.shape[0], n, gated=True):
            return fma_projection(x, self.weight, self.kernels, gated=True)
        return gemv(x, self.weight, None, *gemv_gated_config(n, k),
                    pdl=self.kernels.pdl, prefetch_bytes=self.kernels.l2_prefetch_bytes, gated=True)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = SkinnyLinear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = SkinnyLinear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.kernels: KernelConfig | None = None  # set on the Triton path: the SiLU-and-multiply kernel
        # As RMSNorm.next_quantization, for down_proj's input: the SiLU kernel quantizes
        # its output in steps of more than SILU_QUANT_MIN_ROWS rows that down_proj reads
        # quantized.
        self.next_quantization: Callable[[int, KernelConfig], torch.dtype | None] | None = None

    def forward(self, x):
        if self.kernels is not None:
            gate_up = self.gate_up_proj  # a QuantLinear once quantized: no gated path
            if self.kernels.fused_silu and isinstance(gate_up, SkinnyLinear) and gate_up.skinny(x) \
                    and gated_faster(*gate_up.weight.shape):
                return self.down_proj(gate_up.gated(x))
            h = gate_up(x)
            rows = h.shape[0]
            quant = self.next_quantization(rows, self.kernels) \
                if self.next_quantization is not None and rows > SILU_QUANT_MIN_ROWS else None
            if quant is not None:
                return self.down_proj(QuantizedRows(*silu_and_mul_quant(h, quant, pdl=self.kernels.pdl), h.dtype))
            return self.down_proj(silu_and_mul(h, pdl=self.kernels.pdl))
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: Rotary):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, rotary)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, residual, positions, k_cache, v_cache, meta):
        h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, positions, k_cache, v_cache, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int):
        super().__init__()
        self.config = cfg
        # Not initialised: every user loads or draws the weights (the engine builds on meta). A
        # random init on meta runs torch's Python reference for normal_, whose first call
        # imports torch._dynamo: seconds at every worker's start.
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.rotary = Rotary(cfg, max_positions)  # one table, shared by every layer
        self.layers = nn.ModuleList(DecoderLayer(cfg, self.rotary) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = SkinnyLinear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        logits_rows: torch.Tensor | None,  # rows of [T] whose next-token logits are wanted; None: all
    ) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, positions, k_cache, v_cache, meta)
        if logits_rows is not None:
            x, residual = x[logits_rows], residual[logits_rows]
        x, _ = self.norm(x, residual)
        return self.lm_head(x)  # in the model's dtype: the sampler converts what it needs

    def use_kernels(self, kernels: KernelConfig | None) -> None:
        """Run the Triton kernels, launched as `kernels` says; None: plain PyTorch (the
        reference path)."""
        for m in self.modules():
            if isinstance(m, (RMSNorm, Attention, SkinnyLinear, QuantLinear, MLP)):
                m.kernels = kernels
        fuse = kernels is not None and kernels.fused_quant
        for layer in self.layers:
            for before, proj in ((layer.input_layernorm, layer.self_attn.qkv_proj),
                                 (layer.post_attention_layernorm, layer.mlp.gate_up_proj), (layer.mlp, layer.mlp.down_proj)):
                before.next_quantization = proj.input_quantization if fuse and quantizes_input(proj) else None

    @torch.no_grad()
    def load_hf_weights(self, named_tensors) -> None:
        """Copy Hugging Face-named tensors in, fusing q/k/v and gate/up on the way."""
        params = dict(self.named_parameters())
        fused = {
            "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
            "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
        }
        seen: set[str] = set()
        for name, tensor in named_tensors:
            name = name.removeprefix("model.")
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            parts = name.split(".")
            if len(parts) >= 2 and parts[-2] in fused:
                target, shard = fused[parts[-2]]
                pname = ".".join(parts[:-2] + [target, parts[-1]])
                param = params[pname]
                sizes = self._shard_sizes(target)
                start = sum(sizes[:shard])
                param[start : start + sizes[shard]].copy_(tensor)
                seen.add(f"{pname}#{shard}")
            else:
                if name not in params:
                    raise KeyError(f"unexpected weight {name}")
                params[name].copy_(tensor)
                seen.add(name)
        expected = set()
        for pname in params:
            if ".qkv_proj." in pname:
                expected |= {f"{pname}#{i}" for i in range(3)}
            elif ".gate_up_proj." in pname:
                expected |= {f"{pname}#{i}" for i in range(2)}
            else:
                expected.add(pname)
        missing = expected - seen
        if missing:
            raise KeyError(f"missing weights: {sorted(missing)[:5]}{'...' if len(missing) > 5 else ''}")

    def _shard_sizes(self, target: str) -> list[int]:
        c = self.config
        if target == "qkv_proj":
            return [c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim]
        return [c.intermediate_size, c.intermediate_size]
