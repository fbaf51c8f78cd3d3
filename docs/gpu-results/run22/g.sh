#!/bin/bash
# run 22, call 7: the engine's batch-1 path on the CUDA cores, deterministic and against the dot
set -u
cd "$(dirname "$0")/../.."
R=/tmp/r22g; mkdir -p $R
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > $R/pip.log 2>&1
export PYTHONPATH=/tmp/site:$PWD
python3 -m inflight.stubs >> $R/pip.log 2>&1
t() { local name=$1 lim=$2; shift 2; local s=$(date +%s); timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $(( $(date +%s) - s ))s" >> $R/times.txt; }
t check_135m 60 python3 -m bench.one_row_check --shape smollm2-135m --out $R/check_135m.json
t check_1b 120 python3 -m bench.one_row_check --shape llama-3.2-1b --new-tokens 32 --out $R/check_1b.json
cat $R/times.txt
tar czf $OUT/r22g.tgz -C /tmp r22g
