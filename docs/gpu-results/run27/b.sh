#!/bin/bash
# run 27, call 2 (owed): the decode kernel alone where run 24 and 27's profiles found it slow, against the candidate
# kernels/flat_decode.py (KernelConfig.decode_kernel flat: each KV head's context tiles cut into equal shares, one a program):
#  - the serving mix (127 decodes of 128-1,536 tokens, 33 padding rows): rows as drawn or longest first, programs by
#    head or by row (KernelConfig.decode_order longest-first is both), splits 1-2, tiles, stages;
#  - trtllm-bench's 128/128 decodes (512 of 128-256 tokens, and of 181): FP8 and bf16 caches, tiles 32-128, warps, stages;
#  - 2,048/128's and 1,000/1,000's decodes over the FP8 cache (120 x 2,112, 400 x 1,413), 1-2 splits.
set -u
cd "$(dirname "$0")/../.."
R=/tmp/r27b
. .bench/r27/prelude.sh
T="python3 -m bench.paged_decode_tune --heads 8b --kernels paged flat --flat-per-sm 2 4 8"
t pdt_mix 200 $T --batches 127 --contexts mixed --pad-rows 33 --orders given longest-first --grids heads-outer rows-outer --splits 1 2 --tiles 64 128 --stages 0 2 --out $R/pdt_mix.json
t pdt_short 170 $T --kv-cache-dtype fp8 --fp8-reads words --batches 512 --contexts mixed:128-256 181 --splits 1 --tiles 32 64 128 --warps 2 4 --stages 2 3 --out $R/pdt_short.json
t pdt_short_bf16 100 $T --batches 512 --contexts mixed:128-256 --splits 1 --tiles 32 64 128 --warps 4 --stages 0 2 --out $R/pdt_short_bf16.json
t pdt_long 100 $T --kv-cache-dtype fp8 --fp8-reads words --batches 120 400 --contexts 2112 1413 --splits 1 2 --tiles 128 --stages 2 --out $R/pdt_long.json
cat $R/times.txt
for f in pdt_mix pdt_short pdt_short_bf16 pdt_long; do echo "== $f"; cut -c1-230 $R/$f.log | grep -v "^  skip"; done
python3 - <<'P'
import json, glob
for f in sorted(glob.glob("/tmp/r27b/pdt_*.json")):
    for r in json.load(open(f))["results"]:
        print(f.split("/")[-1], r["batch"], r["context"], r["order"], " ".join(
            f"{t['splits']}/{t['tile']}/{t['warps']}/{t['stages']}/{t['grid'][:6]}:{t['us']:.0f}" for t in r["timings"]))
P
tar czf $OUT/r27b.tgz -C /tmp r27b
