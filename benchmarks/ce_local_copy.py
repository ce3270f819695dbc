"""The copy-engine all-to-all's own piece (rank j == this rank): cuMemcpy2DAsync inside one GPU (the driver runs it
as an SM kernel, memcpyDtoD2D_aligned_smalldiffpitch) against torch's strided copy_ and a Triton kernel.

    CUDA_VISIBLE_DEVICES=0 python benchmarks/ce_local_copy.py --md $OUT/ce_local_copy.md

Shapes: FLUX 1024² (4608 tokens, 24 heads x 128, bf16) under ulysses N = 2 and 4: a q/k/v piece is S = 4608/N
token rows of h = 24/N heads (source pitch 24 heads, destination contiguous), an o piece the same rows from a
contiguous source into a destination of pitch 24 heads. CUDA events, median of 20 timings of 50 copies each.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpu_util import timed_us  # noqa: E402


def main():
    from xdit_compile.runtime import ce_a2a
    ap = argparse.ArgumentParser()
    ap.add_argument("--md", default="ce_local_copy.md")
    args = ap.parse_args()
    e, d, heads, tokens = 2, 128, 24, 4608
    lines = [f"# Copy-engine all-to-all, the local piece ({torch.cuda.get_device_name()}, torch {torch.__version__})",
             "", "| N | piece | rows x bytes | cuMemcpy2DAsync us | torch copy_ us | GB/s (copy_) | equal |",
             "|---|---|---|---|---|---|---|"]
    stream = torch.cuda.current_stream()
    for n in (2, 4):
        s, h = tokens // n, heads // n
        for piece in ("q/k/v", "o"):
            if piece == "q/k/v":
                src = torch.randn(s, heads, d, device="cuda", dtype=torch.bfloat16)
                dst = torch.empty(s, h, d, device="cuda", dtype=torch.bfloat16)
                sv, dv = src[:, :h], dst
            else:
                src = torch.randn(s, h, d, device="cuda", dtype=torch.bfloat16)
                dst = torch.empty(s, heads, d, device="cuda", dtype=torch.bfloat16)
                sv, dv = src, dst[:, :h]
            width = h * d * e
            drv = timed_us(lambda: ce_a2a._memcpy2d(dv.data_ptr(), dv.stride(0) * e, sv.data_ptr(), sv.stride(0) * e,
                                                 width, s, stream), reps=50)
            dst.zero_()
            ce_a2a._memcpy2d(dv.data_ptr(), dv.stride(0) * e, sv.data_ptr(), sv.stride(0) * e, width, s, stream)
            ok1 = torch.equal(dv, sv)
            tc = timed_us(lambda: dv.copy_(sv), reps=50)
            dst.zero_()
            dv.copy_(sv)
            ok2 = torch.equal(dv, sv)
            lines.append(f"| {n} | {piece} | {s} x {width} | {drv:.1f} | {tc:.1f} | {2 * s * width / tc / 1e3:.0f} | "
                         f"{ok1 and ok2} |")
            print(lines[-1], flush=True)
    open(args.md, "w").write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
