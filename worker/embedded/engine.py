"""EmbeddedEngine: our PyTorch engine behind the `worker.engine_api.Engine` contract."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from pathlib import Path
from typing import Iterable, Sequence as Tokens

import torch

from inflight.errors import invalid
from inflight.sampling_params import SamplingParams
from inflight.schema import EngineStats, RequestOutput
from inflight.validation import check_request
from worker.embedded import quant
from worker.embedded.block_pool import KvBlockPool
from worker.embedded.kv_quant import calibrate_kv_scales
from worker.embedded.llama import LlamaForCausalLM
from worker.embedded.model_runner import ModelRunner, kv_bytes_per_block
from worker.embedded.sampler import DeviceSample
from worker.embedded.scheduler import BatchScheduler, ScheduledChunk
from worker.embedded.sequence import Sequence, SeqStatus
from worker.embedded.smoothquant import calibration_token_ids, input_mean_squares, smooth_model
from worker.engine_api import FMA_MAX_ROWS, EngineConfig, EngineConfigError
from models.config import ModelConfig
from models.loader import iter_safetensors
from models.quantized_checkpoint import CheckpointQuantization, quantized_tensors
from models.locate import locate_model

log = logging.getLogger(__name__)

# Tokens a step computes at most, where EngineConfig leaves it unset. On a GPU, vLLM's
# default for online serving: the largest step (and with it the longest wait between two
# tokens of a running stream) stays bounded, and every step replays a CUDA graph. On the
# CPU a step of that many prompt tokens takes seconds, so less.
MAX_NUM_TOKENS_CUDA, MAX_NUM_TOKENS_CPU = 2048, 512
# launch_wait counts on this share of a queued step's predicted time, and keeps this much
# in hand: a step that ends sooner than predicted must not leave the device idle.
LAUNCH_WAIT_SHARE, LAUNCH_WAIT_MARGIN_S = 0.8, 0.0005


@dataclasses.dataclass
class LaunchedStep:
    """A step queued on the device whose tokens the host has not read yet."""

    sample: DeviceSample | None  # None when no chunk reached its end
    sampled: list[Sequence]  # in the sample's row order


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise EngineConfigError(f"dtype must be auto, float32, bfloat16 or float16, got {name!r}") from None


class EmbeddedEngine:
    def __init__(
        self,
        config: EngineConfig,
        model_config: ModelConfig | None = None,
        weights: Iterable[tuple[str, torch.Tensor]] | None = None,
        tokenizer_file: Path | None = None,
    ):
        """Load the model named by config.model, or build it from model_config and
        weights (random weights when weights is None: benchmarks of real shapes);
        `tokenizer_file` then tokenizes int8-smoothquant's calibration prompts."""
        t0 = time.monotonic()
        self.config = config
        self.tokenizer_file = tokenizer_file
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        if model_config is None:
            self.model_dir = locate_model(config.model)
            model_config = ModelConfig.from_dir(self.model_dir)
            weights = iter_safetensors(self.model_dir)
        else:
            self.model_dir = None
        self.model_config = model_config
        self.vocab_size = model_config.vocab_size
        self.eos_token_ids = model_config.eos_token_ids
        self.max_seq_len = min(config.max_seq_len or model_config.max_position_embeddings, model_config.max_position_embeddings)

        self.max_num_tokens = config.max_num_tokens or (MAX_NUM_TOKENS_CUDA if self.device.type == "cuda" else MAX_NUM_TOKENS_CPU)
        if not config.step_time_target_ms >= 0:  # NaN too
            raise EngineConfigError(f"step_time_target_ms must be >= 0 (0 turns it off), got {config.step_time_target_ms}")
        tile = config.kernels.decode_tile
        if tile and not (16 <= tile <= 256 and tile & (tile - 1) == 0):
            raise EngineConfigError(f"decode_tile must be 0 (auto) or a power of two from 16 to 256, got {tile}")
        if not 1 <= config.kernels.fma_max_rows <= FMA_MAX_ROWS:
            raise EngineConfigError(f"fma_max_rows must be from 1 to {FMA_MAX_ROWS}, got {config.kernels.fma_max_rows}")
        self.kv_dtype = self._kv_dtype()
        self._shipped_kv_scales: dict[tuple[int, str], float] = {}  # a quantized checkpoint's, filled while loading
        self.model = self._build_model(weights)
        if self.kv_dtype == torch.float8_e4m3fn:
            self._set_kv_scales()
        kv = config.kv_cache
        num_blocks = self._num_kv_blocks()
        self.pool = KvBlockPool(num_blocks, kv.tokens_per_block, kv.enable_block_reuse)
        self.runner = ModelRunner(self.model, self.device, self.dtype, num_blocks, kv.tokens_per_block,
                                  self.max_seq_len, config.max_batch_size, self.max_num_tokens, config.cuda_graphs,
                                  config.kernels, kv_dtype=self.kv_dtype, learn_step_times=config.step_time_learning,
                                  step_margin=config.step_time_margin)
        timed_steps = bool(config.step_time_target_ms and self.runner.mixed_ms)  # steps sized by predicted time
        self.scheduler = BatchScheduler(
            self.pool,
            max_batch_size=config.max_batch_size,
            max_num_tokens=self.max_num_tokens,
            max_seq_len=self.max_seq_len,
            enable_chunked_prefill=config.enable_chunked_prefill,
            policy=config.scheduler.capacity_scheduler_policy,
            token_budget=self._token_budget if timed_steps else None,
            chunk_limit=self._chunk_limit if timed_steps else None,
        )
        self.requests: dict[str, Sequence] = {}
        self.overlap = config.overlap_scheduler == "on" or (config.overlap_scheduler == "auto" and self.device.type == "cuda")
        self._launched: LaunchedStep | None = None
        # The step queued on the device: when it started (or no later), and its chunks (launch_wait).
        self._queued: tuple[float, list[ScheduledChunk]] | None = None
        self._launch_s = 0.0  # running average of the host's time to schedule and launch a step
        self._penalized = 0  # requests with penalties: they turn overlap off while they run
        self._arrivals = itertools.count()
        self.prompt_tokens_seen = 0
        self.prompt_tokens_cached = 0
        log.info(
            "engine ready in %.1fs: %s on %s/%s, projections %s, %d KV blocks of %d tokens (%s)",
            time.monotonic() - t0, model_config.name, self.device, str(self.dtype).removeprefix("torch."),
            self.quantization, num_blocks, kv.tokens_per_block, str(self.kv_dtype).removeprefix("torch."),
        )

    def _build_model(self, weights) -> LlamaForCausalLM:
        scheme, shipped = self._quantization()
        self.quantization = scheme.name if scheme else "16-bit"
        # The projections arrive 8-bit with their scales, or are quantized as they arrive;
        # int8-smoothquant and searched FP8 scales calibrate on the whole 16-bit model first.
        search = scheme is not None and scheme.name == "fp8" and self.config.fp8_weight_scales == "search"
        calibrated = scheme is not None and (scheme.name == "int8-smoothquant" or search)
        quantized = shipped is not None or (scheme is not None and weights is not None and not calibrated)
        with torch.device("meta"):
            model = LlamaForCausalLM(self.model_config, self.max_seq_len).to(self.dtype)
            if quantized:  # swapped while on meta: no 16-bit projection is ever allocated
                quant.replace_with_empty(model, scheme)
        model = model.to_empty(device=self.device)
        if self.model_config.tie_word_embeddings:  # to_empty unties shared parameters
            model.lm_head.weight = model.embed_tokens.weight
        model.rotary.build()  # to_empty left its tables uninitialized
        if quantized:
            model.load_hf_weights(quantized_tensors(weights, shipped, self.dtype, self._shipped_kv_scales) if shipped is not None else
                                  quant.quantize_on_load(weights, scheme, self.dtype, self.device))
        elif weights is None:  # drawn on the device: an 8B shape takes seconds, not minutes
            gen = torch.Generator(device=self.device).manual_seed(0)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "norm" in name:
                        p.fill_(1.0)
                    else:
                        p.normal_(0.0, 0.02, generator=gen)
        else:
            model.load_hf_weights((n, t.to(self.dtype)) for n, t in weights)
        if scheme is not None and not quantized:  # calibrated on the whole 16-bit model first
            col_weights = None
            if scheme.name == "int8-smoothquant":
                smooth_model(model, self._calibration_prompts())
            elif search:
                col_weights = input_mean_squares(model, self._calibration_prompts())
            quant.quantize_model(model, scheme, col_weights)
        return model.eval()

    def _quantization(self) -> tuple[quant.QuantScheme | None, CheckpointQuantization | None]:
        """The scheme the projections run in, and the checkpoint's if it ships quantized."""
        shipped = self.model_config.quantization
        scheme = quant.scheme_for(self.config.quantization)
        if shipped is not None:
            if scheme is not None and scheme.name != shipped.scheme:
                raise EngineConfigError(f"--quantization {scheme.name}: the checkpoint is already quantized "
                                        f"({shipped.format}, {shipped.scheme}); leave --quantization none")
            scheme = quant.scheme_for(shipped.scheme)
        if scheme is not None:
            quant.check_device(scheme, self.device)
            c = self.model_config
            quant.check_shapes(scheme, c.hidden_size, c.intermediate_size, c.num_heads * c.head_dim,
                               c.num_kv_heads * c.head_dim, self.device)
        return scheme, shipped

    def _calibration_prompts(self) -> list[list[int]]:
        """Token ids of the calibration prompts (int8-smoothquant, searched FP8 weight scales,
        FP8 KV cache scales), with the model's tokenizer where there is one."""
        tokenizer = self.model_dir / "tokenizer.json" if self.model_dir else self.tokenizer_file
        return calibration_token_ids(tokenizer, self.model_config.vocab_size)

    def _set_kv_scales(self) -> None:
        """An FP8 cache's per-layer scales: the checkpoint's where it ships both for every
        layer, else calibrated here."""
        shipped = self._shipped_kv_scales
        layers = self.model.layers
        if all(shipped.get((i, kind), 0) > 0 for i in range(len(layers)) for kind in "kv"):
            for i, layer in enumerate(layers):
                layer.self_attn.k_scale, layer.self_attn.v_scale = shipped[i, "k"], shipped[i, "v"]
            scales, source = [(shipped[i, "k"], shipped[i, "v"]) for i in range(len(layers))], "from the checkpoint"
        else:
            if shipped:
                log.warning("the checkpoint's KV cache scales cover %d of %d layers' keys and values: calibrating all",
                            len(shipped), 2 * len(layers))
            scales = calibrate_kv_scales(self.model, self._calibration_prompts())
            source = "calibrated"
        log.info("FP8 KV cache scales %s: keys %.3g to %.3g, values %.3g to %.3g", source,
                 min(k for k, _ in scales), max(k for k, _ in scales), min(v for _, v in scales), max(v for _, v in scales))

    def _kv_dtype(self) -> torch.dtype:
        """The KV cache's element type (kv_cache.dtype)."""
        choice = self.config.kv_cache.dtype
        if choice == "auto":
            return self.dtype
        if choice != "fp8":
            raise EngineConfigError(f"kv_cache.dtype must be auto or fp8, got {choice!r}")
        if self.device.type == "cuda" and torch.cuda.get_device_capability(self.device) < (8, 9):
            major, minor = torch.cuda.get_device_capability(self.device)
            raise EngineConfigError(f"kv_cache.dtype fp8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper); "
                                    f"{torch.cuda.get_device_name(self.device)} is {major}.{minor}: use auto")
        if self.model_config.head_dim % 4:  # the kernels read an FP8 cache four values a word (kernels/kv_tile.py)
            raise EngineConfigError(f"kv_cache.dtype fp8 needs a head dimension divisible by 4; "
                                    f"{self.model_config.name} has {self.model_config.head_dim}: use auto")
        return torch.float8_e4m3fn

    def _num_kv_blocks(self) -> int:
        kv = self.config.kv_cache
        per_block = kv_bytes_per_block(self.model_config, kv.tokens_per_block, self.kv_dtype)
        if self.device.type == "cuda":
            # Memory freed while loading (the 16-bit projections --quantization replaced)
            # stays in torch's cache, which mem_get_info counts as used: give it back first.
            torch.cuda.empty_cache()
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * kv.free_gpu_memory_fraction)
        else:
            budget = kv.cpu_bytes
        num = budget // per_block
        if kv.max_tokens is not None:
            num = min(num, -(-kv.max_tokens // kv.tokens_per_block))
        if num < 1:
            raise EngineConfigError(f"no room for a single KV block ({per_block} bytes); raise the KV cache budget")
        return num

    def _token_budget(self, decodes: int, context: int) -> int:
        """While requests decode: the tokens a step may take and still be predicted to end
        within step_time_target_ms, as the step model predicts (start-up timings, refitted
        to the steps measured since)."""
        return self.runner.tokens_within(self.config.step_time_target_ms, context)

    def _chunk_limit(self, context: int, tokens: int, pairs: int, start: int, want: int) -> int:
        """While requests decode: how much of a prompt chunk a step may take and still be
        predicted within step_time_target_ms, the chunk's attention over its prompt's
        earlier tokens counted (the step model learns what that costs)."""
        return self.runner.chunk_within(self.config.step_time_target_ms, context, tokens, pairs, start, want)

    # The Engine contract.

    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
               output_token_ids: Tokens[int] = ()) -> None:
        if request_id in self.requests:
            raise invalid("request_id", f"{request_id!r} is already in use")
        check_request(prompt_token_ids, params, self.vocab_size, self.max_seq_len, output_token_ids=output_token_ids)
        n = len(prompt_token_ids) + len(output_token_ids)
        if not self.config.enable_chunked_prefill and n > self.max_num_tokens:
            raise invalid("prompt_token_ids", f"has {n} tokens, over max_num_tokens {self.max_num_tokens} with chunked prefill off")
        seq = Sequence(request_id, prompt_token_ids, params)
        if output_token_ids:
            seq.output_token_ids = list(output_token_ids)
            seq.resumed = len(output_token_ids)
        need = self.scheduler.blocks_for_lifetime(seq)
        if need > self.pool.num_blocks:
            # Never servable here, however long it waits: not RESOURCE_EXHAUSTED, which
            # clients take as "retry later" (HTTP 429).
            raise invalid("max_tokens", f"prompt plus max_tokens needs {need} KV blocks; the whole cache holds {self.pool.num_blocks}")
        self.requests[request_id] = seq
        if params.has_penalties:
            self._penalized += 1
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        seq = self.requests.get(request_id)
        if seq is None:
            return False
        self._forget(seq)
        self.scheduler.remove(seq)  # a step in flight may still write its blocks: harmless,
        return True  # later steps that reuse them run after it on the same stream

    def has_work(self) -> bool:
        launched = self._launched
        if launched is not None and any(s.status is not SeqStatus.FINISHED for s in launched.sampled):
            return True
        return self.scheduler.has_work()

    def step(self) -> list[RequestOutput]:
        """Schedule and launch one step; return what the previous step produced.

        With overlap scheduling the host schedules and launches step N+1 while the device
        still runs step N: a decode whose last token is still on the device takes it
        from there. Step N's tokens are then read (they are usually ready) and returned.
        A request that stops on a token is found a step late; the extra token the device
        computed for it is dropped. Without overlap (on the CPU, or while a request with
        penalties runs, which read every output token) a step returns its own tokens."""
        overlap = self.overlap and not self._penalized
        outputs: list[RequestOutput] = []
        try:
            if self._launched is not None and not overlap:
                outputs += self._collect(self._launched)
                self._launched = None
            t0 = time.monotonic()
            chunks = self.scheduler.schedule()
            launched = self._launch(chunks) if chunks else None
            launched_at = time.monotonic()
            self._launch_s += 0.1 * (launched_at - t0 - self._launch_s)
            previous = self._launched
            if previous is not None:
                outputs += self._collect(previous)
            self._launched = launched
            if launched is not None and not overlap:
                self._launched = None
                outputs += self._collect(launched)
            self._queued = None
            if self._launched is not None:
                # The step just queued runs from when the one before it ended (seen if the
                # host waited for it; else no later than its own launch).
                prev = previous.sample if previous is not None else None
                self._queued = (prev.done_at if prev is not None and prev.waited else launched_at, chunks)
        except BaseException:
            self._launched = None  # the caller aborts the requests of a failed step
            raise
        return outputs

    def launch_wait(self) -> float:
        """Seconds the caller may spend taking in new requests before its next step() and
        still launch that step before the device runs out of queued work: the queued
        step's predicted time left, less what scheduling and launching a step takes (twice
        its running average, and a margin). Requests that arrive meanwhile join that step
        instead of the one after. 0 without overlap, or for a step not timed at start-up."""
        if self._queued is None:
            return 0.0
        start, chunks = self._queued
        predicted = self.runner.predict_ms(chunks)  # asked for here: a step need not pay for it
        if predicted is None:
            return 0.0
        free_at = start + LAUNCH_WAIT_SHARE * predicted / 1000
        return max(0.0, free_at - time.monotonic() - 2 * self._launch_s - LAUNCH_WAIT_MARGIN_S)

    def _launch(self, chunks: list[ScheduledChunk]) -> LaunchedStep:
        now = time.time()
        for ch in chunks:
            seq = ch.seq
            if not seq.counted_prompt:
                seq.counted_prompt = True
                seq.scheduled_at = now
                self.prompt_tokens_seen += len(seq.prompt_token_ids)
                self.prompt_tokens_cached += seq.num_cached_prompt
        sample, sampled = self.runner.run(chunks, self.eos_token_ids)
        for ch in chunks:
            ch.seq.num_computed += ch.num_tokens
            self._publish(ch.seq)
        for row, seq in enumerate(sampled):
            seq.num_pending += 1
            seq.pending_row = row
        return LaunchedStep(sample, sampled)

    def _collect(self, step: LaunchedStep) -> list[RequestOutput]:
        """Wait for a launched step's tokens and turn them into outputs."""
        if step.sample is None:
            return []
        result = step.sample.result()
        outputs: list[RequestOutput] = []
        for i, seq in enumerate(step.sampled):
            seq.num_pending -= 1
            if seq.status is SeqStatus.FINISHED:  # aborted, or stopped a step ago
                continue
            token = result.token_ids[i]
            seq.output_token_ids.append(token)
            self._publish(seq)
            out = RequestOutput(seq.request_id, [token], prompt_tokens=len(seq.prompt_token_ids),
                                cached_tokens=seq.num_cached_prompt)
            if len(seq.output_token_ids) == seq.resumed + 1:  # its first output here
                out.scheduled_at = seq.scheduled_at
            if result.logprobs[i] is not None:
                out.logprobs = [result.logprobs[i]]
            out.finish_reason = self._finish_reason(seq, token)
            if out.finish_reason:
                self._forget(seq)
                self.scheduler.remove(seq)
            outputs.append(out)
        return outputs

    def _publish(self, seq: Sequence) -> None:
        """Publish seq's newly full blocks whose tokens are all computed and known."""
        bs = self.pool.tokens_per_block
        full = min(seq.num_computed, seq.num_known) // bs
        if len(seq.block_hashes) >= full:
            return
        tokens = seq.all_token_ids
        while len(seq.block_hashes) < full:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if i else 0
            seq.block_hashes.append(self.pool.publish(seq.block_table[i], parent, tuple(tokens[i * bs : (i + 1) * bs])))

    def _forget(self, seq: Sequence) -> None:
        del self.requests[seq.request_id]
        if seq.params.has_penalties:
            self._penalized -= 1

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        n = len(seq.output_token_ids)
        if n >= p.min_tokens and (token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids)):
            return "stop"
        if n >= p.max_tokens or seq.num_known >= self.max_seq_len:
            return "length"
        return None

    def kv_events(self) -> tuple[list[int], list[int]]:
        return self.pool.drain_events()

    def stats(self) -> EngineStats:
        pool = self.pool
        return EngineStats(
            running=len(self.scheduler.running),
            queued=len(self.scheduler.waiting),
            kv_blocks_total=pool.num_blocks,
            kv_blocks_free=pool.num_free,
            kv_blocks_in_use=pool.num_blocks - pool.num_free,
            kv_blocks_cached=pool.num_cached,
            blocks_reused=pool.reused,
            blocks_evicted=pool.evicted,
            prefix_cache_hit_rate=self.prompt_tokens_cached / self.prompt_tokens_seen if self.prompt_tokens_seen else 0.0,
            preemptions=self.scheduler.preemptions,
            tokens_per_block=pool.tokens_per_block,
            steps_graph=self.runner.steps_graph,
            steps_eager=self.runner.steps_eager,
            kernel_compiles_late=self.runner.late_compiles(),
        )

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        """Run prompts to completion in one batch; returns each one's output token ids."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"generate-{next(self._arrivals)}" for _ in prompts]
        for rid, prompt, p in zip(ids, prompts, plist):
            self.submit(rid, prompt, p)
        out: dict[str, list[int]] = {rid: [] for rid in ids}
        while any(rid in self.requests for rid in ids):
            for o in self.step():
                if o.request_id in out:
                    out[o.request_id] += o.new_token_ids
        return [out[rid] for rid in ids]
