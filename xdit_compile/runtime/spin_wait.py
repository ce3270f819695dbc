"""spin_wait: wait on the current stream, in one small kernel, until peers have set int32 flags to 1; reset them.

The copy-engine all-to-all (ce_a2a.py) with XDIT_CE_SIGNAL=spin: each sender's copy stream sets its flag on the
receiver with a stream memory operation (no SM), as in "flag" mode, and the receiver's compute stream runs this
kernel at the wait. Why not the other two completions:
- "barrier": the signal-pad barrier kernel is queued on a side stream at the START and spins there until every
  peer's copies have landed, i.e. while the compute between start and wait runs. A spinning CTA holds an SM, and
  the GEMMs and attention beside it are built to use every SM: one H200, a <<<1, 1>>> spinner beside 8
  back-to-back 4224 x 3072 -> 3072 GEMMs made them 73-86% slower, beside the attention 13-16% (three runs)
  (benchmarks/spin_gemm.py, benchmarks/results/session20/spin_gemm.md). The real step did not show it on two
  GPUs: FLUX 2048² ulysses 2 on 2 x H200 ran 347.6 ms with the barrier and 348.2 with this kernel, and the GEMMs
  beside a barrier kernel were not slower (benchmarks/results/session21/).
- "flag": the wait is cuStreamWaitValue32 in the GPU front end: no SM, but SDPA started ~45 us after the last
  flag was set (4 x H200), against ~13 us after the barrier kernel.
Here nothing spins beside compute: the kernel runs in the compute stream's order, at the point where the data is
needed, and usually finds every flag already set.

    flags: this rank's (chunks * n,) int32 flag tensor (symmetric memory, peers write it); the kernel waits for
    flags[lo:hi], skipping i with i % n == me (a rank sends itself no flag), then sets each back to 0.

A flag still unset after XDIT_TIMEOUT_S traps the kernel (the CUDA context dies with an error and torchrun ends
the job) instead of hanging. Legend: n ranks of the group, me this rank.
"""
from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import globaltimer
except ImportError:          # CPU-only installs: ce_a2a never takes this path off CUDA
    triton = None


if triton is not None:
    @triton.jit
    def _trap(x):
        return tl.inline_asm_elementwise("trap; mov.u32 $0, $1;", "=r,r", [x], dtype=tl.int32, is_pure=False,
                                         pack=1)

    @triton.jit
    def _spin_wait_kernel(flags_ptr, lo, hi, n, me, timeout_ns):
        t0 = globaltimer()
        for i in range(lo, hi):
            if i % n != me:
                v = tl.load(flags_ptr + i, volatile=True)
                while v != 1:
                    if globaltimer() - t0 > timeout_ns:
                        v = _trap(v)
                    v = tl.load(flags_ptr + i, volatile=True)
                tl.atomic_xchg(flags_ptr + i, 0, sem="acq_rel", scope="sys")


def available() -> bool:
    return triton is not None


def spin_wait(flags: Tensor, lo: int, hi: int, n: int, me: int, timeout_ms: int) -> None:
    """Queue the wait for flags[lo:hi] (except every n-th from `me`) on the current stream; see the module doc."""
    if triton is None:
        raise RuntimeError("XDIT_CE_SIGNAL=spin needs triton; use XDIT_CE_SIGNAL=barrier (the default) or flag")
    if flags.dtype != torch.int32 or flags.dim() != 1 or not 0 <= lo <= hi <= flags.numel():
        raise ValueError(f"spin_wait: flags must be 1-D int32 holding [{lo}, {hi}), got {flags.dtype} "
                         f"{tuple(flags.shape)}")
    _spin_wait_kernel[(1,)](flags, lo, hi, n, me, int(timeout_ms) * 1_000_000, num_warps=1)
