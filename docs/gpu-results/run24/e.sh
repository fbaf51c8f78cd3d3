#!/bin/bash
# run 24, call 5: the 8B at 24 requests a second with steps sized to 14 and 14.5 ms (the faster varlen kernel left TTFT p99 room)
set -u
cd "$(dirname "$0")/../.."
R=/tmp/r24e; mkdir -p $R
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > $R/pip.log 2>&1
export PYTHONPATH=/tmp/site:$PWD
python3 -m inflight.stubs >> $R/pip.log 2>&1
t() { local name=$1 lim=$2; shift 2; local s=$(date +%s); timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $(( $(date +%s) - s ))s" >> $R/times.txt; }
t load_8b_24_t14 220 python3 -m bench.serving_load --shape llama-3-8b --vocab 49152 --tokenizer .bench/tok --rates 24 --seconds 20 --slo-ttft-ms 150 --slo-itl-ms 15 --step-time-target-ms 14 --out $R/load_8b_24_t14.json
t load_8b_24_t145 220 python3 -m bench.serving_load --shape llama-3-8b --vocab 49152 --tokenizer .bench/tok --rates 24 --seconds 20 --slo-ttft-ms 150 --slo-itl-ms 15 --step-time-target-ms 14.5 --out $R/load_8b_24_t145.json
cat $R/times.txt
tar czf $OUT/r24e.tgz -C /tmp r24e
