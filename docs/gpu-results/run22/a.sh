#!/bin/bash
# run 22, call 1: the one-row matmul on the CUDA cores (gemv_fma): tile sweep, then batch-1 steps
set -u
cd "$(dirname "$0")/../.."
R=/tmp/r22a; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > $R/gpu.txt 2>&1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > $R/pip.log 2>&1
export PYTHONPATH=/tmp/site:$PWD
python3 -m inflight.stubs >> $R/pip.log 2>&1
t() { local name=$1 lim=$2; shift 2; local s=$(date +%s); timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $(( $(date +%s) - s ))s" >> $R/times.txt; }
t gemv_fma 300 python3 -m bench.gemv_fma --compile-workers 12 --out $R/gemv_fma.json
t dec_1b 100 python3 -m bench.decode_latency --shape llama-3.2-1b --batches 1 --steps 64 --hf-new-tokens 0 --variants all all+fma --out $R/dec_1b.json
t dec_8b_fp8 160 python3 -m bench.decode_latency --shape llama-3-8b --batches 1 --steps 32 --hf-new-tokens 0 --quantization fp8 --variants all all+fma --out $R/dec_8b_fp8.json
cat $R/times.txt
tar czf $OUT/r22a.tgz -C /tmp r22a
