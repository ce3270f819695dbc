#!/bin/bash
# Chosen rows on a 2- or 4-GPU machine in one device call (< 10 minutes), each model against its 1-GPU eager output
# made in the same call. The 1-GPU references run on GPUs 1..G-1 (G GPUs; those sharing a GPU one after another) while
# GPU 0 runs the norm_rope microbenchmark (MICRO=1) and the LSE-merge one (MERGE=1); then the rows, one job after
# another.
#   MICRO=1 bash benchmarks/gpu_rows.sh "flux2048:xdit_cg_ce_fm,xdit_cg_ce_fm_nr,diffusers_ind:u4"
#   bash benchmarks/gpu_rows.sh "flux1024:xdit_cg,diffusers,xfuser:r4,u2xr2" "flux1024:xdit_cg_ce_fm,xfuser:u2:2"
# A job is model:methods:degrees[:N] (bench.py --models / --methods / --degs; N GPUs, default min(4, G), the first N).
# CALLS=K: K forwards per timing. AHEAD=MS: the GPU held MS ms before each timing (bench.py --gpu-ahead-ms).
# RING_CHECK=N: first benchmarks/ring_check.py on N GPUs (ring attention's copy-engine and NCCL transfers: exact and
# ms per call; $OUT/ring_check.md), before anything else uses the GPUs.
# $OUT gets bench.md, scaling.png, rows.jsonl (every row, the 1-GPU references too), the logs and raw.tgz (NO_RAW=1: none).
# Raw rows stay in /tmp/xb while the machine is warm; a later call resumes and keeps the references.
set -u
[ -n "${TINY:-}" ] || source benchmarks/gpu_site.sh \
  && export PYTHONPATH=/tmp/site || exit 1
# flash_attn.cute (attention backend "auto" picks its Hopper kernel) where the call carries .fa/ (fa_cute_env.sh)
[ -d .fa ] && source benchmarks/fa_cute_env.sh
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/xb_out}; R=/tmp/xb; mkdir -p $R/n4/ref $R/n2/ref $OUT
nvidia-smi --query-gpu=name,memory.total --format=csv > $OUT/gpus.txt
G=${GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}; [ "$G" -ge 2 ] 2>/dev/null || G=4  # TINY (CPU): 4
NDEF=$(( G < 4 ? G : 4 ))
B="python3 benchmarks/bench.py --driver --gpus $G ${TINY:+--tiny} --calls-per-sample ${CALLS:-1} ${AHEAD:+--gpu-ahead-ms $AHEAD}"
LIMIT=${LIMIT:-570}
left() { echo $((LIMIT - SECONDS)); }
for job in "$@"; do  # bad jobs fail before anything runs
  IFS=: read model meths degs n <<< "$job"; n=${n:-$NDEF}
  case $n in 2|4) ;; *) echo "gpu_rows.sh: job $job: N must be 2 or 4" >&2; exit 2 ;; esac
  [ $n -le $G ] || { echo "gpu_rows.sh: job $job needs $n GPUs, the machine has $G" >&2; exit 2; }
done
if [ -n "${RING_CHECK:-}" ]; then
  PYTHONPATH=$PYTHONPATH:$PWD timeout 240 torchrun --nproc_per_node $RING_CHECK benchmarks/ring_check.py \
    --out $OUT/ring_check.jsonl --md $OUT/ring_check.md > $OUT/ring_check.log 2>&1 \
    && rm -f $OUT/ring_check.log   # kept only when it failed
  cat $OUT/ring_check.md 2>/dev/null
fi
if [ -n "${MICRO:-}${MERGE:-}" ]; then
  ( [ -z "${MICRO:-}" ] || CUDA_VISIBLE_DEVICES=0 python3 benchmarks/norm_rope.py --md $OUT/norm_rope.md > $OUT/norm_rope.log 2>&1
    [ -z "${MERGE:-}" ] || CUDA_VISIBLE_DEVICES=0 python3 benchmarks/lse_kernels.py --merge-only --out $OUT/lse_merge.md \
      > $OUT/lse_merge.log 2>&1 ) &
fi
i=1; started=" "; declare -A chain  # per reference GPU, its models one after another (no two timings share a GPU)
for job in "$@"; do
  model=${job%%:*}
  [ -f $R/n4/ref/$model.pt ] && continue
  case "$started" in *" $model "*) continue ;; esac
  started="$started$model "
  chain[$i]="${chain[$i]:-} $model"
  i=$((i % (G - 1) + 1))
done
for g in "${!chain[@]}"; do
  ( for model in ${chain[$g]}; do
      $B --ns 1 --models $model --methods eager --gpu-offset $g --out $R/n1_$model --budget-s 300 \
        > $OUT/n1_$model.log 2>&1
    done ) &
done
wait
cp $R/n1_*/ref/*.pt $R/n4/ref/ 2>/dev/null; cp $R/n1_*/ref/*.pt $R/n2/ref/ 2>/dev/null
for job in "$@"; do
  IFS=: read model meths degs n <<< "$job"
  n=${n:-$NDEF}
  [ $(left) -lt 40 ] && echo "no time left for $job" >> $OUT/skipped.txt && continue
  $B --ns $n --models $model --methods $meths --degs $degs --out $R/n$n --budget-s $(left) >> $OUT/n$n.log 2>&1
done
extra=$(ls -d $R/n1_* 2>/dev/null); [ -f $R/n2/rows.jsonl ] && extra="$extra $R/n2"
python3 benchmarks/bench.py --merge --out $R/n4 --merge-from $extra --md $OUT/bench.md --png $OUT/scaling.png \
  > $OUT/merge.log 2>&1 && rm -f $OUT/merge.log   # kept only when the merge failed
# every row of the call, the 1-GPU references included, in one small file (raw.tgz, with the logs, may be too big to
# keep); the device tool returns at most 8 files
cat $R/n1_*/rows.jsonl $R/n2/rows.jsonl $R/n4/rows.jsonl > $OUT/rows.jsonl 2>/dev/null
[ -n "${NO_RAW:-}" ] || tar czf $OUT/raw.tgz -C $R --exclude=.seeded .
cat $OUT/norm_rope.md $OUT/lse_merge.md 2>/dev/null; tail -n 3 $OUT/n[24].log 2>/dev/null; grep -v "^$" $OUT/bench.md | head -60
