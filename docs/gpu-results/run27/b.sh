#!/bin/bash
# run 27, call 2 (owed): the decode kernel at the serving mix's point (127 decodes of 128-1,536 tokens, 33 padding rows):
# rows longest first and programs started row by row (KernelConfig.decode_order), splits, tiles; then the engine's
# serving-mix window profiled both ways, and the 8B at 24/s engine alone, three windows each way
set -u
cd "$(dirname "$0")/../.."
R=/tmp/r27b; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,pci.bus_id --format=csv > $R/gpu.txt 2>&1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > $R/pip.log 2>&1
export PYTHONPATH=/tmp/site:$PWD
python3 -m inflight.stubs >> $R/pip.log 2>&1
t() { local name=$1 lim=$2; shift 2; local s=$(date +%s); timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $(( $(date +%s) - s ))s" >> $R/times.txt; }
t pdt_order 150 python3 -m bench.paged_decode_tune --heads 8b --batches 127 --contexts mixed 755 --pad-rows 33 --orders given longest-first --grids heads-outer rows-outer --splits 1 2 --tiles 64 128 --stages 0 2 --out $R/pdt_order.json
# trtllm-bench's 128/128 decodes: 512 sequences of ~181 tokens, where the kernel read the FP8 cache at 1.6 TB/s (run 24)
t pdt_short 200 python3 -m bench.paged_decode_tune --kv-cache-dtype fp8 --fp8-reads words --heads 8b --batches 512 --contexts 181 mixed:128-256 --splits 1 2 --tiles 32 64 128 --warps 2 4 --stages 1 2 3 --out $R/pdt_short.json
t pdt_short_bf16 120 python3 -m bench.paged_decode_tune --heads 8b --batches 512 --contexts mixed:128-256 --splits 1 --tiles 32 64 128 --warps 2 4 --stages 1 2 3 --out $R/pdt_short_bf16.json
P="--shape llama-3-8b --lengths 128 1024 128 512 --requests 1200 --max-batch-size 160 --step-time-target-ms 15 --skip 600 --steps 30"
t prof_arrival 150 python3 -m bench.profile window $P --decode-order arrival --out $R/prof_arrival.json
t prof_longest 150 python3 -m bench.profile window $P --decode-order longest-first --out $R/prof_longest.json
cat $R/times.txt
cut -c1-220 $R/pdt_order.log $R/pdt_short.log $R/pdt_short_bf16.log
python3 - <<'P'
import json
for r in json.load(open("/tmp/r27b/pdt_order.json"))["results"]:
    print(r["context"], r["order"], " ".join(f"{t['splits']}/{t['tile']}/{t['stages']}/{t['grid'][:4]}:{t['us']:.1f}" for t in r["timings"]))
P
for f in arrival longest; do grep -m3 "window:\|first kernel\|_paged_decode" $R/prof_$f.log; done
tar czf $OUT/r27b.tgz -C /tmp r27b
