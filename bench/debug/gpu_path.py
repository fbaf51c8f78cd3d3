import sys, torch, traceback
sys.path.insert(0, ".")
from bench.shapes import model_config
from inflight.sampling_params import SamplingParams
from worker.embedded.engine import EmbeddedEngine
from worker.embedded import model_runner as mr
from worker.engine_api import EngineConfig, KvCacheConfig
shape = sys.argv[1]
cfg = model_config(shape)
for kv in sys.argv[3:]:
    k, v = kv.split("=")
    setattr(cfg, k, type(getattr(cfg, k))(v))
orig = mr.ModelRunner._replay
def traced(self, chunks):
    B = len(chunks); G = self.graph_max
    out = orig(self, chunks)
    h = self.h_np
    print("B", B, "ids", h[:B], "pos", h[G:G+B], "slots", h[2*G:2*G+B], "ctx", h[3*G:3*G+B], "scratch", self.scratch_slot,
          "tables", [c.seq.block_table for c in chunks], "kv blocks", self.kv_caches[0][0].shape, flush=True)
    g = self.g_buf[:4*G].cpu()
    print("device ids", g[:B].tolist(), "rows", flush=True)
    return out
mr.ModelRunner._replay = traced
if len(sys.argv) > 2 and sys.argv[2] == "eager-static":
    torch.cuda.graph_pool_handle = lambda: None
if len(sys.argv) > 2 and sys.argv[2] == "own-pools":
    _graph = torch.cuda.graph
    torch.cuda.graph = lambda g, pool=None, **kw: _graph(g, **kw)
if len(sys.argv) > 2 and sys.argv[2].startswith("unfuse-"):
    from worker.embedded import llama
    _use = llama.LlamaForCausalLM.use_fused_kernels
    def use(self, on=True):
        _use(self, on)
        for m in self.modules():
            if type(m).__name__ == sys.argv[2].removeprefix("unfuse-"):
                m.fused = False
    llama.LlamaForCausalLM.use_fused_kernels = use
if len(sys.argv) > 2 and sys.argv[2] == "one-size":
    mr.GRAPH_BATCH_SIZES = (2,)
for graphs, mbs, msl in ((True, 8, 1024),):
    try:
        e = EmbeddedEngine(EngineConfig(device="cuda", dtype="bfloat16", cuda_graphs=graphs, max_batch_size=mbs, max_seq_len=msl,
                                        kv_cache=KvCacheConfig(tokens_per_block=32, max_tokens=16384)), cfg)
        print("graph sizes", e.runner.graph_sizes, "vocab", e.vocab_size, flush=True)
        print("graphs", graphs, mbs, msl, e.generate([list(range(10, 50)), list(range(5, 9))], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)), flush=True)
        del e
    except Exception:
        traceback.print_exc()
        break
