#!/bin/bash
# run 25, call 6: the step-time margin on and off on one machine (calls 4 and 5 ran on a second, slower H200 than calls
# 1-3, where TTFT p99 at the same settings was 176 against 122 ms): the 8B at 24/s, late launch, step target 15 ms
set -u
cd "$(dirname "$0")/../.."
R=/tmp/r25f; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,pci.bus_id,serial --format=csv > $R/gpu.txt 2>&1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > $R/pip.log 2>&1
export PYTHONPATH=/tmp/site:$PWD
python3 -m inflight.stubs >> $R/pip.log 2>&1
t() { local name=$1 lim=$2; shift 2; local s=$(date +%s); timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $(( $(date +%s) - s ))s" >> $R/times.txt; }
L="--shape llama-3-8b --vocab 49152 --tokenizer .bench/tok --rates 24 --seconds 20 --slo-ttft-ms 150 --slo-itl-ms 15 --serve-flags=--launch-wait=true"
t load_8b_margin_on 175 python3 -m bench.serving_load $L --step-time-margin on --out $R/load_8b_margin_on.json
t load_8b_margin_off 175 python3 -m bench.serving_load $L --step-time-margin off --out $R/load_8b_margin_off.json
cat $R/times.txt
for f in $R/load_*.log; do echo "== $f"; grep -h "  direct \|  served \|rate " $f | cut -c1-300 | head -20; done
tar czf $OUT/r25f.tgz -C /tmp r25f
