#!/bin/bash
# run 23, call 4: two-token steps on the CUDA cores at the new defaults (fma_max_rows 2: 16-bit projections but the fused gate_up), against fma_max_rows 1; checks
set -u
cd "$(dirname "$0")/../.."
R=/tmp/r23d; mkdir -p $R
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > $R/pip.log 2>&1
export PYTHONPATH=/tmp/site:$PWD
python3 -m inflight.stubs >> $R/pip.log 2>&1
t() { local name=$1 lim=$2; shift 2; local s=$(date +%s); timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $(( $(date +%s) - s ))s" >> $R/times.txt; }
t dec_1b 100 python3 -m bench.decode_latency --shape llama-3.2-1b --batches 1 2 --steps 64 --hf-new-tokens 0 --variants all all+fma1 --out $R/dec_1b.json
t dec_8b 130 python3 -m bench.decode_latency --shape llama-3-8b --batches 1 2 --steps 32 --hf-new-tokens 0 --variants all all+fma1 --out $R/dec_8b.json
t check_1b_r2 120 python3 -m bench.one_row_check --shape llama-3.2-1b --rows 2 --new-tokens 32 --out $R/check_1b_r2.json
t check_135m 60 python3 -m bench.one_row_check --shape smollm2-135m --out $R/check_135m.json
cat $R/times.txt
tar czf $OUT/r23d.tgz -C /tmp r23d
