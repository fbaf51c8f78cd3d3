"""ModelRunner: owns the model and its paged KV cache on one device, and turns a step's
scheduled chunks into tensors and the model's logits into sampled tokens."""

from __future__ import annotations

import logging

import torch

from worker.embedded.attention import AttentionMetadata, build_mask
from worker.embedded.llama import LlamaForCausalLM
from worker.embedded.sampler import SampleResult, sample
from worker.embedded.scheduler import ScheduledChunk
from worker.models.config import ModelConfig

log = logging.getLogger(__name__)


def kv_bytes_per_block(cfg: ModelConfig, tokens_per_block: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_layers * tokens_per_block * cfg.num_kv_heads * cfg.head_dim * elem


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, device: torch.device, dtype: torch.dtype, num_blocks: int, tokens_per_block: int):
        self.model = model
        self.config = model.config
        self.device = device
        self.dtype = dtype
        self.tokens_per_block = tokens_per_block
        c = self.config
        shape = (num_blocks, tokens_per_block, c.num_kv_heads, c.head_dim)
        self.kv_caches = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(c.num_layers)
        ]

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk], eos_token_ids: tuple[int, ...]) -> SampleResult | None:
        """One forward pass over the chunks; samples for the chunks that reach their end."""
        bs = self.tokens_per_block
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        q_lens: list[int] = []
        ctx_lens: list[int] = []
        tables: list[list[int]] = []
        logits_rows: list[int] = []
        for ch in chunks:
            seq, start, n = ch.seq, ch.seq.num_computed, ch.num_tokens
            tokens = seq.all_token_ids
            input_ids += tokens[start : start + n]
            pos = range(start, start + n)
            positions += pos
            slots += [seq.block_table[p // bs] * bs + p % bs for p in pos]
            q_lens.append(n)
            ctx_lens.append(start + n)
            tables.append(seq.block_table)
            if ch.sample:
                logits_rows.append(len(input_ids) - 1)
        B, max_q, max_ctx = len(chunks), max(q_lens), max(ctx_lens)
        width = max(len(t) for t in tables)
        table_t = torch.zeros((B, width), dtype=torch.long)
        query_index = torch.zeros((B, max_q), dtype=torch.long)
        query_valid = torch.zeros((B, max_q), dtype=torch.bool)
        row = 0
        for b, (t, n) in enumerate(zip(tables, q_lens)):
            table_t[b, : len(t)] = torch.tensor(t)
            query_index[b, :n] = torch.arange(row, row + n)
            query_valid[b, :n] = True
            row += n
        dev = self.device
        q_lens_t = torch.tensor(q_lens, device=dev)
        ctx_lens_t = torch.tensor(ctx_lens, device=dev)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, device=dev),
            block_tables=table_t.to(dev),
            context_lens=ctx_lens_t,
            query_index=query_index.to(dev),
            query_valid=query_valid.to(dev),
            attn_mask=build_mask(q_lens_t, ctx_lens_t, max_q, max_ctx),
            max_context_len=max_ctx,
        )
        logits = self.model(
            torch.tensor(input_ids, device=dev),
            torch.tensor(positions, device=dev),
            self.kv_caches,
            meta,
            torch.tensor(logits_rows, device=dev, dtype=torch.long),
        )
        if not logits_rows:
            return None
        return sample(logits, [ch.seq for ch in chunks if ch.sample], eos_token_ids)
