#!/bin/bash
# run 27, call 3 (owed): the serving mix's window profiled with KernelConfig.decode_order arrival and longest-first
# (the _paged_decode row is the kernel inside the engine's graphs), then the 8B at 24/s engine alone, two windows each way
set -u
cd "$(dirname "$0")/../.."
R=/tmp/r27c; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,pci.bus_id --format=csv > $R/gpu.txt 2>&1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > $R/pip.log 2>&1
export PYTHONPATH=/tmp/site:$PWD
python3 -m inflight.stubs >> $R/pip.log 2>&1
t() { local name=$1 lim=$2; shift 2; local s=$(date +%s); timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $(( $(date +%s) - s ))s" >> $R/times.txt; }
P="--shape llama-3-8b --lengths 128 1024 128 512 --requests 1200 --max-batch-size 160 --step-time-target-ms 15 --skip 600 --steps 30"
t prof_arrival 150 python3 -m bench.profile window $P --decode-order arrival --out $R/prof_arrival.json
t prof_longest 150 python3 -m bench.profile window $P --decode-order longest-first --out $R/prof_longest.json
L="--shape llama-3-8b --vocab 49152 --tokenizer .bench/tok --rates 24 24 --seconds 20 --slo-ttft-ms 150 --slo-itl-ms 15 --direct-only"
t load_arrival 150 python3 -m bench.serving_load $L --out $R/load_arrival.json
INFLIGHT_DECODE_ORDER=longest-first t load_longest 150 python3 -m bench.serving_load $L --out $R/load_longest.json
cat $R/times.txt
for f in arrival longest; do grep -m2 "window:\|first kernel" $R/prof_$f.log; grep -m1 "_paged_decode" $R/prof_$f.log; done
for f in arrival longest; do echo "== $f"; grep -h "  direct \|rate " $R/load_$f.log | cut -c1-300; done
tar czf $OUT/r27c.tgz -C /tmp r27c
