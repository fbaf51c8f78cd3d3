#!/bin/bash
# run 25, call 1: the RMSNorm folded into the one-row projections (KernelConfig.fold_norms), and the rotary with the cache write in qkv_proj's one-row kernel (one_row_rope): checked and timed at batch 1
set -u
cd "$(dirname "$0")/../.."
R=/tmp/r25a; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > $R/gpu.txt 2>&1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > $R/pip.log 2>&1
export PYTHONPATH=/tmp/site:$PWD
python3 -m inflight.stubs >> $R/pip.log 2>&1
t() { local name=$1 lim=$2; shift 2; local s=$(date +%s); timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $(( $(date +%s) - s ))s" >> $R/times.txt; }
t fold_kernel 60 python3 -c "
import torch, json
from tests.triton_path_check import check_fma_folded_norm, check_fma_rope
g = torch.Generator().manual_seed(0)
print(json.dumps({'norm': check_fma_folded_norm(g, 'cuda'), 'rope': check_fma_rope(g, 'cuda')}))"
t dec_1b 200 python3 -m bench.decode_latency --shape llama-3.2-1b --batches 1 --steps 64 --hf-new-tokens 0 --quantization none --variants all all+fold all+fold+rope all --out $R/dec_1b.json
t orc_1b 150 python3 -m bench.one_row_check --shape llama-3.2-1b --quantization none --new-tokens 32 --out $R/orc_1b.json
t prof_1b 90 python3 -m bench.profile decode --shape llama-3.2-1b --batch 1 --steps 20 --graphs --variant all --out $R/prof_1b.json
t prof_1b_fold 90 python3 -m bench.profile decode --shape llama-3.2-1b --batch 1 --steps 20 --graphs --variant all+fold+rope --out $R/prof_1b_fold.json
cat $R/times.txt
tail -5 $R/dec_1b.log
tar czf $OUT/r25a.tgz -C /tmp r25a
