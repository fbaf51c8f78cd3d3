#!/bin/bash
# run 27, call 4 (owed): what the decode kernel choice does end to end, the engine alone: the 8B at 24/s (two 20 s
# windows each: the defaults, decode_order longest-first, decode_kernel flat), then trtllm-bench's 128/128 in FP8
# (paged and flat in one run)
set -u
cd "$(dirname "$0")/../.."
R=/tmp/r27d
. .bench/r27/prelude.sh
L="--shape llama-3-8b --vocab 49152 --tokenizer .bench/tok --rates 24 24 --seconds 20 --slo-ttft-ms 150 --slo-itl-ms 15 --direct-only"
t load_default 140 python3 -m bench.serving_load $L --out $R/load_default.json
INFLIGHT_DECODE_ORDER=longest-first t load_longest 140 python3 -m bench.serving_load $L --out $R/load_longest.json
INFLIGHT_DECODE_KERNEL=flat t load_flat 140 python3 -m bench.serving_load $L --out $R/load_flat.json
t off_128 170 python3 -m bench.offline_throughput --shape llama-3-8b --lengths 128 128 --requests 3000 --max-batch-size 512 --overlap on --hf-requests 0 --quantization fp8 --kv-cache-dtype fp8 --decode-kernel paged flat --out $R/off_128.json
cat $R/times.txt
for f in default longest flat; do echo "== $f"; grep -h "  direct \|rate " $R/load_$f.log | cut -c1-300; done
tail -5 $R/off_128.log
tar czf $OUT/r27d.tgz -C /tmp r27d
