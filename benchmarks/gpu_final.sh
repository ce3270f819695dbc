#!/bin/bash
# One device call on 4 GPUs after gpu_issue4.sh: PipeFusion (issue 5) and cache (issue 6) end-to-end rows, then
# the profile of the headline xdit configuration (issue 4). Each part has its own time limit so the call ends
# inside the device's 10 minutes with whatever finished.
#   bash benchmarks/gpu_final.sh        (OUT = where results go; set by the device tool)
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/final_out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,memory.total --format=csv > $OUT/gpus.txt
T="torchrun --nproc_per_node"
timeout ${PF1_S:-130} $T 4 benchmarks/pipefusion_gpu.py --resolutions 1024 --out $OUT/pipefusion_1024.json \
  > $OUT/pipefusion_1024.log 2>&1
echo "pipefusion 1024 rc=$? at ${SECONDS}s" >> $OUT/rc.txt
timeout ${PF2_S:-170} $T 4 benchmarks/pipefusion_gpu.py --resolutions 2048 --out $OUT/pipefusion_2048.json \
  > $OUT/pipefusion_2048.log 2>&1
echo "pipefusion 2048 rc=$? at ${SECONDS}s" >> $OUT/rc.txt
timeout ${CACHE1_S:-60} $T 1 benchmarks/cache_gpu.py --lowering eager --repeat 1 --out $OUT/cache_gpu_1.json \
  > $OUT/cache_1.log 2>&1
echo "cache1 rc=$? at ${SECONDS}s" >> $OUT/rc.txt
timeout ${CACHE4_S:-60} $T 4 benchmarks/cache_gpu.py --lowering eager --repeat 1 --out $OUT/cache_gpu_4.json \
  > $OUT/cache_4.log 2>&1
echo "cache4 rc=$? at ${SECONDS}s" >> $OUT/rc.txt
left=$((575 - SECONDS))
[ $left -gt 60 ] && timeout $left $T 4 benchmarks/profile_step.py --model flux1024 --ulysses 4 --lowering inductor \
  --out $OUT/profile_flux1024.md > $OUT/profile.log 2>&1
echo "profile rc=$? (had ${left}s)" >> $OUT/rc.txt
cat $OUT/rc.txt; tail -n 12 $OUT/pipefusion_*.log; tail -n 12 $OUT/cache_1.log $OUT/cache_4.log; cat $OUT/profile_flux1024.md 2>/dev/null
