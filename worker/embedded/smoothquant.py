"""SmoothQuant (Xiao et al., 2023) for int8-smoothquant: per input channel j of a
projection, s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), X_j divided by s_j and W's
column j multiplied by it, so that per-token int8 activations lose less to the few
channels with outliers. The migration strength alpha is chosen per projection among
ALPHAS, as the one whose W8A8 product is closest to the exact one over the calibration
inputs (the paper picks one alpha per model the same way; on the default model the
per-projection choice measured better than 0.5 for all: BENCHMARKS.md). The division is folded into whatever produces X, so it costs
nothing at run time and the model computes the same function before quantization:
- qkv_proj: the input RMSNorm's weight; gate_up_proj: the post-attention RMSNorm's;
- down_proj: the up half of gate_up's rows (silu(gate) * up is linear in up);
- o_proj: v_proj's rows (attention output is linear in v); with grouped-query attention
  a v channel feeds one channel of every query head of its group, so the group shares
  one factor (from the group's largest |X| and |W|).
X comes from running the 16-bit model over calibration prompts (calibration_token_ids)
before it is quantized."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from worker.embedded.attention import AttentionMetadata, build_mask

log = logging.getLogger(__name__)

ALPHA = 0.5  # the paper's default migration strength
ALPHAS = (0.5, 0.6, 0.7, 0.8, 0.9)  # searched per projection when none is fixed (0.3, 0.4: never chosen on the default model)

# A small fixed calibration set: chat-like text in the languages and kinds the tests ask.
CALIBRATION_TEXTS = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nThe capital of France is Paris.",
    "The history of the Roman Empire spans more than a thousand years, from the founding of the city "
    "to the fall of Constantinople in 1453. Its roads, laws and language shaped Europe.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
    "print([fibonacci(i) for i in range(10)])",
    "<|im_start|>user\n请用中文介绍一下长城的历史。<|im_end|>\n<|im_start|>assistant\n"
    "长城是中国古代的军事防御工程，始建于春秋战国时期，秦朝统一后连接成万里长城。",
    "Photosynthesis converts light energy into chemical energy: plants take in carbon dioxide and water "
    "and, using sunlight, produce glucose and oxygen. 1 + 1 = 2, 12 * 12 = 144.",
    "<|im_start|>user\nWrite a short poem about the sea.<|im_end|>\n<|im_start|>assistant\n"
    "The sea is wide, the sea is deep,\nIt sings the sailors off to sleep.",
)


def calibration_token_ids(tokenizer_file: Path | None, vocab_size: int) -> list[list[int]]:
    """CALIBRATION_TEXTS tokenized with the model's tokenizer.json; without one (random
    weights), seeded random ids of the same lengths: any input calibrates random weights."""
    if tokenizer_file is not None and Path(tokenizer_file).exists():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tokenizer_file))
        return [tok.encode(t, add_special_tokens=False).ids for t in CALIBRATION_TEXTS]
    if tokenizer_file is not None:
        log.warning("%s not found: calibration (int8-smoothquant's smoothing, an FP8 KV cache's scales) runs on "
                    "random token ids, which may calibrate a trained model poorly", tokenizer_file)
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab_size, (64,), generator=gen).tolist() for _ in CALIBRATION_TEXTS]


def prompt_caches(model: nn.Module, tokens: int, dtype: torch.dtype | None = None) -> list:
    """Zeroed (k, v) caches of one block holding `tokens` tokens, one a layer, for
    forward_prompt: [1, tokens, kv heads, head dim] of `dtype` (default the model's)."""
    p = next(model.parameters())
    cfg = model.config
    shape = (1, tokens, cfg.num_kv_heads, cfg.head_dim)
    return [(torch.zeros(shape, dtype=dtype or p.dtype, device=p.device),
             torch.zeros(shape, dtype=dtype or p.dtype, device=p.device)) for _ in range(cfg.num_layers)]


@torch.no_grad()
def forward_prompt(model: nn.Module, ids: list[int], every_position: bool = False,
                   kv_dtype: torch.dtype | None = None, caches: list | None = None) -> torch.Tensor:
    """The model over one prompt, on the reference attention path with a KV cache of one
    block that holds it (of `kv_dtype`, default the model's: every position attends to the
    cache's values; or `caches`, one (k, v) of [1, len(ids), kv heads, head dim] a layer,
    which then hold the prompt's keys and values): the last position's logits [1, V], or
    every position's [T, V]."""
    p = next(model.parameters())
    T = len(ids)
    if caches is None:
        caches = prompt_caches(model, T, kv_dtype)
    rows = torch.arange(T, device=p.device)
    lens = torch.tensor([T], device=p.device)
    meta = AttentionMetadata(slot_mapping=rows, attention="reference",
                             block_tables=torch.zeros((1, 1), dtype=torch.long, device=p.device),
                             query_index=rows[None], query_valid=torch.ones((1, T), dtype=torch.bool, device=p.device),
                             attn_mask=build_mask(lens, lens, T, T), max_context_len=T)
    return model(torch.tensor(ids, device=p.device), rows, caches, meta, None if every_position else rows[-1:])


def _each_projection_input(model: nn.Module, prompts: list[list[int]], record) -> None:
    """Run the model over the prompts, calling record(projection, x [tokens, in_features]
    float32) with every projection's input."""
    hooks = [linear.register_forward_pre_hook(lambda m, args: record(m, args[0].reshape(-1, args[0].shape[-1]).float()))
             for layer in model.layers
             for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)]
    try:
        for ids in prompts:
            forward_prompt(model, ids)
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def activation_samples(model: nn.Module, prompts: list[list[int]]) -> dict[nn.Module, torch.Tensor]:
    """Every projection's input over the calibration tokens, [tokens, in_features] float32."""
    samples: dict[nn.Module, list[torch.Tensor]] = {}
    _each_projection_input(model, prompts, lambda m, x: samples.setdefault(m, []).append(x))
    return {m: torch.cat(xs) for m, xs in samples.items()}


@torch.no_grad()
def input_mean_squares(model: nn.Module, prompts: list[list[int]]) -> dict[nn.Module, torch.Tensor]:
    """Every projection's mean squared input per column over the prompts' tokens,
    [in_features] float32 (kept as running sums: nothing grows with the prompts)."""
    sums: dict[nn.Module, list] = {}

    def record(m, x):
        acc = sums.setdefault(m, [torch.zeros(x.shape[-1], device=x.device), 0])
        acc[0] += x.pow(2).sum(0)
        acc[1] += x.shape[0]

    _each_projection_input(model, prompts, record)
    return {m: total / max(count, 1) for m, (total, count) in sums.items()}


def smoothing_factors(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    """s_j = x_max_j^alpha / w_max_j^(1 - alpha); 1 where a channel never saw input."""
    s = x_max.clamp(min=1e-5).pow(alpha) / w_max.float().clamp(min=1e-5).pow(1 - alpha)
    return torch.where(x_max > 0, s, torch.ones_like(s)).clamp(min=1e-5)


def w8a8_error(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, exact: torch.Tensor | None = None) -> float:
    """Squared error of x @ w.T (`exact`, if already computed) in W8A8 after smoothing by
    s (x / s per token to int8, w * s per output channel to int8)."""
    from worker.embedded.quant import fake_quantize_rows, quantize_rows

    q, scale = quantize_rows(w * s, torch.int8)
    if exact is None:
        exact = x @ w.T
    return (fake_quantize_rows(x / s, torch.int8) @ (q.float() * scale[:, None]).T - exact).pow(2).sum().item()


def choose_factors(x: torch.Tensor, w: torch.Tensor, alpha: float | None, group=None) -> torch.Tensor:
    """A projection's smoothing factors (input x [T, K] float32, weight w [N, K]): with
    `alpha`, that migration strength; without, the one of ALPHAS whose W8A8 result is
    closest to the exact one on these calibration inputs. `group` (factors of one
    shared value per group of channels) folds maxima into and expands factors out of the
    groups."""
    fold, expand = group if group is not None else (lambda t: t, lambda t: t)
    w = w.float()
    x_max, w_max = fold(x.abs().amax(0)), fold(w.abs().amax(0))
    candidates = [alpha] if alpha is not None else ALPHAS
    factors = [expand(smoothing_factors(x_max, w_max, a)) for a in candidates]
    if len(factors) == 1:
        return factors[0]
    exact = x @ w.T
    return min(factors, key=lambda s: w8a8_error(x, w, s, exact))


@torch.no_grad()
def smooth_model(model: nn.Module, prompts: list[list[int]], alpha: float | None = None) -> None:
    """Smooth every layer's four projections in place (module docstring); `alpha` fixes
    the migration strength, else each projection gets its own from ALPHAS."""
    samples = activation_samples(model, prompts)
    cfg = model.config
    q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    group = cfg.num_heads // cfg.num_kv_heads
    heads = (lambda t: t.view(cfg.num_kv_heads, group, cfg.head_dim).amax(1).reshape(-1),  # one value per v channel
             lambda s: s.view(cfg.num_kv_heads, 1, cfg.head_dim).expand(-1, group, -1).reshape(-1))
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for norm, proj in ((layer.input_layernorm, attn.qkv_proj), (layer.post_attention_layernorm, mlp.gate_up_proj)):
            s = choose_factors(samples[proj], proj.weight, alpha)
            norm.weight.div_(s.to(norm.weight.dtype))
            proj.weight.mul_(s.to(proj.weight.dtype))
        # down_proj, folded into up's rows.
        down, inter = mlp.down_proj, cfg.intermediate_size
        s = choose_factors(samples[down], down.weight, alpha)
        mlp.gate_up_proj.weight[inter:].div_(s[:, None].to(down.weight.dtype))
        down.weight.mul_(s.to(down.weight.dtype))
        # o_proj, folded into v's rows; one factor per v channel, shared by its query heads.
        o = attn.o_proj
        s_o = choose_factors(samples[o], o.weight, alpha, heads)
        s_v = s_o.view(cfg.num_kv_heads, group, cfg.head_dim)[:, 0].reshape(-1)
        v_rows = slice(q_size + kv_size, q_size + 2 * kv_size)
        attn.qkv_proj.weight[v_rows].div_(s_v[:, None].to(o.weight.dtype))
        if attn.qkv_proj.bias is not None:
            attn.qkv_proj.bias[v_rows].div_(s_v.to(o.weight.dtype))
        o.weight.mul_(s_o.to(o.weight.dtype))
