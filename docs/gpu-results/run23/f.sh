#!/bin/bash
# run 23, call 6: the closed loop through the stack at today's defaults (16, 64, 256 streams), hop by hop
set -u
cd "$(dirname "$0")/../.."
R=/tmp/r23f; mkdir -p $R
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > $R/pip.log 2>&1
export PYTHONPATH=/tmp/site:$PWD
python3 -m inflight.stubs >> $R/pip.log 2>&1
t() { local name=$1 lim=$2; shift 2; local s=$(date +%s); timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $(( $(date +%s) - s ))s" >> $R/times.txt; }
t closed_1b 330 python3 -m bench.serving_load --shape llama-3.2-1b --vocab 49152 --tokenizer .bench/tok --concurrency 16 64 256 --breakdown --load-procs 5 --out $R/closed_1b.json
cat $R/times.txt
tar czf $OUT/r23f.tgz -C /tmp r23f
