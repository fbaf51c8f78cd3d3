#!/bin/bash
# run 26, call 2: the 8B at 24/s through the stack, margin on (the default), late launch, three 20 s windows; then
# the engine alone over an FP8 KV cache (bf16 weights), three windows
set -u
cd "$(dirname "$0")/../.."
R=/tmp/r26b; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,pci.bus_id --format=csv > $R/gpu.txt 2>&1
nvidia-smi -q -d CLOCK,PERFORMANCE > $R/clocks_before.txt 2>&1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > $R/pip.log 2>&1
export PYTHONPATH=/tmp/site:$PWD
python3 -m inflight.stubs >> $R/pip.log 2>&1
t() { local name=$1 lim=$2; shift 2; local s=$(date +%s); timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $(( $(date +%s) - s ))s" >> $R/times.txt; }
L="--shape llama-3-8b --vocab 49152 --tokenizer .bench/tok --rates 24 24 24 --seconds 20 --slo-ttft-ms 150 --slo-itl-ms 15"
t load_8b_served_margin_on 330 python3 -m bench.serving_load $L --step-time-margin on --serve-flags=--launch-wait=true --out $R/load_8b_served_margin_on.json
t load_8b_fp8kv 230 python3 -m bench.serving_load $L --direct-only --kv-cache-dtype fp8 --out $R/load_8b_fp8kv.json
nvidia-smi -q -d CLOCK,PERFORMANCE > $R/clocks_after.txt 2>&1
cat $R/times.txt
for f in $R/load_*.log; do echo "== $f"; grep -h "  direct \|  served \|rate " $f | cut -c1-300 | grep -v "step-time fit" | head -20; grep -h "residual" $f | grep -o "'sized': {[^}]*}" | head -6; done
tar czf $OUT/r26b.tgz -C /tmp r26b
