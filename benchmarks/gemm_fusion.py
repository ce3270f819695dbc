"""Sibling linears (same input) as separate GEMMs or one GEMM over concatenated weights, at FLUX's per-rank shapes.

    CUDA_VISIBLE_DEVICES=0 python benchmarks/gemm_fusion.py --md $OUT/gemm_fusion.md

FLUX.1-dev, 1024² (4096 image + 512 text tokens), per rank under ulysses N: double blocks' image stream
(4096/N tokens: to_q, to_k, to_v), their text stream (512/N: add_q/k/v_proj), single blocks (4608/N: to_q, to_k,
to_v, proj_mlp), and the project's op (xdit.sibling_linear: the joined GEMM). bf16, bias on, CUDA events, median of 20 timings of 10 back-to-back calls each.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpu_util import timed_us  # noqa: E402


def case(m, k, ns, groups):
    """ns: output widths of the sibling linears; groups: partitions of them into GEMMs (lists of indices)."""
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for n in ns]
    bs = [torch.randn(n, device="cuda", dtype=torch.bfloat16) for n in ns]
    flops = sum(2 * m * k * n for n in ns)
    rows = []
    from xdit_compile.runtime import fused_linear
    key = fused_linear.hold_siblings(ws, bs)
    fused_linear.join_pending()
    us = timed_us(lambda: torch.ops.xdit.sibling_linear(x, key))
    rows.append(("xdit.sibling_linear", us, flops / us / 1e6))
    for name, part in groups:
        mats = [(torch.cat([ws[i] for i in g]), torch.cat([bs[i] for i in g])) for g in part]
        us = timed_us(lambda: [F.linear(x, w, b) for w, b in mats])
        rows.append((name, us, flops / us / 1e6))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--md", default="gemm_fusion.md")
    args = ap.parse_args()
    d, ff = 3072, 12288
    lines = [f"# Sibling linears: separate GEMMs vs one over concatenated weights ({torch.cuda.get_device_name()}, "
             f"torch {torch.__version__})", "",
             "| ulysses N | where | M (tokens per rank) | GEMMs | us | TFLOP/s |", "|---|---|---|---|---|---|"]
    for n in (1, 2, 4):
        for where, m, ns, groups in [
                ("double, image q/k/v", 4096 // n, [d] * 3,
                 [("3 separate", [[0], [1], [2]]), ("1 fused", [[0, 1, 2]])]),
                ("double, text q/k/v", 512 // n, [d] * 3,
                 [("3 separate", [[0], [1], [2]]), ("1 fused", [[0, 1, 2]])]),
                ("single, q/k/v + mlp", 4608 // n, [d, d, d, ff],
                 [("4 separate", [[0], [1], [2], [3]]), ("q/k/v fused + mlp", [[0, 1, 2], [3]]),
                  ("1 fused", [[0, 1, 2, 3]])])]:
            for name, us, tf in case(m, d, ns, groups):
                lines.append(f"| {n} | {where} | {m} | {name} | {us:.1f} | {tf:.0f} |")
            print(lines[-1], flush=True)
    open(args.md, "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
