#!/bin/bash
# run 22, call 5: batch-1 steps at the final choices (fma default, gated fma on the 1B gate_up), against the dot
set -u
cd "$(dirname "$0")/../.."
R=/tmp/r22e; mkdir -p $R
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > $R/pip.log 2>&1
export PYTHONPATH=/tmp/site:$PWD
python3 -m inflight.stubs >> $R/pip.log 2>&1
t() { local name=$1 lim=$2; shift 2; local s=$(date +%s); timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $(( $(date +%s) - s ))s" >> $R/times.txt; }
t dec_1b 90 python3 -m bench.decode_latency --shape llama-3.2-1b --batches 1 --steps 64 --hf-new-tokens 0 --quantization none fp8 int8-weight-only --variants all all+dot --out $R/dec_1b.json
t dec_135m 60 python3 -m bench.decode_latency --shape smollm2-135m --batches 1 --steps 64 --hf-new-tokens 0 --variants all all+dot --out $R/dec_135m.json
t prof_1b 60 python3 -m bench.profile decode --shape llama-3.2-1b --batch 1 --steps 20 --graphs --variant all --out $R/prof_1b.json
t dec_8b 120 python3 -m bench.decode_latency --shape llama-3-8b --batches 1 --steps 32 --hf-new-tokens 0 --quantization none fp8 --variants all --out $R/dec_8b.json
cat $R/times.txt
tar czf $OUT/r22e.tgz -C /tmp r22e
