#!/bin/bash
# run 27, call 1: the 8B serving-mix window profiled kernel by kernel, then the 8B at 24/s through the stack,
# three 20 s windows, with the per-hop probe (uncommitted, applied to this copy only)
set -u
cd "$(dirname "$0")/../.."
R=/tmp/r27a; mkdir -p $R/p
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,pci.bus_id --format=csv > $R/gpu.txt 2>&1
nvidia-smi -q -d CLOCK,PERFORMANCE > $R/clocks_before.txt 2>&1
nproc > $R/nproc.txt; grep -m1 "model name" /proc/cpuinfo >> $R/nproc.txt
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > $R/pip.log 2>&1
export PYTHONPATH=/tmp/site:$PWD
python3 -m inflight.stubs >> $R/pip.log 2>&1
t() { local name=$1 lim=$2; shift 2; local s=$(date +%s); timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $(( $(date +%s) - s ))s" >> $R/times.txt; }
t prof_8b_mix 200 python3 -m bench.profile window --shape llama-3-8b --lengths 128 1024 128 512 --requests 1200 --max-batch-size 160 --step-time-target-ms 15 --skip 600 --steps 30 --out $R/prof_8b_mix.json
git apply .bench/r27/d_probe.patch >> $R/pip.log 2>&1 || patch -p1 < .bench/r27/d_probe.patch >> $R/pip.log 2>&1
JIT_DIR=$R/p t load_8b_probe 320 python3 -m bench.serving_load --shape llama-3-8b --vocab 49152 --tokenizer .bench/tok --rates 24 24 24 --seconds 20 --slo-ttft-ms 150 --slo-itl-ms 15 --out $R/load_8b_probe.json
nvidia-smi -q -d CLOCK,PERFORMANCE > $R/clocks_after.txt 2>&1
cat $R/times.txt $R/nproc.txt
tail -60 $R/prof_8b_mix.log
grep -h "  direct \|  served \|rate \|graph" $R/load_8b_probe.log | cut -c1-300 | grep -v "step-time fit\|a connection:" | head -30
python3 .bench/r27/hops.py $R/p | tee $R/hops.txt
tar czf $OUT/r27a.tgz -C /tmp r27a
