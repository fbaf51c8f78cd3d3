#!/bin/bash
# run 24, call 3: the paged varlen kernel rewritten (exp2, no causal mask on the tiles every row sees whole): its launch configurations again, and every kernel against float64
set -u
cd "$(dirname "$0")/../.."
R=/tmp/r24c; mkdir -p $R
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > $R/pip.log 2>&1
export PYTHONPATH=/tmp/site:$PWD
python3 -m inflight.stubs >> $R/pip.log 2>&1
t() { local name=$1 lim=$2; shift 2; local s=$(date +%s); timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $(( $(date +%s) - s ))s" >> $R/times.txt; }
t pvt 330 python3 -m bench.paged_varlen_tune --kv-cache-dtype fp8 auto --cases 2048/128 2048x1 1000x2 1b:2048/128 --rows 64 128 --tiles 64 128 --warps 4 8 --stages 0 2 3 --out $R/pvt.json
t kcheck 200 python3 -m bench.kernel_check --out $R/kernel_check.json
cat $R/times.txt
tar czf $OUT/r24c.tgz -C /tmp r24c
