#!/bin/bash
# run 27, call 5 (owed): decode-only steps by batch size with the decode kernel choices (graphs and overlap on):
# what decode_kernel flat and decode_order longest-first cost or buy where they would become the default
set -u
cd "$(dirname "$0")/../.."
R=/tmp/r27e
. .bench/r27/prelude.sh
t dec_1b 200 python3 -m bench.decode_latency --shape llama-3.2-1b --batches 1 8 64 256 --steps 32 --hf-new-tokens 0 --variants all all+flat all+longest --out $R/dec_1b.json
t dec_8b 250 python3 -m bench.decode_latency --shape llama-3-8b --batches 1 8 64 256 --steps 32 --hf-new-tokens 0 --variants all all+flat all+longest --out $R/dec_8b.json
cat $R/times.txt
tail -20 $R/dec_1b.log; tail -20 $R/dec_8b.log
tar czf $OUT/r27e.tgz -C /tmp r27e
