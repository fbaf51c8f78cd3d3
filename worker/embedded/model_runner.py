"""ModelRunner: owns the model and its paged KV cache on one device, turns a step's
scheduled chunks into tensors, runs the model (replaying a CUDA graph for decode-only
steps on the GPU) and samples."""

from __future__ import annotations

import bisect
import functools
import logging
import os
from typing import Callable

import numpy as np
import torch

from worker.embedded.attention import AttentionMetadata, PrefillSegment, build_mask, varlen_available
from worker.embedded.llama import LlamaForCausalLM
from worker.embedded.sampler import DeviceSample, sample_async
from worker.embedded.scheduler import ScheduledChunk
from worker.embedded.sequence import Sequence
from models.config import ModelConfig
from worker.engine_api import EngineConfigError, KernelConfig

log = logging.getLogger(__name__)

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


def kv_bytes_per_block(cfg: ModelConfig, tokens_per_block: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_layers * tokens_per_block * cfg.num_kv_heads * cfg.head_dim * elem


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _replay_graph(graph: torch.cuda.CUDAGraph, logits: torch.Tensor, inputs: tuple) -> torch.Tensor:
    """Replay a captured step; `inputs` rides along only to keep the graph's inputs alive."""
    graph.replay()
    return logits


def _take_pending(input_ids: torch.Tensor, src: torch.Tensor, token_buf: torch.Tensor) -> torch.Tensor:
    """Input ids with the rows whose token is still on the device (src >= 0: its row in
    the last step's sampled tokens) read from there, without the host waiting for it."""
    return torch.where(src >= 0, token_buf[src.clamp(min=0)], input_ids)


class GraphInputs:
    """Every input of the captured decode graphs, as named views into one flat int64
    buffer: `rows` each of token ids, positions, cache slots, context lengths and pending
    token rows (see _take_pending), then a rows x width block table. The device buffer and
    its pinned host twins (numpy views) share this layout, so one copy of the first
    `used(batch)` values moves a step's inputs."""

    def __init__(self, buf: torch.Tensor | np.ndarray, rows: int, width: int):
        self.buf, self.rows, self.width = buf, rows, width
        self.token_ids, self.positions, self.slots, self.context_lens, self.pending_rows = (
            buf[i * rows : (i + 1) * rows] for i in range(5))
        self.tables = buf[5 * rows :].reshape(rows, width)

    @staticmethod
    def size(rows: int, width: int) -> int:
        return 5 * rows + rows * width

    def used(self, batch: int) -> int:
        """Values up to the last table row of `batch` sequences: the rest need not travel."""
        return 5 * self.rows + batch * self.width


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, device: torch.device, dtype: torch.dtype, num_blocks: int,
                 tokens_per_block: int, max_seq_len: int, max_batch_size: int, cuda_graphs: bool, kernels: KernelConfig):
        self.model = model
        self.config = model.config
        self.device = device
        self.dtype = dtype
        self.tokens_per_block = tokens_per_block
        self.kernels = kernels
        # The attention path, resolved: "triton" (our kernels, CUDA graphs) or "reference".
        if kernels.attention == "auto":
            self.attention = "triton" if device.type == "cuda" and triton_available() else "reference"
        else:
            self.attention = kernels.attention
        if self.attention == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise EngineConfigError(f"attention=triton runs on CUDA devices (or in Triton's interpreter, TRITON_INTERPRET=1), "
                                    f"not on {device}; use attention=reference or auto")
        model.use_kernels(kernels if self.attention == "triton" else None)
        # One varlen flash-attention call for a step's prefills (GPU, 16-bit, a torch that has it).
        self.varlen = (self.attention == "triton" and device.type == "cuda" and kernels.varlen_prefill
                       and varlen_available(dtype))
        self.argmax = None
        if self.attention == "triton":
            from worker.embedded.kernels.argmax import argmax_rows

            self.argmax = argmax_rows
        if device.type == "cuda":
            # cuDNN's SDPA builds a plan on the CPU for every new sequence length, costly at
            # every prefill (BENCHMARKS.md, kernel choices, 'cuDNN SDPA off'); flash and
            # memory-efficient attention need none.
            torch.backends.cuda.enable_cudnn_sdp(False)
        c = self.config
        # One scratch block past the pool's: padding rows of captured graphs write there.
        shape = (num_blocks + 1, tokens_per_block, c.num_kv_heads, c.head_dim)
        self.kv_caches = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(c.num_layers)
        ]
        self.scratch_slot = num_blocks * tokens_per_block
        # The last step's sampled tokens stay here on the device, so the next step can use
        # them as inputs before the host has seen them (overlap scheduling).
        self.token_buf = torch.zeros(max(max_batch_size, 1), dtype=torch.long, device=device)
        self.max_blocks_per_seq = -(-max_seq_len // tokens_per_block)
        self.graphs: dict[int, Callable[[], torch.Tensor]] = {}  # batch size -> replay, giving logits
        self.graph_sizes: list[int] = []
        self.steps_graph = self.steps_eager = 0  # forward passes by how they ran
        if self.attention == "triton" and device.type == "cuda":
            self._compile_split_variants()
        if cuda_graphs and self.attention == "triton":
            self._capture([b for b in GRAPH_BATCH_SIZES if b <= max_batch_size] or [1])

    def _compile_split_variants(self) -> None:
        """Compile the paged-decode kernel for every split count now: eager steps pick one
        by their decode count, and a first compile inside a step stalls it (BENCHMARKS.md,
        offline throughput, run 5). Both launch kinds: small batches launch with PDL,
        larger ones without (pdl_on)."""
        from worker.embedded.kernels import pdl
        from worker.embedded.kernels.paged_decode import paged_decode_attention

        c, dev = self.config, self.device
        k_cache, v_cache = self.kv_caches[0]
        for batch in (1, pdl.MAX_ROWS + 1):
            q = torch.zeros((batch, c.num_heads, c.head_dim), dtype=self.dtype, device=dev)
            table = torch.zeros((batch, 1), dtype=torch.int32, device=dev)
            ctx = torch.ones(batch, dtype=torch.int32, device=dev)
            for splits in (1, 2, 4, 8, 16, 32):
                paged_decode_attention(q, k_cache, v_cache, table, ctx, 1.0, splits=splits, pdl=self.kernels.pdl)

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk], eos_token_ids: tuple[int, ...]) -> tuple[DeviceSample | None, list[Sequence]]:
        """Queue one forward pass and sampling for the chunks that reach their end; nothing
        waits for the device. Returns the sampled sequences in the order of the sample's
        rows; a decode whose input token is pending reads it from the last step's rows."""
        # Decodes first: the GPU path's kernels take them as one leading block of rows.
        chunks = sorted(chunks, key=lambda ch: ch.num_tokens != 1)
        sampled = [ch.seq for ch in chunks if ch.sample]
        decode_only = chunks[-1].num_tokens == 1
        if decode_only and self.graph_sizes and len(chunks) <= self.graph_sizes[-1]:
            logits = self._replay(chunks)
            self.steps_graph += 1
        else:
            logits = self._eager(chunks)
            self.steps_eager += 1
        if not sampled:
            return None, []
        result = sample_async(logits, sampled, eos_token_ids, self.argmax)
        self.token_buf[: len(sampled)].copy_(result.tokens)
        return result, sampled

    @staticmethod
    def _input_token(seq: Sequence, pos: int) -> tuple[int, int]:
        """(token id, -1) when the host knows token pos, else (0, its token-buffer row)."""
        if pos < seq.num_known:
            return seq.token_at(pos), -1
        return 0, seq.pending_row

    def _eager(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        bs = self.tokens_per_block
        dev = self.device
        input_ids: list[int] = []
        pending_src: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        q_lens: list[int] = []
        ctx_lens: list[int] = []
        logits_rows: list[int] = []
        for ch in chunks:
            seq, start, n = ch.seq, ch.seq.num_computed, ch.num_tokens
            if n > 1:  # a prefill chunk: every token is known
                input_ids += seq.all_token_ids[start : start + n]
                pending_src += [-1] * n
            else:
                token, src = self._input_token(seq, start)
                input_ids.append(token)
                pending_src.append(src)
            positions += range(start, start + n)
            table = seq.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(start, start + n)]
            q_lens.append(n)
            ctx_lens.append(start + n)
            if ch.sample:
                logits_rows.append(len(input_ids) - 1)
        meta = AttentionMetadata(slot_mapping=torch.tensor(slots, device=dev), attention=self.attention)
        if self.attention == "triton":
            n_dec = sum(1 for n in q_lens if n == 1)
            meta.num_decodes = n_dec
            if n_dec:
                width = max(len(ch.seq.block_table) for ch in chunks[:n_dec])
                tables = torch.zeros((n_dec, width), dtype=torch.int32)
                for i, ch in enumerate(chunks[:n_dec]):
                    tables[i, : len(ch.seq.block_table)] = torch.tensor(ch.seq.block_table, dtype=torch.int32)
                meta.decode_tables = tables.to(dev, non_blocking=True)
                meta.decode_context_lens = torch.tensor(ctx_lens[:n_dec], dtype=torch.int32, device=dev)
            row = n_dec
            for ch, n, ctx in zip(chunks[n_dec:], q_lens[n_dec:], ctx_lens[n_dec:]):
                table = torch.tensor(ch.seq.block_table[: -(-ctx // bs)], device=dev)
                meta.prefills.append(PrefillSegment(row, n, ctx, table))
                row += n
            if meta.prefills and self.varlen:
                offsets = [seg.start - n_dec for seg in meta.prefills] + [row - n_dec]
                meta.prefill_cu_seq = torch.tensor(offsets, dtype=torch.int32, device=dev)
                meta.prefill_max_len = max(q_lens[n_dec:])
        else:
            self._reference_meta(meta, chunks, q_lens, ctx_lens)
        ids = torch.tensor(input_ids, device=dev)
        if any(src >= 0 for src in pending_src):
            ids = _take_pending(ids, torch.tensor(pending_src, device=dev), self.token_buf)
        return self.model(
            ids,
            torch.tensor(positions, device=dev),
            self.kv_caches,
            meta,
            torch.tensor(logits_rows, device=dev, dtype=torch.long),
        )

    def _reference_meta(self, meta: AttentionMetadata, chunks, q_lens: list[int], ctx_lens: list[int]) -> None:
        B, max_q, max_ctx = len(chunks), max(q_lens), max(ctx_lens)
        width = max(len(ch.seq.block_table) for ch in chunks)
        table_t = torch.zeros((B, width), dtype=torch.long)
        query_index = torch.zeros((B, max_q), dtype=torch.long)
        query_valid = torch.zeros((B, max_q), dtype=torch.bool)
        row = 0
        for b, (ch, n) in enumerate(zip(chunks, q_lens)):
            table_t[b, : len(ch.seq.block_table)] = torch.tensor(ch.seq.block_table)
            query_index[b, :n] = torch.arange(row, row + n)
            query_valid[b, :n] = True
            row += n
        dev = self.device
        q_lens_t = torch.tensor(q_lens, device=dev)
        ctx_lens_t = torch.tensor(ctx_lens, device=dev)
        meta.block_tables = table_t.to(dev)
        meta.query_index = query_index.to(dev)
        meta.query_valid = query_valid.to(dev)
        meta.attn_mask = build_mask(q_lens_t, ctx_lens_t, max_q, max_ctx)
        meta.max_context_len = max_ctx

    # CUDA graphs for decode-only steps.

    def _capture(self, sizes: list[int]) -> None:
        G, W, dev = max(sizes), self.max_blocks_per_seq, self.device
        # The graph inputs are filled by one copy per step from a pinned host twin. Two
        # host twins take turns: with overlap scheduling the host fills the next step's
        # while the last one's copy may still wait in the stream.
        self.g_inputs = GraphInputs(torch.zeros(GraphInputs.size(G, W), dtype=torch.long, device=dev), G, W)
        h_bufs = [torch.zeros(GraphInputs.size(G, W), dtype=torch.long) for _ in range(2)]
        if dev.type == "cuda":
            h_bufs = [h.pin_memory() for h in h_bufs]
        self.h_twins = [(h, GraphInputs(h.numpy(), G, W)) for h in h_bufs]  # (pinned tensor, its views)
        self.h_turn = 0
        g = self.g_inputs
        g.slots.fill_(self.scratch_slot)
        pool = torch.cuda.graph_pool_handle() if dev.type == "cuda" else None
        for b in sorted(sizes, reverse=True):
            meta = AttentionMetadata(slot_mapping=g.slots[:b], attention="triton", num_decodes=b,
                                     decode_tables=g.tables[:b], decode_context_lens=g.context_lens[:b])
            # Kept alive by the replay partial: a graph reads its inputs from fixed
            # addresses, so nothing it reads may ever be freed and reused. Every row of a
            # decode graph wants its logits (logits rows None: no gather).
            args = (g.token_ids[:b], g.pending_rows[:b], g.positions[:b], meta, None)
            if pool is None:  # no CUDA (Triton's interpreter in tests): run the same buffers eagerly
                self.graphs[b] = functools.partial(self._graph_body, *args)
                continue
            with torch.inference_mode():
                self._graph_body(*args)  # compiles the kernels outside the capture
                torch.cuda.synchronize(dev)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self._graph_body(*args)
            self.graphs[b] = functools.partial(_replay_graph, graph, logits, args)
        self.graph_sizes = sorted(sizes)
        log.info("captured CUDA graphs for decode batch sizes %s", self.graph_sizes)

    def _graph_body(self, ids, src, pos, meta, rows) -> torch.Tensor:
        return self.model(_take_pending(ids, src, self.token_buf), pos, self.kv_caches, meta, rows)

    def _replay(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        B = len(chunks)
        G = self.graph_sizes[bisect.bisect_left(self.graph_sizes, B)]
        bs = self.tokens_per_block
        h_buf, h = self.h_twins[self.h_turn]
        self.h_turn ^= 1
        ids, pending, positions, slots, ctx, tables = h.token_ids, h.pending_rows, h.positions, h.slots, h.context_lens, h.tables
        for i, ch in enumerate(chunks):  # per row, every step: locals, not attribute lookups
            seq = ch.seq
            p = seq.num_computed
            table = seq.block_table
            ids[i], pending[i] = self._input_token(seq, p)
            positions[i] = p
            slots[i] = table[p // bs] * bs + p % bs
            ctx[i] = p + 1
            tables[i, : len(table)] = table
        # Padding rows: token 0 at position 0, written to the scratch slot, no context.
        h.token_ids[B:G] = 0
        h.positions[B:G] = 0
        h.slots[B:G] = self.scratch_slot
        h.context_lens[B:G] = 0
        h.pending_rows[B:G] = -1
        n = h.used(B)  # only the used table rows travel
        self.g_inputs.buf[:n].copy_(h_buf[:n], non_blocking=True)
        return self.graphs[G]()[:B]
