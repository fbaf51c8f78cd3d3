"""InstantEngine: a model-free TEST DOUBLE of the Engine contract, for benchmarks that
measure the gateway and scheduler path alone. Each step gives every running request one
token from a fixed cycle of ordinary text tokens, with no model and no KV cache."""

from __future__ import annotations

import os
import time
from collections import OrderedDict

from inflight.errors import invalid
from inflight.sampling_params import SamplingParams
from inflight.schema import EngineStats, RequestOutput
from inflight.validation import check_request
from worker.engine_api import EngineConfig

# " the quick brown fox jumps over the lazy dog." in SmolLM2's vocabulary, more or less:
# any ids in range detokenize to text, which is all the gateway needs.
CYCLE = [260, 2365, 6354, 16439, 23428, 690, 260, 16154, 2767, 30]


class InstantEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        # ENGINE_DOUBLE_STEP_MS makes each step take that long, like a GPU decode step;
        # with ENGINE_DOUBLE_BUSY=1 the step spins in Python holding the GIL meanwhile, like
        # a launch-bound step loop, instead of sleeping.
        self.step_seconds = float(os.environ.get("ENGINE_DOUBLE_STEP_MS", "0")) / 1000
        self.busy = os.environ.get("ENGINE_DOUBLE_BUSY") == "1"
        self.vocab_size = 49152
        self.max_seq_len = config.max_seq_len or 8192
        self.eos_token_ids = (2,)
        self.model_dir = None
        self.requests: OrderedDict[str, list] = OrderedDict()  # id -> [params, produced]

    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
               output_token_ids=()) -> None:
        if request_id in self.requests:
            raise invalid("request_id", "already in use")
        check_request(prompt_token_ids, params, self.vocab_size, self.max_seq_len, output_token_ids=output_token_ids)
        self.requests[request_id] = [params, len(output_token_ids), len(prompt_token_ids)]  # goes on from where it was

    def abort(self, request_id: str) -> bool:
        return self.requests.pop(request_id, None) is not None

    def has_work(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        started = time.time()  # the step that first runs a request is its scheduled_at, as the contract has it
        if self.step_seconds and self.busy:
            until = time.perf_counter() + self.step_seconds
            while time.perf_counter() < until:
                pass
        elif self.step_seconds:
            time.sleep(self.step_seconds)
        outputs = []
        for rid, state in list(self.requests.items())[: self.config.max_batch_size]:
            params, produced, prompt = state
            state[1] = produced + 1
            out = RequestOutput(rid, [CYCLE[produced % len(CYCLE)]], prompt_tokens=prompt,
                                scheduled_at=started if produced == 0 else None)
            if state[1] >= params.max_tokens:
                out.finish_reason = "length"
                del self.requests[rid]
            outputs.append(out)
        return outputs

    def kv_events(self):
        return [], []

    def stats(self) -> EngineStats:
        n = len(self.requests)
        running = min(n, self.config.max_batch_size)
        return EngineStats(running, n - running, 0, 0, 0, 0, 0, 0, 0.0, 0, 16)
