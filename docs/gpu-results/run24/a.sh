#!/bin/bash
# run 24, call 1: where trtllm-bench-condition runs spend their time (FP8 8B): a profiled window of steps per point, and 2048/128 with bigger steps
set -u
cd "$(dirname "$0")/../.."
R=/tmp/r24a; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > $R/gpu.txt 2>&1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > $R/pip.log 2>&1
export PYTHONPATH=/tmp/site:$PWD
python3 -m inflight.stubs >> $R/pip.log 2>&1
t() { local name=$1 lim=$2; shift 2; local s=$(date +%s); timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $(( $(date +%s) - s ))s" >> $R/times.txt; }
Q="--shape llama-3-8b --quantization fp8 --kv-cache-dtype fp8"
t win_2048 150 python3 -m bench.profile window $Q --lengths 2048 128 --requests 1000 --skip 300 --steps 20 --out $R/win_2048.json
t win_1000 120 python3 -m bench.profile window $Q --lengths 1000 1000 --requests 400 --skip 500 --steps 20 --out $R/win_1000.json
t win_128 90 python3 -m bench.profile window $Q --lengths 128 128 --requests 3000 --skip 60 --steps 20 --out $R/win_128.json
t off_2048 200 python3 -m bench.offline_throughput --shape llama-3-8b --lengths 2048 128 --requests 1000 --max-batch-size 512 --overlap on --hf-requests 0 --quantization fp8 --kv-cache-dtype fp8 --max-num-tokens 8192 --out $R/off_2048.json
cat $R/times.txt
tar czf $OUT/r24a.tgz -C /tmp r24a
