#!/bin/bash
# run 24, call 2: the paged varlen kernel's launch configurations on trtllm-bench's prompt chunks; the decode kernel's splits at the batches those runs decode
set -u
cd "$(dirname "$0")/../.."
R=/tmp/r24b; mkdir -p $R
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > $R/pip.log 2>&1
export PYTHONPATH=/tmp/site:$PWD
python3 -m inflight.stubs >> $R/pip.log 2>&1
t() { local name=$1 lim=$2; shift 2; local s=$(date +%s); timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $(( $(date +%s) - s ))s" >> $R/times.txt; }
t pvt 330 python3 -m bench.paged_varlen_tune --kv-cache-dtype fp8 auto --cases 2048/128 2048x1 1000x2 1b:2048/128 --rows 64 128 --tiles 64 128 --warps 4 8 --stages 0 2 --out $R/pvt.json
t pdt 150 python3 -m bench.paged_decode_tune --kv-cache-dtype fp8 --fp8-reads words --heads 8b --batches 120 400 --contexts 2112 1413 --splits 1 2 4 --tiles 128 --warps 4 --stages 2 --out $R/pdt.json
cat $R/times.txt
tar czf $OUT/r24b.tgz -C /tmp r24b
