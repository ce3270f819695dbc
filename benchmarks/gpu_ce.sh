#!/bin/bash
# copy_engine on N GPUs in one device call (< 10 min): the op check (exact against an all-gather, flag, barrier
# and spin completion, eager and CUDA-graph replays) with its block-loop timing, then bench rows of MODEL with
# METHODS at ulysses N against the 1-GPU eager reference of the same call.
#   [DEGS=u4,r4,u2xr2] [XB=outputs/xb REUSE_N1=1] [PROFILE=1] [CALLS=5] [AHEAD=20] [CHECK_ARGS=--exact-only] [SPLIT=1] bash benchmarks/gpu_ce.sh N [MODEL] [METHODS]  (results: $OUT/ce_check.jsonl, $OUT/bench.md, rows,
#   with PROFILE=1 the copy_engine step's profile (trace_gaps.py's reading of it appended) and rank 0's trace; PROFILE_ARGS adds profile_step.py arguments)
# Chained in one call with the same OUT and XB (and REUSE_N1=1, SKIP_CHECK=1 after the first), the runs share
# their files (the device tool returns at most 8): logs append, bench.md and rows_n$N.jsonl hold every row. With
# the check and PROFILE=1 a call returns 8: ce_check.jsonl, bench.md, 2 logs, 2 rows files, the profile and trace.
# The spin A/B (session 20, carry .whl and .fa):
#   CHECK_ARGS=--exact-only CALLS=3 bash benchmarks/gpu_ce.sh 4 flux2048 xdit_cg_ce_fm,xdit_cg_ce_fms
set -u
N=${1:-2}; MODEL=${2:-flux1024}; METHODS=${3:-xdit_cg,xdit_cg_ceb,xdit_cg_ce}
source benchmarks/gpu_site.sh \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
[ -d .fa ] && source benchmarks/fa_cute_env.sh   # flash_attn.cute where the call carries .fa/ (attention "auto")
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/ce_out}; mkdir -p $OUT
if [ "${SKIP_CHECK:-0}" != 1 ]; then
  timeout 240 torchrun --nproc_per_node $N benchmarks/ce_check.py --out $OUT/ce_check.jsonl ${CHECK_ARGS:-} > $OUT/ce_check.log 2>&1
  rc=$?; grep "^{" $OUT/ce_check.log; echo "ce_check rc=$rc"
  [ $rc = 0 ] || { tail -40 $OUT/ce_check.log; exit 1; }
  rm -f $OUT/ce_check.log   # its rows are in ce_check.jsonl (the device tool returns at most 8 files)
fi
B="python3 benchmarks/bench.py --driver --gpus $N --calls-per-sample ${CALLS:-5} ${AHEAD:+--gpu-ahead-ms $AHEAD} --subrun-timeout ${SUBRUN_S:-480}"
X=${XB:-/tmp/xb}; mkdir -p $X/n$N/ref   # XB=outputs/xb keeps the 1-GPU reference on a warm machine for the next call
if [ "${REUSE_N1:-0}" = 1 ] && ls $X/n1/ref/*.pt > /dev/null 2>&1; then echo "reusing $X/n1 (1-GPU reference)"
else $B --ns 1 --models $MODEL --methods eager --out $X/n1 >> $OUT/bench_n1.log 2>&1; fi
cp $X/n1/ref/*.pt $X/n$N/ref/
if [ "${SPLIT:-0}" = 1 ]; then   # each method in its own sub-run (its own SUBRUN_S): a slow compile of one ends only its row
  for m in ${METHODS//,/ }; do
    $B --ns $N --models $MODEL --methods $m --degs ${DEGS:-u$N} --out $X/n$N >> $OUT/bench_n$N.log 2>&1
  done
else
  $B --ns $N --models $MODEL --methods $METHODS --degs ${DEGS:-u$N} --out $X/n$N >> $OUT/bench_n$N.log 2>&1
fi
python3 benchmarks/bench.py --merge --out $X/n$N --merge-from $X/n1 --md $OUT/bench.md > /dev/null 2>&1
cp $X/n$N/rows.jsonl $OUT/rows_n$N.jsonl; cp $X/n1/rows.jsonl $OUT/rows_n1.jsonl
grep "^|" $OUT/bench.md | head -20
tail -5 $OUT/bench_n$N.log
if [ -n "${PROFILE:-}" ]; then   # PROFILE=1: the copy_engine step's profile by kernel kind, in what is left of 570 s
  CJ=${COMPILE_JSON:-'{"fuse_modulation": true}'}   # the plan of xdit_cg_ce_fm, the rows' shipped plan
  left=$((570 - SECONDS)); [ $left -gt 60 ] && timeout $left torchrun --nproc_per_node $N benchmarks/profile_step.py \
    --model $MODEL --ulysses $N --lowering inductor --cudagraphs --all-to-all copy_engine --compile-json "$CJ" \
    --trace $OUT/trace_${MODEL}_ce.json.gz ${PROFILE_ARGS:-} --out $OUT/profile_${MODEL}_ce.md > $OUT/profile.log 2>&1; prc=$?; echo "profile rc=$prc at ${SECONDS}s"
  [ $prc = 0 ] && rm -f $OUT/profile.log || tail -20 $OUT/profile.log
  # where rank 0 has no compute kernel running, by the kernels either side (appended: at most 8 files come back)
  [ -f $OUT/trace_${MODEL}_ce.json.gz ] && { echo; python3 benchmarks/trace_gaps.py $OUT/trace_${MODEL}_ce.json.gz; } \
    >> $OUT/profile_${MODEL}_ce.md 2>&1
  cat $OUT/profile_${MODEL}_ce.md 2>/dev/null | head -30
fi
