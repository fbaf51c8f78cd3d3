# Sourced by run 27's owed calls (b.sh-e.sh) after they set R, the call's folder under /tmp: from the
# repository root, the GPU's name, the carried wheels installed, and t NAME LIMIT CMD..., which runs CMD
# under a time limit into $R/NAME.log and notes its exit status and seconds in $R/times.txt.
mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,pci.bus_id --format=csv > $R/gpu.txt 2>&1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > $R/pip.log 2>&1
export PYTHONPATH=/tmp/site:$PWD
python3 -m inflight.stubs >> $R/pip.log 2>&1
t() { local name=$1 lim=$2; shift 2; local s=$(date +%s); timeout $lim "$@" > $R/$name.log 2>&1; echo "$name rc=$? $(( $(date +%s) - s ))s" >> $R/times.txt; }
