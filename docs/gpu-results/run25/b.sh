#!/bin/bash
# run 25, call 2: the RMSNorm folded into the one-row projections (KernelConfig.fold_norms), and the rotary with the cache write in qkv_proj's one-row kernel (one_row_rope): the 8B shape at batch 1, and the 135M engine check
set -u
cd "$(dirname "$0")/../.."
R=/tmp/r25b; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > $R/gpu.txt 2>&1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > $R/pip.log 2>&1
export PYTHONPATH=/tmp/site:$PWD
python3 -m inflight.stubs >> $R/pip.log 2>&1
t() { local name=$1 lim=$2; shift 2; local s=$(date +%s); timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $(( $(date +%s) - s ))s" >> $R/times.txt; }
t dec_8b 300 python3 -m bench.decode_latency --shape llama-3-8b --batches 1 --steps 32 --hf-new-tokens 0 --quantization none --variants all all+fold all+fold+rope --out $R/dec_8b.json
t orc_135m 120 python3 -m bench.one_row_check --shape smollm2-135m --quantization none --out $R/orc_135m.json
cat $R/times.txt
tail -5 $R/dec_8b.log
tar czf $OUT/r25b.tgz -C /tmp r25b
