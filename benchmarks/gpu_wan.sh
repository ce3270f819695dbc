#!/bin/bash
# Wan 480p with copy_engine on N GPUs in one device call (< 10 min): first 4 of its blocks at real width with
# every rank's Python stack dumped if the first call is stuck (the session-11 deadlock), and only if those run,
# the whole-model bench row against the 1-GPU eager reference (gpu_ce.sh).
#   bash benchmarks/gpu_wan.sh [N] [METHODS]   (results: $OUT/wan4l.md, $OUT/wan4l.log, $OUT/bench.md, rows)
set -u
N=${1:-4}; METHODS=${2:-xdit_cg_ce}
source benchmarks/gpu_site.sh \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/wan_out}; mkdir -p $OUT
timeout 150 torchrun --nproc_per_node $N benchmarks/profile_step.py --model wan480 --layers 4 --ulysses $N --steps 2 \
  --lowering inductor --cudagraphs --all-to-all copy_engine --dump-after 130 --out $OUT/wan4l.md > $OUT/wan4l.log 2>&1
rc=$?; echo "wan 4 blocks rc=$rc at ${SECONDS}s"; head -16 $OUT/wan4l.md 2>/dev/null
[ $rc = 0 ] || { grep -A3 "Timeout" $OUT/wan4l.log | head -40; exit 1; }
CALLS=${CALLS:-1} SKIP_CHECK=1 SPLIT=1 SUBRUN_S=${SUBRUN_S:-$((560 - SECONDS - 90))} bash benchmarks/gpu_ce.sh $N wan480 $METHODS
