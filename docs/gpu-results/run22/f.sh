#!/bin/bash
# run 22, call 6: the RMSNorm in gemv_fma's prologue: checked bit for bit, then batch-1 steps
set -u
cd "$(dirname "$0")/../.."
R=/tmp/r22f; mkdir -p $R
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > $R/pip.log 2>&1
export PYTHONPATH=/tmp/site:$PWD
python3 -m inflight.stubs >> $R/pip.log 2>&1
t() { local name=$1 lim=$2; shift 2; local s=$(date +%s); timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $(( $(date +%s) - s ))s" >> $R/times.txt; }
t check_1b 120 python3 -m bench.one_row_check --shape llama-3.2-1b --out $R/check_1b.json
t dec_1b 80 python3 -m bench.decode_latency --shape llama-3.2-1b --batches 1 --steps 64 --hf-new-tokens 0 --quantization none fp8 --variants all pdl+prefetch+silu+quant --out $R/dec_1b.json
t dec_8b 110 python3 -m bench.decode_latency --shape llama-3-8b --batches 1 --steps 32 --hf-new-tokens 0 --quantization none fp8 --variants all pdl+prefetch+silu+quant --out $R/dec_8b.json
t prof_1b 40 python3 -m bench.profile decode --shape llama-3.2-1b --batch 1 --steps 20 --graphs --variant all --out $R/prof_1b.json
cat $R/times.txt
tar czf $OUT/r22f.tgz -C /tmp r22f
