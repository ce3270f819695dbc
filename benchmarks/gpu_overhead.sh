#!/bin/bash
# Where the parallel step's time goes beyond 1/N of the 1-GPU step, in one device call (carry .whl and .fa):
# the 1-GPU profile, then the N-GPU copy-engine profile with XDIT_CE_SIGNAL=barrier and =spin (rank 0's traces
# analysed by trace_barriers.py and trace_gaps.py on the machine, and brought back).
#   bash benchmarks/gpu_overhead.sh N [MODEL]     (results: $OUT/profile_*.md, $OUT/barriers.md, $OUT/gaps.md)
set -u
N=${1:-2}; MODEL=${2:-flux2048}
source benchmarks/gpu_site.sh \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
[ -d .fa ] && source benchmarks/fa_cute_env.sh
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/ov_out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,memory.total --format=csv > $OUT/gpus.txt
P="benchmarks/profile_step.py --model $MODEL --lowering inductor --cudagraphs --compile-json {\"fuse_modulation\":true}"
timeout 150 torchrun --nproc_per_node 1 $P --ulysses 1 --out $OUT/profile_${MODEL}_1gpu.md > $OUT/p1.log 2>&1
echo "1 GPU rc=$? at ${SECONDS}s"
for s in barrier spin; do
  XDIT_CE_SIGNAL=$s timeout 200 torchrun --nproc_per_node $N $P --ulysses $N --all-to-all copy_engine \
    --steps 2 --trace /tmp/trace_$s.json.gz --out $OUT/profile_${MODEL}_u${N}_$s.md > $OUT/p_$s.log 2>&1
  echo "u$N $s rc=$? at ${SECONDS}s"
done
python3 benchmarks/trace_barriers.py /tmp/trace_barrier.json.gz /tmp/trace_spin.json.gz --steps 2 2 \
  --md $OUT/barriers.md > /dev/null 2>&1; echo "trace_barriers rc=$?"
python3 benchmarks/trace_gaps.py /tmp/trace_barrier.json.gz /tmp/trace_spin.json.gz --steps 2 2 \
  --md $OUT/gaps.md > /dev/null 2>&1; echo "trace_gaps rc=$?"
cp /tmp/trace_barrier.json.gz /tmp/trace_spin.json.gz $OUT/ 2>/dev/null   # rank 0's traces (a few hundred KB)
for f in $OUT/profile_*.md; do echo "== $f"; sed -n 5,16p $f; done
cat $OUT/barriers.md 2>/dev/null | head -30
