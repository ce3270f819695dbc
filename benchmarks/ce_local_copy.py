"""The copy-engine all-to-all's own piece (rank j == this rank) on one GPU: how long it takes and how much it delays
the GEMM launched right after it on another stream (what a step does: the start queues the copies, the compute
goes on).

    CUDA_VISIBLE_DEVICES=0 python benchmarks/ce_local_copy.py --md $OUT/ce_local_copy.md

Ways to copy the same bytes:
- driver 2-D: cuMemcpy2DAsync (what ce_a2a runs; inside one GPU the driver's memcpyDtoD2D kernel on the SMs);
- triton 2-D: runtime/local_copy.py's copy2d (XDIT_CE_LOCAL=triton), checked equal here;
- torch copy_ of the strided view (an ATen elementwise kernel);
- 1-D: the piece as one contiguous block (cudaMemcpyAsync device to device), what the copy would be if the
  producer wrote its output rank-major (B, N, S, h, D): does the driver run it on a copy engine, off the SMs?
Whether each way ran as a kernel or as a copy-engine memcpy is read from a torch.profiler trace.

Shapes (q/k/v piece: S token rows of h of H heads x 128, bf16; source pitch H heads, destination contiguous):
FLUX 2048² ulysses 4 and 2, FLUX 1024² ulysses 4, Wan 480p ulysses 4. The GEMM beside it: the piece's rows times
the model's MLP up-projection (3072 -> 12288 for FLUX, 5120 -> 13824 for Wan). CUDA events, median of 20 timings
of 10 calls each.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpu_util import timed_us  # noqa: E402

CASES = [("FLUX 2048² u4", 4224, 24, 6, 3072, 12288), ("FLUX 2048² u2", 8448, 24, 12, 3072, 12288),
         ("FLUX 1024² u4", 1152, 24, 6, 3072, 12288), ("Wan 480p u4", 8190, 40, 10, 5120, 13824)]


def _kinds(fn) -> str:
    """'kernel NAME' / 'memcpy NAME' for what fn put on the GPU (torch.profiler, CUDA activities)."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = set()
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            names.add(e.name[:40])
    return ", ".join(sorted(names)) or "?"


def main():
    from xdit_compile.runtime import ce_a2a
    from xdit_compile.runtime.local_copy import copy2d
    ap = argparse.ArgumentParser()
    ap.add_argument("--md", default="ce_local_copy.md")
    args = ap.parse_args()
    e, d = 2, 128
    lines = [f"# Copy-engine all-to-all, the own piece ({torch.cuda.get_device_name()}, torch {torch.__version__})",
             "", "us: the copy alone; the GEMM alone; both, copy launched first on its own stream (GEMM + copy "
             "serialized would be the sum). GB/s: read + write of the piece, copy alone.", "",
             "| case | piece MB | way | ran as | equal | copy us | GB/s | GEMM us | both us | delay of the GEMM us |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    cur = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    for label, s, heads, h, k, n in CASES:
        src = torch.randn(s, heads, d, device="cuda", dtype=torch.bfloat16)
        dst = torch.empty(s, h, d, device="cuda", dtype=torch.bfloat16)
        sv = src[:, :h]
        flat_src = sv.contiguous()      # the piece as the rank-major producer would leave it
        x = torch.randn(s, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
        width = h * d * e
        ways = {
            "driver 2-D": lambda st: ce_a2a._memcpy2d(dst.data_ptr(), width, sv.data_ptr(), heads * d * e, width, s,
                                                       st),
            "triton 2-D": lambda st: copy2d(dst, 0, h * d, src, 0, heads * d, h * d, s),
            "torch copy_ (strided)": lambda st: dst.copy_(sv),
            "1-D memcpy (rank-major source)": lambda st: dst.copy_(flat_src),
        }
        t_gemm = timed_us(lambda: torch.mm(x, w.t()))
        for way, fn in ways.items():
            def alone():
                fn(cur)

            def both():
                side.wait_stream(cur)
                with torch.cuda.stream(side):
                    fn(side)
                torch.mm(x, w.t())
                cur.wait_stream(side)
            dst.zero_()
            alone()
            torch.cuda.synchronize()
            ok = torch.equal(dst, sv)
            t_copy = timed_us(alone)
            t_both = timed_us(both)
            ran = _kinds(alone)
            lines.append(f"| {label} | {s * width / 1e6:.1f} | {way} | {ran} | {ok} | {t_copy:.1f} | "
                         f"{2 * s * width / t_copy / 1e3:.0f} | {t_gemm:.1f} | {t_both:.1f} | "
                         f"{t_both - t_gemm:+.1f} |")
            print(lines[-1], flush=True)
    open(args.md, "w").write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
