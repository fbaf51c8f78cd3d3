#!/bin/bash
# run 26, call 1: the 8B layer's matmuls by token count (cuBLAS, cuBLASLt, a Triton candidate), then the 8B at 24/s
# engine alone, three 20 s windows, step-time margin on and off (late launch is a stack setting; direct-only needs none)
set -u
cd "$(dirname "$0")/../.."
R=/tmp/r26a; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,pci.bus_id --format=csv > $R/gpu.txt 2>&1
nvidia-smi -q -d CLOCK,PERFORMANCE > $R/clocks_before.txt 2>&1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > $R/pip.log 2>&1
export PYTHONPATH=/tmp/site:$PWD
python3 -m inflight.stubs >> $R/pip.log 2>&1
t() { local name=$1 lim=$2; shift 2; local s=$(date +%s); timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $(( $(date +%s) - s ))s" >> $R/times.txt; }
t gemm 150 python3 -m bench.prefill_gemm --shape llama-3-8b --tokens 256 384 448 512 576 640 704 768 1024 --out $R/gemm.json
L="--shape llama-3-8b --vocab 49152 --tokenizer .bench/tok --rates 24 24 24 --seconds 20 --slo-ttft-ms 150 --slo-itl-ms 15 --direct-only"
t load_8b_margin_on 190 python3 -m bench.serving_load $L --step-time-margin on --out $R/load_8b_margin_on.json
t load_8b_margin_off 190 python3 -m bench.serving_load $L --step-time-margin off --out $R/load_8b_margin_off.json
nvidia-smi -q -d CLOCK,PERFORMANCE > $R/clocks_after.txt 2>&1
cat $R/times.txt
grep -v "^triton .*fastest" $R/gemm.log | tail -40; grep "fastest" $R/gemm.log
for f in $R/load_*.log; do echo "== $f"; grep -h "residual\|  direct \|  served \|rate " $f | cut -c1-400 | head -20; done
tar czf $OUT/r26a.tgz -C /tmp r26a
