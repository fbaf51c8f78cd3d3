#!/bin/bash
# run 23, call 3: gemv_fma with a sum of its own for each row (2 and 4 rows), tiles swept; then steps of 2 and 4 tokens
set -u
cd "$(dirname "$0")/../.."
R=/tmp/r23c; mkdir -p $R
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > $R/pip.log 2>&1
export PYTHONPATH=/tmp/site:$PWD
python3 -m inflight.stubs >> $R/pip.log 2>&1
t() { local name=$1 lim=$2; shift 2; local s=$(date +%s); timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $(( $(date +%s) - s ))s" >> $R/times.txt; }
C="1b.qkv:bf16 1b.o:bf16 1b.gate_up:bf16 1b.down:bf16 8b.qkv:bf16 8b.o:bf16 8b.gate_up:bf16 8b.down:bf16 8b.qkv:fp8 8b.o:fp8 8b.gate_up:fp8 8b.down:fp8"
t gemv_r2 170 python3 -m bench.gemv_fma --compile-workers 14 --rows 2 --cases $C --block-n 2 4 8 16 --block-k 512 1024 --block-k-8bit 1024 2048 --warps 4 --unroll 1 2 4 --acc-2d 0 1 --out $R/gemv_r2.json
t gemv_r4 170 python3 -m bench.gemv_fma --compile-workers 14 --rows 4 --cases $C --block-n 2 4 8 16 --block-k 256 512 1024 --block-k-8bit 512 1024 2048 --warps 4 --unroll 1 2 --acc-2d 0 1 --out $R/gemv_r4.json
t dec_1b 110 python3 -m bench.decode_latency --shape llama-3.2-1b --batches 2 4 --steps 64 --hf-new-tokens 0 --quantization none fp8 --variants all all+fma4 --out $R/dec_1b.json
cat $R/times.txt
tar czf $OUT/r23c.tgz -C /tmp r23c
