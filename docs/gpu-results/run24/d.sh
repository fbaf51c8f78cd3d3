#!/bin/bash
# run 24, call 4: the rewritten varlen kernel in whole runs: trtllm-bench's points in FP8, the 8B at 24 requests a second, float32 tokens against transformers
set -u
cd "$(dirname "$0")/../.."
R=/tmp/r24d; mkdir -p $R
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > $R/pip.log 2>&1
export PYTHONPATH=/tmp/site:$PWD
python3 -m inflight.stubs >> $R/pip.log 2>&1
t() { local name=$1 lim=$2; shift 2; local s=$(date +%s); timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $(( $(date +%s) - s ))s" >> $R/times.txt; }
O="--shape llama-3-8b --max-batch-size 512 --overlap on --hf-requests 0 --quantization fp8 --kv-cache-dtype fp8"
t off_2048 110 python3 -m bench.offline_throughput $O --lengths 2048 128 --requests 1000 --out $R/off_2048.json
t off_1000 100 python3 -m bench.offline_throughput $O --lengths 1000 1000 --requests 400 --out $R/off_1000.json
t load_8b_24 280 python3 -m bench.serving_load --shape llama-3-8b --vocab 49152 --tokenizer .bench/tok --rates 24 --seconds 20 --slo-ttft-ms 150 --slo-itl-ms 15 --out $R/load_8b_24.json
t ref_1b 120 python3 -m bench.gpu_reference_check --shape llama-3.2-1b --out $R/ref_1b.json
cat $R/times.txt
tar czf $OUT/r24d.tgz -C /tmp r24d
