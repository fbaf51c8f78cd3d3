#!/bin/bash
# run 23, call 7: the paged-decode splits combined by their last program (no second kernel): kernels checked, batch-1 steps against the combine kernel
set -u
cd "$(dirname "$0")/../.."
R=$OUT/r23g; mkdir -p $R
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > $R/pip.log 2>&1
export PYTHONPATH=/tmp/site:$PWD
python3 -m inflight.stubs >> $R/pip.log 2>&1
t() { local name=$1 lim=$2; shift 2; local s=$(date +%s); timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $(( $(date +%s) - s ))s" >> $R/times.txt; }
t kcheck 60 python3 -m bench.kernel_check --out $R/kernel_check.json
t dec_1b 60 python3 -m bench.decode_latency --shape llama-3.2-1b --batches 1 4 --steps 64 --hf-new-tokens 0 --variants all all+combinekernel --out $R/dec_1b.json
t dec_8b 80 python3 -m bench.decode_latency --shape llama-3-8b --batches 1 --steps 32 --hf-new-tokens 0 --quantization none fp8 --variants all all+combinekernel --out $R/dec_8b.json
t check_135m 50 python3 -m bench.one_row_check --shape smollm2-135m --out $R/check_135m.json
t ref_1b 90 python3 -m bench.gpu_reference_check --shape llama-3.2-1b --out $R/ref_1b.json
cat $R/times.txt

