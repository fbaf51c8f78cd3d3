#!/bin/bash
# run 23, call 2: the serving targets at today's defaults (open loop 1B at 8 and 96/s; 8B at 24/s from a fresh stack)
set -u
cd "$(dirname "$0")/../.."
R=/tmp/r23b; mkdir -p $R
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > $R/pip.log 2>&1
export PYTHONPATH=/tmp/site:$PWD
python3 -m inflight.stubs >> $R/pip.log 2>&1
t() { local name=$1 lim=$2; shift 2; local s=$(date +%s); timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $(( $(date +%s) - s ))s" >> $R/times.txt; }
t load_8b_24 280 python3 -m bench.serving_load --shape llama-3-8b --vocab 49152 --tokenizer .bench/tok --rates 24 --seconds 20 --slo-ttft-ms 150 --slo-itl-ms 15 --out $R/load_8b_24.json
t load_1b 290 python3 -m bench.serving_load --shape llama-3.2-1b --vocab 49152 --tokenizer .bench/tok --rates 8 96 --seconds 20 --out $R/load_1b.json
cat $R/times.txt
tar czf $OUT/r23b.tgz -C /tmp r23b
