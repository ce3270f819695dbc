#!/bin/bash
# Issue 4, head-chunked Ulysses (compile.ulysses_chunks) on 4 GPUs, in parts of one device call each:
#   bash benchmarks/gpu_chunks.sh flux1024      # 1 GPU eager ref; u4 xdit_cg vs 3 / 2 chunks vs 3 chunks + overlap
#   bash benchmarks/gpu_chunks.sh flux2048      # 1 GPU eager ref; u4 xdit_cg vs the fastest chunked row of flux1024
#                                               # (xdit_cg_c3 on a fresh machine), then 2 chunks
#   bash benchmarks/gpu_chunks.sh displaced2048 # PipeFusion=4 per-call vs displaced loop at 2048² (issue 5)
#   bash benchmarks/gpu_chunks.sh wan480        # 1 GPU eager ref; u4 xdit_cg vs 2 / 5 chunks
# Rows: benchmarks/bench.py through gpu_issue4.sh phase 2 (same harness as bench.md; raw rows in $OUT/raw.tgz).
set -u
OUT=${OUT:-/tmp/chunks_out}; export OUT
case ${1:?part: flux1024, flux2048 or wan480} in
  flux1024) PHASE2_JOBS="flux1024:xdit_cg,xdit_cg_c3,xdit_cg_c2,xdit_cg_c3ov:u4" LIMIT=${LIMIT:-540} \
              bash benchmarks/gpu_issue4.sh 2 ;;
  flux2048)
    BEST=$(python3 - <<'PY' 2>/dev/null
import json
rows = [json.loads(l) for l in open("/tmp/xb/n4/rows.jsonl")]
rows = [r for r in rows if r["model"] == "flux1024" and r["method"].startswith("xdit_cg_c") and r.get("ms")]
print(min(rows, key=lambda r: r["ms"])["method"])
PY
)
    BEST=${BEST:-xdit_cg_c3}; echo "flux2048: xdit_cg vs $BEST"
    PHASE2_JOBS="flux2048:xdit_cg,$BEST,xdit_cg_c2:u4" LIMIT=${LIMIT:-560} bash benchmarks/gpu_issue4.sh 2
    ;;
  displaced2048) OUT=$OUT/pf bash benchmarks/gpu_final.sh displaced2048 ;;
  wan480) PHASE2_JOBS="wan480:xdit_cg,xdit_cg_c2,xdit_cg_c5:u4" LIMIT=${LIMIT:-570} bash benchmarks/gpu_issue4.sh 2 ;;
  *) echo "unknown part $1"; exit 2 ;;
esac
