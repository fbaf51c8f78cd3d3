"""ModelRunner: owns the model and its paged KV cache on one device, turns a step's
scheduled chunks into tensors, runs the model (on the GPU replaying a CUDA graph: decode-
only steps by batch size, steps with prompt tokens by token count) and samples."""

from __future__ import annotations

import bisect
import functools
import logging
import os
import time
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from worker.embedded.attention import AttentionMetadata, Tiles, build_mask, varlen_available
from worker.embedded.llama import LlamaForCausalLM
from worker.embedded.sampler import DeviceSample, sample_async
from worker.embedded.scheduler import ScheduledChunk
from worker.embedded.sequence import Sequence
from worker.embedded.step_time import StepTimeModel, prompt_pairs
from models.config import ModelConfig
from worker.engine_api import EngineConfigError, KernelConfig

log = logging.getLogger(__name__)

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)
# Mixed (prefill and decode) steps: a graph for each of these token counts up to the
# engine's max_num_tokens (and one of max_num_tokens itself, where it is smaller). Close
# steps, so that padding a step up to its graph costs little: a step of 2,064 tokens padded
# to 3,072 took 1.4 times as long as eagerly (BENCHMARKS.md, mixed steps). Closest where
# steps sized by time (step_time_target_ms) land on a large model, where each 128 tokens
# more cost milliseconds (BENCHMARKS.md, steps sized by time). Steps larger than
# MIXED_GRAPH_MAX run eagerly: their GPU time hides the launches.
MIXED_GRAPH_MAX = 2048
MIXED_GRAPH_TOKENS = (16, 32, 64, 128, 192, *range(256, 513, 64), *range(640, 1025, 128),
                      *range(1280, MIXED_GRAPH_MAX + 1, 256))


def mixed_graph_sizes(max_num_tokens: int) -> list[int]:
    return sorted({t for t in MIXED_GRAPH_TOKENS if t < max_num_tokens} | {min(max_num_tokens, MIXED_GRAPH_MAX)})


def no_slower_than_larger(sizes: list[int], ms: list[float]) -> tuple[list[int], list[float]]:
    """The graph sizes (ascending) and their times without those slower than some larger
    size: a step then pads up to the larger, faster graph."""
    keep: list[tuple[int, float]] = []
    fastest = float("inf")
    for size, t in reversed(list(zip(sizes, ms))):
        if t <= fastest:
            keep.append((size, t))
            fastest = t
    keep.reverse()
    return [size for size, _ in keep], [t for _, t in keep]


def tokens_within(sizes: list[int], ms: list[float], budget_ms: float) -> int:
    """The largest graph size whose time is within budget_ms, or 0."""
    best = 0
    for size, t in zip(sizes, ms):
        if t <= budget_ms:
            best = size
    return best


def chunk_within(sizes: list[int], ms: list[float], model: StepTimeModel, target_ms: float, context: int,
                 tokens: int, pairs: int, start: int, want: int) -> int:
    """The most of `want` prompt tokens from position `start` a step may add to the
    `tokens` and prompt (query, key) `pairs` it holds, its decodes reading `context`
    tokens, and be predicted within target_ms on the graph (sizes, ms) it then replays."""
    best = 0
    for size, graph_ms in zip(sizes, ms):
        n = min(want, size - tokens)
        if n > best and model.predict(graph_ms, context, pairs + prompt_pairs(start, n)) <= target_ms:
            best = n
    return best


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
    """Every input of one captured graph, as named views into one flat int32 buffer: the
    vectors `lengths` names, in order, then a rows x width block table. The device buffer
    and its pinned host twins (numpy views) share this layout, so one copy of the first
    `used(n)` values moves a step's inputs. Graphs of different sizes lay their inputs
    over the same buffers, each in its own layout: a step fills its graph's whole layout
    before the copy."""

    def __init__(self, buf: torch.Tensor | np.ndarray, lengths: dict[str, int], rows: int, width: int):
        self.buf, self.width = buf, width
        at = 0
        for name, n in lengths.items():
            setattr(self, name, buf[at : at + n])
            at += n
        self.head = at
        self.tables = buf[at : at + rows * width].reshape(rows, width)

    @staticmethod
    def size(lengths: dict[str, int], rows: int, width: int) -> int:
        return sum(lengths.values()) + rows * width

    def used(self, table_rows: int) -> int:
        """Values up to the last of the first `table_rows` table rows: the rest need not travel."""
        return self.head + table_rows * self.width


def decode_layout(batch: int) -> dict[str, int]:
    return dict.fromkeys(("token_ids", "positions", "slots", "context_lens", "pending_rows"), batch)


def mixed_layout(tokens: int, seqs: int, tiles: int) -> dict[str, int]:
    return {**dict.fromkeys(("token_ids", "positions", "slots", "pending_rows"), tokens), "logits_rows": seqs,
            **dict.fromkeys(("tile_seq", "tile_q"), tiles),
            **dict.fromkeys(("seq_start", "seq_qlen", "seq_ctx", "context_lens"), seqs)}


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, device: torch.device, dtype: torch.dtype, num_blocks: int,
                 tokens_per_block: int, max_seq_len: int, max_batch_size: int, max_num_tokens: int, cuda_graphs: bool,
                 kernels: KernelConfig, kv_dtype: torch.dtype | None = None, learn_step_times: bool = True,
                 step_margin: bool = True):
        self.model = model
        self.learn_step_times = learn_step_times
        self.step_margin = step_margin  # the step model's `margined`, once it is made
        self.config = model.config
        self.device = device
        self.dtype = dtype
        self.kv_dtype = kv_dtype or dtype  # float8 E4M3: kv_cache.dtype fp8
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
            (torch.zeros(shape, dtype=self.kv_dtype, device=device), torch.zeros(shape, dtype=self.kv_dtype, device=device))
            for _ in range(c.num_layers)
        ]
        self.scratch_slot = num_blocks * tokens_per_block
        # The last step's sampled tokens stay here on the device, so the next step can use
        # them as inputs before the host has seen them (overlap scheduling).
        self.token_buf = torch.zeros(max(max_batch_size, 1), dtype=torch.long, device=device)
        self.max_blocks_per_seq = -(-max_seq_len // tokens_per_block)
        self.max_batch_size = max(max_batch_size, 1)
        self.graphs: dict[int, Callable[[], torch.Tensor]] = {}  # decode batch size -> replay, giving logits
        self.graph_sizes: list[int] = []
        self.mixed_graphs: dict[int, Callable[[], torch.Tensor]] = {}  # step tokens -> replay, giving logits
        self.mixed_sizes: list[int] = []
        self.steps_graph = self.steps_eager = 0  # forward passes by how they ran
        # What a mixed step's graph takes (ms, by mixed_sizes), and what each token of
        # context its sequences read adds: timed at start-up, the step model's start.
        self.mixed_ms: list[float] = []
        self.decode_ms: list[float] = []  # by graph_sizes, blank inputs (no context)
        self.context_ms_per_token = 0.0
        # Refitted to every graph step's measured time (step_time.py); None until timed.
        self.step_model: StepTimeModel | None = None
        self._timings: list[tuple[torch.cuda.Event, torch.cuda.Event, tuple[float, int, int]]] = []
        if self.attention == "triton" and device.type == "cuda":
            self._compile_split_variants()
        if self.argmax is not None:  # compiled now, not in the first step
            self.argmax(torch.zeros((2, self.config.vocab_size), dtype=dtype, device=device))
        if cuda_graphs and self.attention == "triton":
            self._capture([b for b in GRAPH_BATCH_SIZES if b <= max_batch_size] or [1], mixed_graph_sizes(max_num_tokens))
        # Looked up once: late_compiles runs at every heartbeat.
        self._kernels = []
        if self.attention == "triton":
            from worker.embedded.kernels import jit_functions

            self._kernels = jit_functions()
        self._variants_at_ready = self._compiled_variants()

    def _compiled_variants(self) -> int:
        if not self._kernels:
            return 0
        from worker.embedded.kernels import compiled_variants

        return compiled_variants(self._kernels)

    def late_compiles(self) -> int:
        """Triton kernels compiled since start-up (the engine reports ready after it)."""
        return self._compiled_variants() - self._variants_at_ready

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
        if self._timings:
            self._learn_step_times()
        # Decodes first: the GPU path's kernels take them as one leading block of rows;
        # with KernelConfig.decode_order "longest-first", the longest context first.
        if self.kernels.decode_order == "longest-first":
            chunks = sorted(chunks, key=lambda ch: -ch.seq.num_computed if ch.num_tokens == 1 else 1)
        else:
            chunks = sorted(chunks, key=lambda ch: ch.num_tokens != 1)
        sampled = [ch.seq for ch in chunks if ch.sample]
        decode_only = chunks[-1].num_tokens == 1
        if decode_only and self.graph_sizes and len(chunks) <= self.graph_sizes[-1]:
            logits = self._replay(chunks)
            self.steps_graph += 1
        elif not decode_only and self.mixed_sizes and sum(ch.num_tokens for ch in chunks) <= self.mixed_sizes[-1]:
            logits = self._replay_mixed(chunks)
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
                self._plan_flat(meta)
            prefills = chunks[n_dec:]
            if prefills and self.varlen and all(ch.seq.num_computed == 0 for ch in prefills):
                offsets = np.cumsum([0] + q_lens[n_dec:])
                meta.prefill_cu_seq = torch.tensor(offsets, dtype=torch.int32, device=dev)
                meta.prefill_max_len = max(q_lens[n_dec:])
            elif prefills:  # the paged varlen kernel, over the prefills' rows only
                from worker.embedded.kernels.paged_varlen import block_q, tile_map

                lens = q_lens[n_dec:]
                tile_seq, tile_q = tile_map(lens, block_q(self.config.num_heads // self.config.num_kv_heads))
                width = max(len(ch.seq.block_table) for ch in prefills)
                tables = np.zeros((len(prefills), width), dtype=np.int32)
                for i, ch in enumerate(prefills):
                    tables[i, : len(ch.seq.block_table)] = ch.seq.block_table
                host = lambda a: torch.from_numpy(np.asarray(a, dtype=np.int32)).to(dev)  # noqa: E731
                meta.tiles = Tiles(host(tile_seq), host(tile_q), host(n_dec + np.cumsum([0] + lens[:-1])), host(lens),
                                   host(ctx_lens[n_dec:]), host(tables))
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

    # CUDA graphs: decode-only steps by batch size, mixed steps by token count.

    def _capture(self, sizes: list[int], mixed: list[int]) -> None:
        W, dev = self.max_blocks_per_seq, self.device
        group = self.config.num_heads // self.config.num_kv_heads
        from worker.embedded.kernels.paged_varlen import block_q, max_tiles, tile_map

        self.block_q, self.tile_map = block_q(group), tile_map
        layouts = {("decode", b): (decode_layout(b), b) for b in sizes}
        for t in mixed:
            seqs = min(t, self.max_batch_size)
            layouts["mixed", t] = (mixed_layout(t, seqs, max_tiles(t, seqs, self.block_q)), seqs)
        size = max(GraphInputs.size(lengths, rows, W) for lengths, rows in layouts.values())
        # The graph inputs are filled by one copy per step from a pinned host twin. Two
        # host twins take turns: with overlap scheduling the host fills the next step's
        # while the last one's copy may still wait in the stream.
        # int32, as eager steps pass them: every value fits (token ids, positions, cache slots,
        # block ids), and the kernels' index math stays 32-bit (BENCHMARKS.md, runs 14-16).
        self.g_buf = torch.zeros(size, dtype=torch.int32, device=dev)
        h_bufs = [torch.zeros(size, dtype=torch.int32) for _ in range(2)]
        if dev.type == "cuda":
            h_bufs = [h.pin_memory() for h in h_bufs]
        self.h_bufs, self.h_turn = h_bufs, 0
        # Per graph: its device views, and its views of each host twin.
        self.layouts = {key: (GraphInputs(self.g_buf, lengths, rows, W), [GraphInputs(h.numpy(), lengths, rows, W) for h in h_bufs])
                        for key, (lengths, rows) in layouts.items()}
        pool = torch.cuda.graph_pool_handle() if dev.type == "cuda" else None
        # Largest first: the smaller graphs fit in the memory the first one took.
        todo = sorted(layouts, key=lambda key: key[1], reverse=True)
        t0 = time.monotonic()
        for kind, n in tqdm(todo, desc="Capturing CUDA graphs", unit="graph", disable=None if pool is not None else True):
            g = self.layouts[kind, n][0]
            if kind == "decode":
                meta = AttentionMetadata(slot_mapping=g.slots, attention="triton", num_decodes=n,
                                         decode_tables=g.tables, decode_context_lens=g.context_lens)
                rows = None  # every row of a decode graph wants its logits: no gather
            else:
                meta = AttentionMetadata(slot_mapping=g.slots, attention="triton",
                                         tiles=Tiles(g.tile_seq, g.tile_q, g.seq_start, g.seq_qlen, g.seq_ctx, g.tables))
                if self.kernels.mixed_decode_kernel:
                    # Sequence i of a step is row i for its leading one-token chunks: the
                    # paged-decode kernel takes those (the others have context 0 there).
                    seqs = len(g.seq_start)
                    meta.num_decodes, meta.decode_tables, meta.decode_context_lens = seqs, g.tables, g.context_lens
                rows = g.logits_rows
            self._blank(g, kind)
            # Kept alive by the replay partial: a graph reads its inputs from fixed
            # addresses, so nothing it reads may ever be freed and reused.
            args = (g.token_ids, g.pending_rows, g.positions, meta, rows)
            graphs = self.graphs if kind == "decode" else self.mixed_graphs
            if pool is None:  # no CUDA (Triton's interpreter in tests): run the same buffers eagerly
                graphs[n] = functools.partial(self._graph_body, *args)
                continue
            with torch.inference_mode():
                self._graph_body(*args)  # compiles the kernels outside the capture
                torch.cuda.synchronize(dev)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self._graph_body(*args)
            graphs[n] = functools.partial(_replay_graph, graph, logits, args)
        self.graph_sizes, self.mixed_sizes = sorted(sizes), sorted(mixed)
        log.info("captured %d CUDA graphs in %.1f s: decode batch sizes %s, mixed steps of %s tokens", len(todo),
                 time.monotonic() - t0, self.graph_sizes, self.mixed_sizes)
        if pool is not None and self.mixed_sizes:
            self._time_mixed_graphs()

    def _time_mixed_graphs(self) -> None:
        """Time every mixed graph on blank inputs (the projections, norms and sampling
        rows: what grows with the step's tokens), then one with decodes over a real
        context, for what each context token adds (the attention's KV reads). The
        engine sizes steps from these, through the step model (step_time.py)."""
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def timed(replay) -> float:
            replay()  # warm
            times = []
            for _ in range(3):
                start.record()
                replay()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            return sorted(times)[1]

        t0 = time.monotonic()
        for T in self.mixed_sizes:
            self._blank(self.layouts["mixed", T][0], "mixed")
            self.mixed_ms.append(timed(self.mixed_graphs[T]))
        for B in self.graph_sizes:
            self._blank(self.layouts["decode", B][0], "decode")
            self.decode_ms.append(timed(self.graphs[B]))
        # A graph slower than a larger one is dropped: its steps replay the larger, faster
        # one (cuBLAS's choice for some token counts is slow: BENCHMARKS.md, steps sized by
        # time).
        sizes, self.mixed_ms = no_slower_than_larger(self.mixed_sizes, self.mixed_ms)
        dropped = sorted(set(self.mixed_sizes) - set(sizes))
        for T in dropped:
            del self.mixed_graphs[T]
        self.mixed_sizes = sizes
        # Decodes, each reading its own blocks (a shared block would sit in L2): 64 (or
        # what the smallest graph of at least that many takes), over up to 1,024 tokens
        # each, as the pool allows.
        i = next((i for i, t in enumerate(self.mixed_sizes) if t >= 64), len(self.mixed_sizes) - 1)
        T = self.mixed_sizes[i]
        D = min(T, 64, self.max_batch_size)
        per_seq = min(1024 // self.tokens_per_block, (self.scratch_slot // self.tokens_per_block) // D,
                      self.max_blocks_per_seq)
        if per_seq >= 2:
            g = self.layouts["mixed", T][0]
            ctx = per_seq * self.tokens_per_block
            dev = self.device
            self._blank(g, "mixed")
            g.positions[:D] = ctx - 1
            g.seq_start[:D] = torch.arange(D, device=dev)
            g.seq_qlen[:D] = 1
            g.seq_ctx[:D] = ctx
            g.logits_rows[:D] = torch.arange(D, device=dev)
            g.tables[:D, :per_seq] = torch.arange(D * per_seq, device=dev).view(D, per_seq)
            tile_seq, tile_q = self.tile_map(self._varlen_lens([1] * D), self.block_q, len(g.tile_seq))
            g.tile_seq.copy_(torch.as_tensor(tile_seq))
            g.tile_q.copy_(torch.as_tensor(tile_q))
            if self.kernels.mixed_decode_kernel:
                g.context_lens[:D] = ctx
            self.context_ms_per_token = max(0.0, timed(self.mixed_graphs[T]) - self.mixed_ms[i]) / (D * ctx)
            self._blank(g, "mixed")
        self.step_model = StepTimeModel(self.context_ms_per_token, self.mixed_ms[len(self.mixed_ms) // 2],
                                        typical_context=64 * 1024, typical_pairs=512 * 1024, margined=self.step_margin)
        log.info("timed the mixed-step graphs in %.1f s: %s ms for %s tokens, %.2f us a context token; "
                 "dropped as slower than a larger one: %s", time.monotonic() - t0, [round(ms, 2) for ms in self.mixed_ms],
                 self.mixed_sizes, self.context_ms_per_token * 1000, dropped or "none")

    def step_features(self, chunks: list[ScheduledChunk]) -> tuple[float, int, int] | None:
        """What a step of these chunks is predicted from (StepTimeModel): the start-up
        time of the graph it replays, its decodes' context tokens and its prompt chunks'
        (query, key) pairs; None for a step that runs eagerly (or where nothing was timed)."""
        if self.step_model is None:
            return None
        tokens = sum(ch.num_tokens for ch in chunks)
        context = pairs = 0
        for ch in chunks:
            n, p = ch.num_tokens, ch.seq.num_computed
            if n == 1:
                context += p + 1
            else:
                pairs += prompt_pairs(p, n)
        if tokens == len(chunks):  # decode-only
            if tokens > self.graph_sizes[-1]:
                return None
            return self.decode_ms[bisect.bisect_left(self.graph_sizes, tokens)], context, 0
        if tokens > self.mixed_sizes[-1]:
            return None
        return self.mixed_ms[bisect.bisect_left(self.mixed_sizes, tokens)], context, pairs

    def predict_ms(self, chunks: list[ScheduledChunk]) -> float | None:
        """The predicted device time of a step of these chunks; None for a step that runs
        eagerly (or where nothing was timed)."""
        features = self.step_features(chunks)
        return None if features is None else self.step_model.predict(*features)

    def tokens_within(self, target_ms: float, context: int) -> int:
        """The most tokens a mixed step can take, its decodes reading `context` tokens of
        KV, and be predicted to end within what the step model sizes target_ms to
        (StepTimeModel.sized_to): a graph size, or 0 if none fits. (Its prompt chunks' attention is left
        out: the chunks are not chosen yet.)"""
        if self.step_model is None:
            return 0
        target_ms = self.step_model.sized_to(target_ms)
        return tokens_within(self.mixed_sizes, self.mixed_ms, self.step_model.graph_budget(target_ms, context))

    def chunk_within(self, target_ms: float, context: int, tokens: int, pairs: int, start: int, want: int) -> int:
        """module-level chunk_within on this runner's mixed graphs and step model, within
        what the model sizes target_ms to (StepTimeModel.sized_to)."""
        if self.step_model is None:
            return want
        target_ms = self.step_model.sized_to(target_ms)
        return chunk_within(self.mixed_sizes, self.mixed_ms, self.step_model, target_ms, context, tokens, pairs,
                            start, want)

    def _replay_timed(self, replay: Callable[[], torch.Tensor], chunks: list[ScheduledChunk]) -> torch.Tensor:
        """replay(), with CUDA events around it once steps are timed: the step model learns
        from what the step took (read when the events are done, at a later step)."""
        features = self.step_features(chunks) if self.step_model is not None and self.learn_step_times else None
        if features is None:
            return replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = replay()
        end.record()
        self._timings.append((start, end, features))
        return out

    def _learn_step_times(self) -> None:
        """Feed the step model the graph steps whose timing events are done."""
        pending = []
        for start, end, features in self._timings:
            if end.query():
                self.step_model.observe(*features, start.elapsed_time(end))
            else:
                pending.append((start, end, features))
        self._timings = pending

    def _varlen_lens(self, q_lens: list[int]) -> list[int]:
        """The query lengths the paged varlen kernel takes in a mixed graph: the one-token
        chunks go to the paged-decode kernel instead (KernelConfig.mixed_decode_kernel)."""
        return [0 if n == 1 else n for n in q_lens] if self.kernels.mixed_decode_kernel else q_lens

    def _blank(self, g: GraphInputs, kind: str) -> None:
        """Inputs that are all padding: a capture runs on them."""
        g.buf.zero_()
        g.slots.fill_(self.scratch_slot)
        g.pending_rows.fill_(-1)
        if kind == "mixed":
            g.tile_seq.fill_(-1)

    def _graph_body(self, ids, src, pos, meta, rows) -> torch.Tensor:
        self._plan_flat(meta)  # inside the graph: each replay maps its own decodes' tiles
        return self.model(_take_pending(ids, src, self.token_buf), pos, self.kv_caches, meta, rows)

    def _plan_flat(self, meta: AttentionMetadata) -> None:
        """With KernelConfig.decode_kernel "flat": the map of the decodes' tiles for every
        layer of the step (kernels/flat_decode.py), made on the device from their context
        lengths and block tables."""
        if self.kernels.decode_kernel != "flat" or not meta.num_decodes or meta.decode_context_lens is None:
            return
        from worker.embedded.kernels.flat_decode import flat_plan, flat_programs

        cfg = self.config
        tile = self.kernels.decode_tile or (128 if self.kv_dtype == torch.float8_e4m3fn else 64)
        meta.flat = flat_plan(meta.decode_context_lens, meta.decode_tables, self.tokens_per_block,
                              flat_programs(self.device, cfg.num_kv_heads), tile, cfg.num_heads, cfg.head_dim)

    def _host_views(self, kind: str, n: int) -> tuple[torch.Tensor, GraphInputs, GraphInputs]:
        """The next host twin, its views for graph (kind, n), and the device views."""
        g, twins = self.layouts[kind, n]
        turn = self.h_turn
        self.h_turn ^= 1
        return self.h_bufs[turn], twins[turn], g

    def _replay(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        B = len(chunks)
        G = self.graph_sizes[bisect.bisect_left(self.graph_sizes, B)]
        bs = self.tokens_per_block
        h_buf, h, g = self._host_views("decode", G)
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
        g.buf[:n].copy_(h_buf[:n], non_blocking=True)
        return self._replay_timed(self.graphs[G], chunks)[:B]

    def _replay_mixed(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """A step with prefill chunks, decodes first, from the graph of the next token count up."""
        total = sum(ch.num_tokens for ch in chunks)
        T = self.mixed_sizes[bisect.bisect_left(self.mixed_sizes, total)]
        bs = self.tokens_per_block
        h_buf, h, g = self._host_views("mixed", T)
        row = 0
        n_sampled = 0
        for i, ch in enumerate(chunks):
            seq, n = ch.seq, ch.num_tokens
            p = seq.num_computed
            table = np.asarray(seq.block_table, dtype=np.int64)
            if n == 1:
                h.token_ids[row], h.pending_rows[row] = self._input_token(seq, p)
            else:  # a prefill chunk: every token is known
                h.token_ids[row : row + n] = seq.all_token_ids[p : p + n]
                h.pending_rows[row : row + n] = -1
            pos = np.arange(p, p + n)
            h.positions[row : row + n] = pos
            h.slots[row : row + n] = table[pos // bs] * bs + pos % bs
            h.seq_start[i], h.seq_qlen[i], h.seq_ctx[i] = row, n, p + n
            h.tables[i, : len(table)] = table
            row += n
            if ch.sample:
                h.logits_rows[n_sampled] = row - 1
                n_sampled += 1
        h.token_ids[row:T] = 0
        h.positions[row:T] = 0
        h.slots[row:T] = self.scratch_slot
        h.pending_rows[row:T] = -1
        h.logits_rows[n_sampled:] = 0
        q_lens = [ch.num_tokens for ch in chunks]
        h.tile_seq[:], h.tile_q[:] = self.tile_map(self._varlen_lens(q_lens), self.block_q, len(h.tile_seq))
        if self.kernels.mixed_decode_kernel:
            h.context_lens[:] = 0
            for i, n in enumerate(q_lens):
                if n != 1:
                    break
                h.context_lens[i] = chunks[i].seq.num_computed + 1
        n = h.used(len(chunks))
        g.buf[:n].copy_(h_buf[:n], non_blocking=True)
        return self._replay_timed(self.mixed_graphs[T], chunks)[:n_sampled]
