#!/bin/bash
# run 23, call 5: where a two-token 8B step's time goes with each choice (fma_max_rows 2 against 1)
set -u
cd "$(dirname "$0")/../.."
R=/tmp/r23e; mkdir -p $R
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > $R/pip.log 2>&1
export PYTHONPATH=/tmp/site:$PWD
python3 -m inflight.stubs >> $R/pip.log 2>&1
t() { local name=$1 lim=$2; shift 2; local s=$(date +%s); timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $(( $(date +%s) - s ))s" >> $R/times.txt; }
t prof_8b_fma2 110 python3 -m bench.profile decode --shape llama-3-8b --batch 2 --steps 20 --graphs --variant all --out $R/prof_8b_fma2.json
t prof_8b_fma1 110 python3 -m bench.profile decode --shape llama-3-8b --batch 2 --steps 20 --graphs --variant all+fma1 --out $R/prof_8b_fma1.json
cat $R/times.txt
tar czf $OUT/r23e.tgz -C /tmp r23e
