#!/bin/bash
# MODEL (FLUX 1024²) on 4 GPUs in one device call (< 10 min): the 1-GPU eager reference, then METHODS at ulysses 4
# once per variant in VARIANTS: "default", and "conn32" (CUDA_DEVICE_MAX_CONNECTIONS=32: more hardware queues;
# session 9 ran both, conn32 was slower). A later sub-run of the same graph hits the FX graph cache of the first.
#   [VARIANTS="default conn32"] bash benchmarks/gpu_ce4.sh [MODEL] [METHODS]
#   (results: $OUT/bench_<variant>.md, rows_<variant>.jsonl, rows_n1.jsonl, logs.tgz)
set -u
MODEL=${1:-flux1024}; METHODS=${2:-xdit_cg_ce,xdit_cg_ceb}
source benchmarks/gpu_site.sh \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/ce_out}; mkdir -p $OUT
B="python3 benchmarks/bench.py --driver --gpus 4 --calls-per-sample 5 --subrun-timeout ${SUBRUN_S:-330}"
X=/tmp/xb; mkdir -p $X
$B --ns 1 --models $MODEL --methods eager --out $X/n1 > $X/n1.log 2>&1
for v in ${VARIANTS:-default}; do
  mkdir -p $X/$v/ref; cp $X/n1/ref/*.pt $X/$v/ref/
  if [ $v = conn32 ]; then export CUDA_DEVICE_MAX_CONNECTIONS=32; fi
  $B --ns 4 --models $MODEL --methods $METHODS --degs u4 --out $X/$v > $X/$v.log 2>&1
  python3 benchmarks/bench.py --merge --out $X/$v --merge-from $X/n1 --md $OUT/bench_$v.md > /dev/null 2>&1
  cp $X/$v/rows.jsonl $OUT/rows_$v.jsonl; echo "== $v at ${SECONDS}s"; grep "^| [14] " $OUT/bench_$v.md
done
cp $X/n1/rows.jsonl $OUT/rows_n1.jsonl; nvidia-smi --query-gpu=name --format=csv > $OUT/gpus.txt
(cd $X && tar -czf $OUT/logs.tgz n1.log n1/logs $(for v in ${VARIANTS:-default}; do echo $v.log $v/logs; done) 2>/dev/null)
