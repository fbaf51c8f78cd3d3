#!/bin/bash
# run 23, call 1: steps of 2 and 4 tokens on the CUDA cores (fma_max_rows 2, 4) against the dot; gemv_fma's tiles at 2 rows
set -u
cd "$(dirname "$0")/../.."
R=/tmp/r23a; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > $R/gpu.txt 2>&1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > $R/pip.log 2>&1
export PYTHONPATH=/tmp/site:$PWD
python3 -m inflight.stubs >> $R/pip.log 2>&1
t() { local name=$1 lim=$2; shift 2; local s=$(date +%s); timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $(( $(date +%s) - s ))s" >> $R/times.txt; }
t dec_1b 130 python3 -m bench.decode_latency --shape llama-3.2-1b --batches 2 4 --steps 64 --hf-new-tokens 0 --quantization none fp8 --variants all all+fma2 all+fma4 --out $R/dec_1b.json
t dec_8b 200 python3 -m bench.decode_latency --shape llama-3-8b --batches 2 4 --steps 32 --hf-new-tokens 0 --quantization none fp8 --variants all all+fma2 all+fma4 --out $R/dec_8b.json
t gemv_r2 200 python3 -m bench.gemv_fma --compile-workers 14 --rows 2 --cases 1b.qkv:bf16 1b.o:bf16 1b.gate_up:bf16 1b.down:bf16 8b.o:bf16 8b.down:bf16 8b.o:fp8 8b.down:fp8 --block-n 4 8 16 --block-k 512 1024 --block-k-8bit 1024 2048 --warps 4 8 --unroll 2 4 --acc-2d 0 --out $R/gemv_r2.json
cat $R/times.txt
tar czf $OUT/r23a.tgz -C /tmp r23a
