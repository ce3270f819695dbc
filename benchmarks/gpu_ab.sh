#!/bin/bash
# Issue 4 A/B on 4 GPUs, one device call (< 10 min): FLUX 1024² ulysses 4 under Inductor + CUDA graphs with
# the all-to-all as an opaque custom op (xdit_cg_op, the old path), decomposed into functional collectives
# (xdit_cg, the default now) and decomposed + Inductor's compute/comm reordering (xdit_cg_ov, its own sub-run
# last in case it misbehaves), beside diffusers' CP under torch.compile (diffusers_ind); every row checked
# against the 1-GPU eager output of the same run.
#   bash benchmarks/gpu_ab.sh            (results: $OUT/bench.md, $OUT/raw.tgz)
set -u
PHASE2_JOBS=${AB_JOBS:-"flux1024:xdit_cg_op,xdit_cg,diffusers_ind:u4 flux1024:xdit_cg_ov:u4"} LIMIT=${LIMIT:-540} \
  bash benchmarks/gpu_issue4.sh 2
