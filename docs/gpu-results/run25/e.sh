#!/bin/bash
# run 25, call 5: the 8B at 24/s with late launch (--launch-wait true), step targets 15 (again) and 14.5; no margin
# (call 4's margin moved TTFT p99 from 122 to 176 ms and is reverted)
set -u
cd "$(dirname "$0")/../.."
R=/tmp/r25e; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > $R/gpu.txt 2>&1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > $R/pip.log 2>&1
export PYTHONPATH=/tmp/site:$PWD
python3 -m inflight.stubs >> $R/pip.log 2>&1
t() { local name=$1 lim=$2; shift 2; local s=$(date +%s); timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $(( $(date +%s) - s ))s" >> $R/times.txt; }
L="--shape llama-3-8b --vocab 49152 --tokenizer .bench/tok --rates 24 --seconds 20 --slo-ttft-ms 150 --slo-itl-ms 15 --serve-flags=--launch-wait=true"
t load_8b_t145 260 python3 -m bench.serving_load $L --step-time-target-ms 14.5 --out $R/load_8b_t145.json
t load_8b_t15 260 python3 -m bench.serving_load $L --out $R/load_8b_t15.json
cat $R/times.txt
for f in $R/load_*.log; do echo "== $f"; grep -h "  direct \|  served \|rate " $f | cut -c1-300 | head -20; done
tar czf $OUT/r25e.tgz -C /tmp r25e
