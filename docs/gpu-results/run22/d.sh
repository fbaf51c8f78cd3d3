#!/bin/bash
# run 22, call 4: gemv_fma's gated form on the 1B gate_up
set -u
cd "$(dirname "$0")/../.."
R=/tmp/r22d; mkdir -p $R
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > $R/pip.log 2>&1
export PYTHONPATH=/tmp/site:$PWD
python3 -m inflight.stubs >> $R/pip.log 2>&1
t() { local name=$1 lim=$2; shift 2; local s=$(date +%s); timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $(( $(date +%s) - s ))s" >> $R/times.txt; }
t gated 200 python3 -m bench.gemv_fma --compile-workers 14 --cases 1b.gate_up:bf16 135m.gate_up:bf16 --block-n 2 4 8 16 --block-k 256 512 1024 --warps 4 8 --unroll 1 2 4 --acc-2d 0 1 --out $R/gated.json
t small 200 python3 -m bench.gemv_fma --compile-workers 14 --cases 135m.qkv:bf16 --block-n 2 4 8 16 --block-k 128 256 512 --warps 2 4 --unroll 1 2 --acc-2d 0 1 --out $R/small.json
cat $R/times.txt
tar czf $OUT/r22d.tgz -C /tmp r22d
