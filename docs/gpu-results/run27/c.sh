#!/bin/bash
# run 27, call 3 (owed): the decodes' attention inside the engine's graphs, profiled window by window:
# the 8B serving mix with KernelConfig.decode_order arrival / longest-first and decode_kernel flat, and
# trtllm-bench's 128/128 (FP8 projections and cache) with the paged and the flat kernel
set -u
cd "$(dirname "$0")/../.."
R=/tmp/r27c
. .bench/r27/prelude.sh
P="--shape llama-3-8b --lengths 128 1024 128 512 --requests 1200 --max-batch-size 160 --step-time-target-ms 15 --skip 600 --steps 30"
t prof_arrival 130 python3 -m bench.profile window $P --decode-order arrival --out $R/prof_arrival.json
t prof_longest 130 python3 -m bench.profile window $P --decode-order longest-first --out $R/prof_longest.json
t prof_flat 130 python3 -m bench.profile window $P --decode-kernel flat --out $R/prof_flat.json
Q="--shape llama-3-8b --quantization fp8 --kv-cache-dtype fp8 --lengths 128 128 --requests 3000 --skip 60 --steps 20"
t prof_128_paged 100 python3 -m bench.profile window $Q --out $R/prof_128_paged.json
t prof_128_flat 100 python3 -m bench.profile window $Q --decode-kernel flat --out $R/prof_128_flat.json
cat $R/times.txt
for f in arrival longest flat 128_paged 128_flat; do echo "== $f"; grep -m2 "window:\|first kernel" $R/prof_$f.log | cut -c1-250; grep -m2 "_paged_decode\|_flat_decode\|_flat_combine\|_combine_splits" $R/prof_$f.log; done
tar czf $OUT/r27c.tgz -C /tmp r27c
