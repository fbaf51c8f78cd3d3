#!/bin/bash
# run 22, call 2: gemv_fma's tiles swept finer; batch-1 steps with the first sweep's tiles
set -u
cd "$(dirname "$0")/../.."
R=/tmp/r22b; mkdir -p $R
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > $R/pip.log 2>&1
export PYTHONPATH=/tmp/site:$PWD
python3 -m inflight.stubs >> $R/pip.log 2>&1
t() { local name=$1 lim=$2; shift 2; local s=$(date +%s); timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $(( $(date +%s) - s ))s" >> $R/times.txt; }
t dec_1b 60 python3 -m bench.decode_latency --shape llama-3.2-1b --batches 1 --steps 64 --hf-new-tokens 0 --variants all all+fma --out $R/dec_1b.json
t dec_8b 200 python3 -m bench.decode_latency --shape llama-3-8b --batches 1 --steps 32 --hf-new-tokens 0 --quantization fp8 none int8-weight-only --variants all all+fma --out $R/dec_8b.json
t gemv_fma2 300 python3 -m bench.gemv_fma --compile-workers 14 --cases 1b.qkv:bf16 1b.o:bf16 1b.down:bf16 8b.qkv:bf16 8b.o:bf16 8b.gate_up:bf16 8b.down:bf16 8b.qkv:fp8 8b.o:fp8 8b.gate_up:fp8 8b.down:fp8 8b.down:int8 --block-n 4 8 16 --block-k 512 1024 --block-k-8bit 512 1024 2048 --warps 4 8 --unroll 2 4 --acc-2d 0 1 --out $R/gemv_fma2.json
cat $R/times.txt
tar czf $OUT/r22b.tgz -C /tmp r22b
