#!/bin/bash
# run 22, call 3: batch-1 steps with the swept tiles; where a bf16 step's time goes with each kernel
set -u
cd "$(dirname "$0")/../.."
R=/tmp/r22c; mkdir -p $R
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > $R/pip.log 2>&1
export PYTHONPATH=/tmp/site:$PWD
python3 -m inflight.stubs >> $R/pip.log 2>&1
t() { local name=$1 lim=$2; shift 2; local s=$(date +%s); timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $(( $(date +%s) - s ))s" >> $R/times.txt; }
t dec_8b 150 python3 -m bench.decode_latency --shape llama-3-8b --batches 1 --steps 32 --hf-new-tokens 0 --quantization fp8 none --variants all+dot all+fma --out $R/dec_8b.json
t dec_1b 90 python3 -m bench.decode_latency --shape llama-3.2-1b --batches 1 --steps 64 --hf-new-tokens 0 --quantization none fp8 --variants all+dot all+fma --out $R/dec_1b.json
t prof_8b_dot 100 python3 -m bench.profile decode --shape llama-3-8b --batch 1 --steps 20 --graphs --variant all+dot --out $R/prof_8b_dot.json
t prof_8b_fma 100 python3 -m bench.profile decode --shape llama-3-8b --batch 1 --steps 20 --graphs --variant all+fma --out $R/prof_8b_fma.json
t prof_1b_fma 80 python3 -m bench.profile decode --shape llama-3.2-1b --batch 1 --steps 20 --graphs --variant all+fma --out $R/prof_1b_fma.json
t prof_8b_fp8_fma 100 python3 -m bench.profile decode --shape llama-3-8b --quantization fp8 --batch 1 --steps 20 --graphs --variant all+fma --out $R/prof_8b_fp8_fma.json
cat $R/times.txt
tar czf $OUT/r22c.tgz -C /tmp r22c
