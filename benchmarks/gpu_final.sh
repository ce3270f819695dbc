#!/bin/bash
# PipeFusion (issue 5) and cache (issue 6) end-to-end rows and the profile of the headline configuration
# (issue 4) on 4 GPUs, in parts that each fit a device call of < 10 minutes:
#   bash benchmarks/gpu_final.sh pipefusion cache1     # ~9 min on 4 x H100
#   bash benchmarks/gpu_final.sh cache4 profile        # ~7 min
# Parts: pipefusion (1024 then 2048: 1 GPU, pipefusion=4, pipefusion=2 x ulysses=2, ulysses=4; 28-step loops),
# hybrid2048 (2048²: pipefusion=2 x ulysses=2 per-call and displaced, pipefusion=2 x ring=2 per-call, ~4 min),
# displaced2048 (2048²: pipefusion=4 per-call and displaced loops on one model, ~3 min), pf8patches (2048²: 1 GPU and pipefusion=4 with 8 patches, the smaller fill/drain bubble; ~2 min),
# cache1 / cache4 (none, fbcache, teacache at a forced skip rate, 1 and 4 GPUs), profile (FLUX 1024 ulysses 4,
# Inductor + CUDA graphs), profilece (the same with compile.all_to_all = "copy_engine"), a2a (all-to-all bandwidth, NCCL settings, copy engine), profiletrace (profile +
# chrome trace, gaps), profileops (Inductor without CUDA graphs: CPU ops by launched GPU time). Each part runs under a timeout (its own limit or what is left of LIMIT=570 s) and
# the call ends with whatever finished. Results and logs go to $OUT.
set -u
source benchmarks/gpu_site.sh \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/final_out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,memory.total --format=csv > $OUT/gpus.txt
LIMIT=${LIMIT:-570}
T="torchrun --nproc_per_node"
run() {  # run NAME LIMIT_S CMD...: under min(LIMIT_S, time left), log to $OUT/NAME.log, rc to $OUT/rc.txt
  local name=$1 lim=$2; shift 2
  local left=$((LIMIT - SECONDS)); [ $lim -gt $left ] && lim=$left
  if [ $lim -lt 30 ]; then echo "$name skipped: ${left}s left" >> $OUT/rc.txt; return; fi
  timeout $lim "$@" > $OUT/$name.log 2>&1
  echo "$name rc=$? (limit ${lim}s) done at ${SECONDS}s" >> $OUT/rc.txt
}
PLANS=("pipefusion=4" "pipefusion=2 x ulysses=2" "ulysses=4")
for part in "$@"; do
  case $part in
    pipefusion)
      run pipefusion_1024 240 $T 4 benchmarks/pipefusion_gpu.py --resolutions 1024 --no-check --plans "${PLANS[@]}" \
        --out $OUT/pipefusion_1024.json
      run pipefusion_2048 330 $T 4 benchmarks/pipefusion_gpu.py --resolutions 2048 --no-check --base-repeats 0 \
        --plans "${PLANS[@]}" --out $OUT/pipefusion_2048.json ;;
    displaced2048) run pf_displaced_2048 330 $T 4 benchmarks/pipefusion_gpu.py --resolutions 2048 --no-check \
        --base-repeats 0 --plans pipefusion=4 --displaced --out $OUT/pf_displaced_2048.json ;;
    hybrid2048) run pf_hybrid_2048 400 $T 4 benchmarks/pipefusion_gpu.py --resolutions 2048 --no-check \
        --base-repeats 0 --plans "pipefusion=2 x ulysses=2" "pipefusion=2 x ring=2" --displaced \
        --out $OUT/pf_hybrid_2048.json ;;
    pf8patches) run pipefusion_2048_m8 300 $T 4 benchmarks/pipefusion_gpu.py --resolutions 2048 --no-check \
        --base-repeats 0 --plans pipefusion=4 --patches 8 --out $OUT/pipefusion_2048_m8.json ;;
    cache1) run cache_1 240 $T 1 benchmarks/cache_gpu.py --lowering eager --repeat 1 --out $OUT/cache_gpu_1.json ;;
    cache4) run cache_4 300 $T 4 benchmarks/cache_gpu.py --lowering eager --repeat 1 --out $OUT/cache_gpu_4.json ;;
    profile) run profile 300 $T 4 benchmarks/profile_step.py --model flux1024 --ulysses 4 --lowering inductor \
        --cudagraphs --out $OUT/profile_flux1024.md ;;
    a2a) for v in "" "NCCL_P2P_NVL_CHUNKSIZE=2097152" "NCCL_MIN_P2P_NCHANNELS=32" "NCCL_PROTO=Simple"; do
           run a2a_${v%%=*} 60 env $v $T 4 benchmarks/a2a_bw.py --out $OUT/a2a.json; done ;;
    profiletrace) run profiletrace 300 $T 4 benchmarks/profile_step.py --model flux1024 --ulysses 4 \
        --lowering inductor --cudagraphs --out $OUT/profile_flux1024_cg.md --trace $OUT/trace_flux1024_cg.json.gz ;;
    profilece) run profilece 300 $T 4 benchmarks/profile_step.py --model flux1024 --ulysses 4 --lowering inductor \
        --cudagraphs --all-to-all copy_engine --out $OUT/profile_flux1024_ce.md ;;
    profileops) run profileops 300 $T 4 benchmarks/profile_step.py --model flux1024 --ulysses 4 \
        --lowering inductor --ops --out $OUT/profile_flux1024_ops.md ;;
    *) echo "unknown part $part (pipefusion, displaced2048, hybrid2048, pf8patches, cache1, cache4, profile)"; exit 2 ;;
  esac
done
cat $OUT/rc.txt
grep -h "^\[row\]\|^|" $OUT/pipefusion_*.log 2>/dev/null | tail -n 20
grep -h "^{'method'\|^|" $OUT/cache_*.log 2>/dev/null
cat $OUT/profile_flux1024*.md 2>/dev/null
grep -h "^{" $OUT/a2a_*.log 2>/dev/null
exit 0
