#!/bin/bash
# run 25, call 4: late launch (--launch-wait true) and the step-time margin (steps sized to the target less the p90 of
# how far sized steps ran past their prediction): the 8B at 24/s, the 1B at 8 and 96/s, and the 1B closed loop
set -u
cd "$(dirname "$0")/../.."
R=/tmp/r25d; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > $R/gpu.txt 2>&1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > $R/pip.log 2>&1
export PYTHONPATH=/tmp/site:$PWD
python3 -m inflight.stubs >> $R/pip.log 2>&1
t() { local name=$1 lim=$2; shift 2; local s=$(date +%s); timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $(( $(date +%s) - s ))s" >> $R/times.txt; }
LW="--serve-flags=--launch-wait=true"
t load_8b_t15 220 python3 -m bench.serving_load --shape llama-3-8b --vocab 49152 --tokenizer .bench/tok --rates 24 --seconds 20 --slo-ttft-ms 150 --slo-itl-ms 15 $LW --out $R/load_8b_t15.json
t load_1b_open 170 python3 -m bench.serving_load --shape llama-3.2-1b --vocab 49152 --tokenizer .bench/tok --rates 8 96 --seconds 20 $LW --out $R/load_1b_open.json
t load_1b_closed 190 python3 -m bench.serving_load --shape llama-3.2-1b --vocab 49152 --tokenizer .bench/tok --concurrency 16 64 256 --breakdown --load-procs 5 $LW --out $R/load_1b_closed.json
cat $R/times.txt
for f in $R/load_*.log; do echo "== $f"; grep -h "residual\|  direct \|  served \|rate \|streams " $f | cut -c1-400 | head -20; done
tar czf $OUT/r25d.tgz -C /tmp r25d
