#!/bin/bash
# A ulysses-N rank's compute kernels on ONE GPU (profile_step.py --fake-world N: torch's fake process group makes
# every collective a no-op, so the step is rank 0's kernels at that degree's shapes with zero-cost transfers).
# What a rank computes, apart from what parallelism adds: the 4-GPU step minus this is the parallel overhead.
#   CASES="flux2048:4 flux2048:1 wan480:4" [COMPILE_JSON='{"fuse_modulation": true}'] [A2A=copy_engine] \
#     bash benchmarks/gpu_rank_kernels.sh
# A2A=copy_engine: the shipped 4-GPU plan's graph; each transfer's own piece is copied (SMs, as on GPUs), the
# peers' pieces (the copy engines' work) are not.
# (carry .whl and .fa; PROFILE_ARGS adds profile_step.py arguments; results: $OUT/rank_<model>_w<N><TAG>.md)
set -u
source benchmarks/gpu_site.sh \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
[ -d .fa ] && source benchmarks/fa_cute_env.sh
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/rk_out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,memory.total,power.limit,clocks.max.sm --format=csv > $OUT/gpus.txt
CJ=${COMPILE_JSON:-'{"fuse_modulation": true}'}
for c in ${CASES:-flux2048:4 flux2048:1}; do
  m=${c%%:*}; n=${c##*:}; f=$OUT/rank_${m}_w${n}${TAG:-}.md
  timeout ${CASE_S:-300} python3 benchmarks/profile_step.py --model $m --fake-world $n --lowering inductor --cudagraphs --all-to-all ${A2A:-nccl} \
    --compile-json "$CJ" ${PROFILE_ARGS:-} --out $f > $OUT/rank_${m}_w${n}${TAG:-}.log 2>&1
  echo "$c rc=$? at ${SECONDS}s: $(grep -h 'wall per step\|5 calls back' $f 2>/dev/null | tr '\n' ' ')"
done
