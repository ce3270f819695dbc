"""copy2d: a 2-D piece of the copy-engine all-to-all (ce_a2a.py) as one Triton kernel: the own piece
(XDIT_CE_LOCAL=triton), and the pieces SM stores send to peers through their mapped buffers (XDIT_CE_SM_PEERS).

A rank's piece for itself cannot use a copy engine: cuMemcpy2DAsync inside one GPU runs as the driver's
``memcpyDtoD2D_aligned_smalldiffpitch`` kernel. In the FLUX 2048² Ulysses-2 step on 2 x H200 those kernels took
7.4 ms per step (228 pieces of 26 MB: ~1.6 TB/s of read + write) and ran with no compute beside them: the
union of compute kernels (326.1 ms) is their sum (benchmarks/results/session21/overhead_u2/), though they overlap
the wait for the peers' longer copies. This kernel copies the same rows (inner stride 1, any row pitch) with wide
loads; both are SM kernels on the piece's stream. On one H200 it was exact and not faster than the driver's copy
(benchmarks/results/session22/ce_local_copy.md), so it stays opt-in.

    copy2d(dst, dst_off, dpitch, src, src_off, spitch, width, rows)   # all in elements of src's dtype

copies rows x width elements from src.flatten()[src_off + r * spitch + c] to dst.flatten()[dst_off + r * dpitch
+ c]. Offsets, pitches and widths in elements; dst and src share a dtype.
"""
from __future__ import annotations

from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:          # CPU-only installs: ce_a2a never takes this path off CUDA
    triton = None


if triton is not None:
    @triton.jit
    def _copy2d_kernel(dst, dst_off, dpitch, src, src_off, spitch, rows, width,
                       BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
        r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
        c0 = tl.program_id(1).to(tl.int64) * BLOCK_W
        c = c0 + tl.arange(0, BLOCK_W)[None, :]
        m = (r < rows) & (c < width)
        v = tl.load(src + src_off + r * spitch + c, mask=m)
        tl.store(dst + dst_off + r * dpitch + c, v, mask=m)


def copy2d(dst: Tensor, dst_off: int, dpitch: int, src: Tensor, src_off: int, spitch: int, width: int,
           rows: int) -> None:
    if triton is None:
        raise RuntimeError("XDIT_CE_LOCAL=triton needs triton; unset it or install triton")
    if dst.dtype != src.dtype:
        raise ValueError(f"copy2d: dst is {dst.dtype}, src is {src.dtype}")
    block_w = min(1024, triton.next_power_of_2(width))
    block_r = max(1, 4096 // block_w)     # ~4096 elements (8 KB of bf16) per program
    grid = (triton.cdiv(rows, block_r), triton.cdiv(width, block_w))
    _copy2d_kernel[grid](dst, dst_off, dpitch, src, src_off, spitch, rows, width, BLOCK_R=block_r, BLOCK_W=block_w,
                         num_warps=4)
