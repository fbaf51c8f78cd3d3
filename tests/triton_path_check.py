"""Run in a subprocess with TRITON_INTERPRET=1 (see test_triton_path.py): the engine's
GPU attention path (Triton paged-decode kernel, per-sequence prefill, prefix-cached and
chunked prefill) on the CPU, against the reference path, on the real model. Prints JSON."""

import json
import sys

from inflight.sampling_params import SamplingParams
from worker.embedded.engine import EmbeddedEngine
from worker.engine_api import EngineConfig, KvCacheConfig


def main() -> None:
    model = sys.argv[1]
    prompts = [[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 30, 2], [1, 4093, 198, 22464, 17, 2],
               [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 30, 2, 198, 1, 4093, 198, 504, 3575, 282, 4649, 314, 2]]
    out = {}
    for attention, graphs, overlap in (("reference", False, "off"), ("triton", False, "off"), ("triton", True, "off"),
                                       ("triton", True, "on")):
        # cuda_graphs on the CPU runs the graph path's static buffers eagerly.
        cfg = EngineConfig(model=model, device="cpu", attention=attention, max_num_tokens=16,  # chunked prefill
                           kv_cache=KvCacheConfig(tokens_per_block=4, cpu_bytes=64 * 2**20), cuda_graphs=graphs,
                           max_batch_size=4, max_seq_len=256, overlap_scheduler=overlap)
        engine = EmbeddedEngine(cfg)
        params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        first = engine.generate(prompts[:2], params)
        again = engine.generate(prompts, params)  # the third shares a cached prefix with the first
        out[attention + ("+graphs" if graphs else "") + ("+overlap" if overlap == "on" else "")] = {"first": first, "again": again, "reused": engine.stats().blocks_reused}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
