#!/bin/bash
# run 26, call 4: where the stack adds ITL jitter at the 8B point: the token path timestamped at each hop (worker step,
# worker flush, scheduler, gateway receive, gateway yield) by an uncommitted probe (jitprobe.py), one 20 s window
set -u
cd "$(dirname "$0")/../.."
R=/tmp/r26d; mkdir -p $R/p
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,pci.bus_id --format=csv > $R/gpu.txt 2>&1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > $R/pip.log 2>&1
export PYTHONPATH=/tmp/site:$PWD
python3 -m inflight.stubs >> $R/pip.log 2>&1
t() { local name=$1 lim=$2; shift 2; local s=$(date +%s); timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $(( $(date +%s) - s ))s" >> $R/times.txt; }
JIT_DIR=$R/p t load_8b_probe 230 python3 -m bench.serving_load --shape llama-3-8b --vocab 49152 --tokenizer .bench/tok --rates 24 --seconds 20 --slo-ttft-ms 150 --slo-itl-ms 15 --out $R/load_8b_probe.json
cat $R/times.txt; nproc
grep -h "  direct \|  served \|rate " $R/load_8b_probe.log | cut -c1-300 | grep -v "step-time fit\|a connection:"
python3 .bench/r26/hops.py $R/p | tee $R/hops.txt
ls $R/p | wc -l
tar czf $OUT/r26d.tgz -C /tmp r26d
