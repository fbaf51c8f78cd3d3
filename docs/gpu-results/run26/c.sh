#!/bin/bash
# run 26, call 3: the 8B at 24/s through the stack as shipped (margin on, late launch off), three 20 s windows; the
# 1B closed loop with and without late launch
set -u
cd "$(dirname "$0")/../.."
R=/tmp/r26c; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,pci.bus_id --format=csv > $R/gpu.txt 2>&1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > $R/pip.log 2>&1
export PYTHONPATH=/tmp/site:$PWD
python3 -m inflight.stubs >> $R/pip.log 2>&1
t() { local name=$1 lim=$2; shift 2; local s=$(date +%s); timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $(( $(date +%s) - s ))s" >> $R/times.txt; }
L="--shape llama-3-8b --vocab 49152 --tokenizer .bench/tok --rates 24 24 24 --seconds 20 --slo-ttft-ms 150 --slo-itl-ms 15"
t load_8b_served_default 300 python3 -m bench.serving_load $L --out $R/load_8b_served_default.json
C="--shape llama-3.2-1b --vocab 49152 --tokenizer .bench/tok --concurrency 16 64 256 --load-procs 5"
t load_1b_closed_lw 120 python3 -m bench.serving_load $C --serve-flags=--launch-wait=true --out $R/load_1b_closed_lw.json
t load_1b_closed 120 python3 -m bench.serving_load $C --out $R/load_1b_closed.json
cat $R/times.txt
for f in $R/load_*.log; do echo "== $f"; grep -h "  direct \|  served \|rate \|streams " $f | cut -c1-300 | grep -v "step-time fit\|a connection:" | head -20; done
tar czf $OUT/r26c.tgz -C /tmp r26c
