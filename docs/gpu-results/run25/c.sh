#!/bin/bash
# run 25, call 3: the 8B shape at 24 requests a second served with --launch-wait (requests that arrive while the
# device runs the queued step join the next one, not the one after: a whole 10-15 ms step of TTFT at this shape), and the
# step-time residuals of the engine alone (where ITL p99 runs past the step target)
set -u
cd "$(dirname "$0")/../.."
R=/tmp/r25c; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > $R/gpu.txt 2>&1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > $R/pip.log 2>&1
export PYTHONPATH=/tmp/site:$PWD
python3 -m inflight.stubs >> $R/pip.log 2>&1
t() { local name=$1 lim=$2; shift 2; local s=$(date +%s); timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $(( $(date +%s) - s ))s" >> $R/times.txt; }
L="--shape llama-3-8b --vocab 49152 --tokenizer .bench/tok --rates 24 --seconds 20 --slo-ttft-ms 150 --slo-itl-ms 15"
t load_8b_t15_lw 290 python3 -m bench.serving_load $L --serve-flags "--launch-wait true" --out $R/load_8b_t15_lw.json
t load_8b_t14_lw 290 python3 -m bench.serving_load $L --step-time-target-ms 14 --serve-flags "--launch-wait true" --out $R/load_8b_t14_lw.json
cat $R/times.txt
grep -h "residual\|served\|direct" $R/*.log | head -30
tar czf $OUT/r25c.tgz -C /tmp r25c
