#!/bin/bash
# The issue-4 benchmark on a 4 x H100 machine, in two device calls of < 10 minutes each (the driver is
# resumable; raw rows live in /tmp/xb on the machine and are copied to $OUT/raw after each phase).
#   bash benchmarks/gpu_issue4.sh 1   # N=1 rows of all models side by side (one GPU each), then flux1024 at N=4
#   bash benchmarks/gpu_issue4.sh 2   # flux2048, wan480 (best plan, peers eager and compiled), sd3cfg cfg x ulysses,
#                                     # flux1024 ring / ulysses x ring rows
#   PHASE2_JOBS="flux1024:xfuser_ind:u4 flux2048:xfuser_ind:u4" bash benchmarks/gpu_issue4.sh 2   # xDiT compiled
# Rows the time left cannot fit are written as "skipped: time budget"; a later call on the same machine resumes.
# CALLS=K: each timing is K forwards back to back / K (bench.py --calls-per-sample; default 1).
# Needs the wheels in .whl/ (diffusers, importlib_metadata, xfuser, yunchang, distvae; see README.md).
set -u
PHASE=${1:?phase 1 or 2}
[ -n "${TINY:-}" ] || source benchmarks/gpu_site.sh \
  && export PYTHONPATH=/tmp/site || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/xb_out}; R=/tmp/xb; mkdir -p $R/n4/ref $OUT
if [ -d benchmarks/results/bench_raw ] && [ ! -f $R/.seeded ]; then cp -rn benchmarks/results/bench_raw/. $R/; fi
touch $R/.seeded
nvidia-smi --query-gpu=name,memory.total --format=csv > $OUT/gpus.txt
B="python3 benchmarks/bench.py --driver --gpus 4 ${TINY:+--tiny} --calls-per-sample ${CALLS:-1}"
LIMIT=${LIMIT:-570}
left() { echo $((LIMIT - SECONDS)); }
if [ "$PHASE" = 1 ]; then
  i=0
  for job in "flux1024:eager,inductor" "flux2048:eager,inductor" "wan480:eager,inductor" "sd3cfg:eager,inductor"; do
    model=${job%%:*}; meths=${job#*:}
    CUDA_VISIBLE_DEVICES=$i $B --ns 1 --models $model --methods $meths --gpu-offset $i --out $R/n1_$model \
      --budget-s 260 > $OUT/n1_$model.log 2>&1 &
    i=$((i + 1))
  done
  wait
  cp $R/n1_*/ref/*.pt $R/n4/ref/ 2>/dev/null
  $B --ns 4 --models flux1024 --methods ${PHASE1_METHODS:-xdit_cg_ce_fm,diffusers,diffusers_ind,xfuser} --degs u4 --out $R/n4 \
    --budget-s $(left) > $OUT/n4_p1.log 2>&1
else
  for job in ${PHASE2_JOBS:-"flux2048:xdit_cg_ce_fm,diffusers,diffusers_ind,xfuser:u4" \
             "wan480:xdit_cg_ce,diffusers,diffusers_ind,xfuser:u4" "sd3cfg:xdit_cg,xfuser:cfg2xu2" \
             "flux1024:xdit_cg,diffusers,xfuser:r4,u2xr2"}; do
    IFS=: read model meths degs <<< "$job"
    [ $(left) -lt 40 ] && echo "no time left for $job" >> $OUT/skipped.txt && continue
    if [ ! -f $R/n4/ref/$model.pt ]; then  # a fresh machine: the 1-GPU reference output first (same run)
      $B --ns 1 --models $model --methods eager --out $R/n1_$model --budget-s $(left) >> $OUT/n1_p2.log 2>&1
      cp $R/n1_$model/ref/*.pt $R/n4/ref/ 2>/dev/null
    fi
    $B --ns 4 --models $model --methods $meths --degs $degs --out $R/n4 --budget-s $(left) \
      >> $OUT/n4_p2.log 2>&1
  done
fi
python3 benchmarks/bench.py --merge --out $R/n4 --merge-from $R/n1_* --md $OUT/bench.md --png $OUT/scaling.png \
  > $OUT/merge.log 2>&1
tar czf $OUT/raw.tgz -C $R --exclude=.seeded .   # one file: the device tool returns few, shallow files
tail -3 $OUT/n4_p*.log; cat $OUT/bench.md | grep -v "^$" | head -80
