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
    from worker.embedded.kernels.gemv import (MAX_ROWS, RopeCache, gated_faster, gemv, gemv_config, gemv_gated_config,
                                              fma_faster, fma_projection)
except ImportError:  # no Triton here: the PyTorch path only
    add_rms_norm = rope_and_cache = silu_and_mul = silu_and_mul_quant = RopeCache = None
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
        return self.o_proj(self.attend(self.qkv_proj(x), positions, k_cache, v_cache, meta))

    def attend(self, qkv, positions, k_cache, v_cache, meta: AttentionMetadata, cached: bool = False) -> torch.Tensor:
        """Attention from the fused qkv projection's output, before o_proj: [T, q_size].
        cached: q and k are rotated and k and v are in the cache already (rope_cache)."""
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        kernels = self.kernels
        ks, vs = self.cache_scales(k_cache)
        if not cached:
            if kernels is not None:
                rope_and_cache(q, k, v, self.rotary.cos, self.rotary.sin, positions, meta.slot_mapping, k_cache, v_cache,
                               pdl=kernels.pdl, k_scale=ks, v_scale=vs)
            else:
                q, k = self.rotary(q, positions), self.rotary(k, positions)
                write_kv(k_cache, v_cache, k, v, meta.slot_mapping, ks, vs)
        out = paged_attention(q, k, v, k_cache, v_cache, meta, self.scale, pdl=kernels is not None and kernels.pdl,
                              k_scale=ks, v_scale=vs, decode_tile=(kernels.decode_tile or None) if kernels is not None else None)
        return out.reshape(-1, self.q_size)

    def cache_scales(self, k_cache: torch.Tensor) -> tuple[float, float]:
        """(k_scale, v_scale) of this layer's cache: calibrated for an FP8 cache, else 1."""
        return (self.k_scale, self.v_scale) if k_cache.dtype == torch.float8_e4m3fn else (1.0, 1.0)

    def rope_cache(self, positions, k_cache, v_cache, meta: AttentionMetadata) -> RopeCache:
        """What qkv_proj's one-row kernel needs to rotate q and k and write k and v to the
        cache itself (KernelConfig.one_row_rope)."""
        ks, vs = self.cache_scales(k_cache)
        return RopeCache(self.rotary.cos, self.rotary.sin, positions, meta.slot_mapping, k_cache, v_cache,
                         self.q_size, self.kv_size, self.head_dim, ks, vs)


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

    def one_row(self, x: torch.Tensor, norm_eps: float | None = None, add_to: torch.Tensor | None = None,
                gated: bool = False, rope: RopeCache | None = None) -> torch.Tensor:
        """One 16-bit row on the CUDA cores (gemv_fma), with the RMSNorm before it computed
        inside (norm_eps; its gain folded into this weight by fold_rms_norm) or the result
        added into the residual stream `add_to` in place, and for qkv_proj the rotary and the
        cache write in its epilogue (rope) (call only where one_row_fits)."""
        return fma_projection(x, self.weight, self.kernels, bias=self.bias, gated=gated, norm_eps=norm_eps, add_to=add_to,
                              rope=rope)

    def one_row_fits(self, kernels: KernelConfig, gated: bool = False) -> bool:
        """Whether one row of this projection runs gemv_fma under `kernels` (16-bit, not quantized)."""
        n = self.weight.shape[0] // 2 if gated else self.weight.shape[0]
        return type(self) is SkinnyLinear and self.weight.dtype in (torch.float16, torch.bfloat16) \
            and fma_faster(kernels, 1, n, gated=gated)

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

    def gated_gate_up(self) -> bool:
        """Whether a 16-bit gate_up's skinny kernels apply SiLU(gate) * up as they write
        (KernelConfig.fused_silu, where that measured faster: gated_faster)."""
        return self.kernels.fused_silu and gated_faster(*self.gate_up_proj.weight.shape)

    def forward(self, x):
        if self.kernels is not None:
            gate_up = self.gate_up_proj  # a QuantLinear once quantized: no gated path
            if isinstance(gate_up, SkinnyLinear) and gate_up.skinny(x) and self.gated_gate_up():
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

    def one_row(self, residual, positions, k_cache, v_cache, meta):
        """The layer for a step of one token once its norms are folded (fold_rms_norm): four
        CUDA-core projections that compute the norms before qkv and gate_up themselves and add
        o_proj's and down_proj's output into `residual` in place, so no norm kernel runs."""
        attn, mlp = self.self_attn, self.mlp
        rope = attn.rope_cache(positions, k_cache, v_cache, meta) if mlp.kernels.one_row_rope else None
        qkv = attn.qkv_proj.one_row(residual, norm_eps=self.input_layernorm.eps, rope=rope)
        attn.o_proj.one_row(attn.attend(qkv, positions, k_cache, v_cache, meta, cached=rope is not None), add_to=residual)
        eps = self.post_attention_layernorm.eps
        if mlp.gated_gate_up():
            h = mlp.gate_up_proj.one_row(residual, norm_eps=eps, gated=True)
        else:
            h = silu_and_mul(mlp.gate_up_proj.one_row(residual, norm_eps=eps), pdl=mlp.kernels.pdl)
        mlp.down_proj.one_row(h, add_to=residual)
        return residual

    def can_fold_norms(self, kernels: KernelConfig) -> bool:
        """Whether every projection of a one-token step runs gemv_fma under `kernels` (16-bit
        weights, not quantized), so that one_row can replace the norm kernels."""
        attn, mlp = self.self_attn, self.mlp
        gated = mlp.gated_gate_up()  # use_kernels has set mlp.kernels to these kernels already
        return (attn.qkv_proj.one_row_fits(kernels) and attn.o_proj.one_row_fits(kernels)
                and mlp.gate_up_proj.one_row_fits(kernels, gated=gated) and mlp.down_proj.one_row_fits(kernels))

    def fold_norms(self) -> None:
        """Fold the two RMSNorms' gains into the weights of qkv_proj and gate_up_proj (whose
        columns they scale) and set the gains to 1 (KernelConfig.fold_norms); the layer can
        then run one_row. Steps of more tokens keep the norm kernels, with unit gains. The
        folded weight is rounded once more to its dtype, where the normed activations were."""
        fold_rms_norm(self.input_layernorm, self.self_attn.qkv_proj)
        fold_rms_norm(self.post_attention_layernorm, self.mlp.gate_up_proj)


@torch.no_grad()
def fold_rms_norm(norm: RMSNorm, proj: nn.Linear) -> None:
    """proj(RMSNorm(x)) = proj'(x / rms(x)) with proj' = proj's weight times the norm's gain
    by column, computed in float32 and rounded once; the gain becomes 1."""
    w = proj.weight
    w.copy_((w.float() * norm.weight.float()[None, :]).to(w.dtype))
    norm.weight.fill_(1.0)


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
        self.norms_folded = False  # use_kernels: one-token steps run DecoderLayer.one_row

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        logits_rows: torch.Tensor | None,  # rows of [T] whose next-token logits are wanted; None: all
    ) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        if self.norms_folded and x.shape[0] == 1:  # one token: the layers' norms run inside the projections
            for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
                x = layer.one_row(x, positions, k_cache, v_cache, meta)  # the residual stream, updated in place
        else:
            for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
                x, residual = layer(x, residual, positions, k_cache, v_cache, meta)
        if logits_rows is not None:
            x, residual = x[logits_rows], None if residual is None else residual[logits_rows]
        x, _ = self.norm(x, residual)
        return self.lm_head(x)  # in the model's dtype: the sampler converts what it needs

    def use_kernels(self, kernels: KernelConfig | None) -> None:
        """Run the Triton kernels, launched as `kernels` says; None: plain PyTorch (the
        reference path). With KernelConfig.fold_norms, the layers' norm gains are folded into
        the projections after them, once, where one-token steps can then skip the norm
        kernels (DecoderLayer.fold_norms); the weights stay folded if the kernels go."""
        for m in self.modules():
            if isinstance(m, (RMSNorm, Attention, SkinnyLinear, QuantLinear, MLP)):
                m.kernels = kernels
        # Without kernels, folded weights are still right, with their unit gains.
        self.norms_folded = bool(kernels and kernels.fold_norms and all(layer.can_fold_norms(kernels) for layer in self.layers))
        if self.norms_folded:
            for layer in self.layers:
                layer.fold_norms()  # a second time multiplies by unit gains: no change
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
