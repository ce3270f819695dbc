"""Ring attention with k/v moved by the GPUs' copy engines (compile.ring_transfer = "copy_engine").

    out = ring_ce(q, k, v, scale, group_name, backend)   # (B, H, S, D) each; the same as attention over all keys

Why: the NCCL ring (attention._ring) moves each k/v block with send/recv kernels, which need SMs while the
block's attention holds every SM. Here each rank copies its k and v once into every peer's receive buffer with
cuMemcpy2DAsync (copy engines, no SM; one stream, peer me + 1 first) and attends its own block while they travel.
Then it attends the peers' blocks as they land: one per call while the copies are still behind, the rest in one
call (_stages). It merges the partial outputs once (_lse.merge_lse_all).
Measured on 2 x H200 (benchmarks/results/session29/): FLUX.1-dev 2048² ring 2, 347.6 ms/step against 373.5 with the
NCCL ring (and 342.8 for ulysses 2 in the same call); Wan2.1-14B 480p ring 2, 1386.2 against ulysses 2's 1386.3. One
attention call at the FLUX 2048² ring-2 shape (ring_check.py): 2.98 ms, the NCCL ring 3.14, the rank's queries over
every key in one kernel 2.87.

Layout: attention without a mask does not depend on the order of the keys, so the peers' blocks sit in one buffer
in an order rotated per rank. Block b of rank me's buffer holds rank (me + 1 + b) % n's k/v, so the n - 1 peers'
blocks are contiguous: one (B, (n - 1) * S, Hk, D) buffer for k and one for v, which the kernels read as
(B, Hk, L', D) views. Every rank ends up holding every key, as in an all-gather ring (xDiT's and torch's templated
ring also rotate by all-gather). A rank sends n - 1 copies of its k/v, in the order me + 1, me + 2, ..., so each
rank receives from me - 1 first.

Completion and reuse use stream memory operations and flags in symmetric memory (2n int32 per group):
- ready[p] on rank j: rank p's block has landed in j's buffer. The sender's stream to j writes it after its copies
  (cuStreamWriteValue32, a memory fence first). The receiver waits for a block's flag before attending it, with
  runtime/spin_wait.py's kernel on the compute stream, which resets it. XDIT_TIMEOUT_S makes that kernel trap
  instead of hanging. Where triton is missing it is a front-end wait.
- free[j] on rank p: rank j has finished reading the block p wrote into j's buffer last time. j writes it into
  every peer after its last attention call. p's stream to j waits for it (cuStreamWaitValue32, no SM) and resets
  it before writing j's buffer again. They start at 1. So one buffer per shape serves every call, whatever the
  order of calls or the parity of a CUDA graph's call count (a two-slot scheme would need an even count).
Each call's copies read k and v; the compute stream waits for them before returning, so the caching allocator
cannot hand their memory out early. CUDA graphs capture all of it (events fork and join the copy streams).

Fallback (CPU / gloo, GPUs without peer access, XDIT_CE_A2A=0): one all_gather of k/v fills the same rotated
layout, and the same attention calls and merge run, so CPU tests check the arrangement.
Limits: equal shards, no mask (the rewrite pass gives masked or uneven calls the NCCL ring).
Memory: a k and a v buffer of (B, (n - 1) * S, Hk, D) per shape, kept for the process (FLUX 2048² ring 2: 104 MB).
"""
from __future__ import annotations

import ctypes
import math

import torch
import torch.distributed as dist
from torch import Tensor

from . import ce_a2a
from ._lse import attention_with_lse, merge_lse_all
from .symm_a2a import _in_side_thread, _timeout_ms

__all__ = ["buffer_specs", "ring_ce"]

_FLAGS: dict = {}    # (group, device) -> {"flags": (2n,) int32 [ready | free], "ptrs": every rank's address of it}


def _ring_flags(group_name: str, n: int, device: torch.device) -> dict:
    key = (group_name, device)
    st = _FLAGS.get(key)
    if st is None:     # ready flags 0, free flags 1
        st = _FLAGS[key] = _in_side_thread(
            lambda: ce_a2a.symm_ints(group_name, 2 * n, device, fill=lambda f: f[n:].fill_(1)), device)
    return st


def buffer_specs(group_name: str, n: int, k_shape, dv: int, s: int, dtype: torch.dtype, device: torch.device
                 ) -> list[tuple]:
    """The k and v receive buffers of a copy-engine ring call over n ranks with shards of s tokens (k_shape: this
    rank's (B, Hk, S, D), its S unused; dv: v's head dim), in ce_a2a.reserve's form, so the backend makes them (and the
    group's flags) before the graph first runs, like the all-to-all's."""
    b, hk, _, d = k_shape
    return [(group_name, f"ring_{name}", 0, (b, (n - 1) * s, hk, dim), dtype, device, 1)
            for name, dim in (("k", d), ("v", dv))]


def _write_flag(stream, addr: int) -> None:
    ce_a2a._check_cu(ce_a2a._cuda()["write32"](ctypes.c_void_p(stream.cuda_stream), addr, 1, 0),
                     "cuStreamWriteValue32")


def _peer_blocks(k: Tensor, v: Tensor, group_name: str, pg, n: int, me: int) -> tuple[Tensor, Tensor, list]:
    """Start moving k/v to every peer and return this rank's (B, Hk, (n-1)S, D) views of the peers' k and v, and what
    the caller must finish after its own block's attention: ["ce", events, flags, what the copies read] or ["done"]."""
    b, hk, s, _ = k.shape
    ce = ce_a2a.available(group_name, k.device)
    bufs = [ce_a2a._buffer(group_name, f"ring_{name}", 0, (b, (n - 1) * s, hk, x.size(3)), x.dtype, x.device, ce)
            for name, x in (("k", k), ("v", v))]
    if not ce:
        order = [(me + 1 + i) % n for i in range(n - 1)]
        for st, x in zip(bufs, (k, v)):
            xt = x.transpose(1, 2).contiguous()                             # (B, S, Hk, D)
            every = xt.new_empty((n, *xt.shape))
            dist.all_gather(list(every.unbind(0)), xt, group=pg)
            st["buf"].copy_(every[order].transpose(0, 1).flatten(1, 2))
        return bufs[0]["buf"].transpose(1, 2), bufs[1]["buf"].transpose(1, 2), ["done"]
    fl = _ring_flags(group_name, n, k.device)
    xts = [x.transpose(1, 2).contiguous() for x in (k, v)]     # (B, S, Hk, D): no copy when already so
    e = k.element_size()
    # One stream for every destination, in the order me + 1, me + 2, ...: a GPU's peer copies go through one copy
    # engine anyway (session 28's trace: never two at once), and one stream makes them land in the order _stages
    # attends them (streams per destination would let the engine interleave them, and every block land late).
    sj = ce_a2a._streams(k.device, n)[0][(me + 1) % n]
    cur = torch.cuda.current_stream(k.device)
    sj.wait_event(cur.record_event())
    for i in range(1, n):
        j = (me + i) % n
        ce_a2a._wait_flags([fl["ptrs"][me] + (n + j) * 4], sj)     # j has read what I wrote last time
        blk = (me - j - 1) % n                                      # my block in j's rotated buffer
        for st, xt in zip(bufs, xts):
            row = hk * xt.size(3) * e
            for bi in range(b):
                dst = st["ptrs"][j] + (bi * (n - 1) + blk) * s * row
                ce_a2a._memcpy2d(dst, row, xt.data_ptr() + bi * xt.stride(0) * e, xt.stride(1) * e, row, s, sj)
        _write_flag(sj, fl["ptrs"][j] + me * 4)                     # ready[me] on j
    return bufs[0]["buf"].transpose(1, 2), bufs[1]["buf"].transpose(1, 2), ["ce", [sj.record_event()], fl, xts]


COPY_TOKENS = 3000
"""Shard length (tokens per rank) at which one peer's k/v copy takes as long as attending it: a copy engine moves
~236 GB/s to a peer (one at a time, session 28's 4 x H200 trace) and the attention kernel runs ~700 TFLOP/s, so
copy / attention = (4 S H D bytes / 236e9) / (4 S^2 H D flop / 700e12) ~ 3000 / S, whatever the heads."""


def _stages(n: int, s: int) -> list[list[int]]:
    """The peers' blocks (indices into the rotated buffer) each attention call after the own block takes, in the
    order they arrive: each rank sends to me + 1, me + 2, ... one copy after another, so rank me gets block n - 2
    (from me - 1) first, then n - 3, ... The first m come one per call, where m is the fewest own-or-single calls
    that cover the time the n - 1 copies take, (m + 1) S >= (n - 1) COPY_TOKENS; the rest, landed by then, in one
    call. Ring 2: [[0]] (own, then the peer). FLUX 2048² ring 4 (S = 4224): every peer alone; Wan 480p ring 4
    (S = 8190): [[2], [0, 1]]."""
    m = min(max(math.ceil((n - 1) * COPY_TOKENS / s) - 1, 0), n - 2)
    return [[n - 2 - i] for i in range(m)] + [list(range(n - 1 - m))]


def ring_ce(q_BHSD: Tensor, k_BHSD: Tensor, v_BHSD: Tensor, scale, group_name: str, backend: str) -> Tensor:
    """Attention of the local queries over every rank's k/v (equal shards, no mask); see the module doc."""
    pg = dist.distributed_c10d._resolve_process_group(group_name)
    n, me = pg.size(), pg.rank()
    if n == 1:
        return attention_with_lse(q_BHSD, *_gqa(q_BHSD, k_BHSD, v_BHSD), None, scale, backend)[0].to(q_BHSD.dtype)
    s = k_BHSD.size(2)
    k_peers, v_peers, pending = _peer_blocks(k_BHSD, v_BHSD, group_name, pg, n, me)
    outs, lses = [], []
    out, lse = attention_with_lse(q_BHSD, *_gqa(q_BHSD, k_BHSD, v_BHSD), None, scale, backend)
    outs.append(out)
    lses.append(lse)
    ce = pending[0] == "ce"
    if ce:
        from . import spin_wait
        _, events, fl, _keep = pending
        cur = torch.cuda.current_stream(q_BHSD.device)
    for blocks in _stages(n, s):
        if ce:                          # those blocks' senders' copies have landed (their ready flags)
            peers = [(me + 1 + b) % n for b in blocks]
            if spin_wait.available():
                for p in peers:
                    spin_wait.spin_wait(fl["flags"], p, p + 1, n, me, _timeout_ms())
            else:
                ce_a2a._wait_flags([fl["ptrs"][me] + p * 4 for p in peers], cur)
        lo, hi = min(blocks) * s, (max(blocks) + 1) * s
        out, lse = attention_with_lse(q_BHSD, *_gqa(q_BHSD, k_peers[:, :, lo:hi], v_peers[:, :, lo:hi]), None, scale,
                                      backend)
        outs.append(out)
        lses.append(lse)
    if ce:
        for p in range(n):              # done reading the peers' blocks: each may write this buffer again
            if p != me:
                _write_flag(cur, fl["ptrs"][p] + (n + me) * 4)
        for ev in events:               # the copies read k and v: keep them until the copies are done
            cur.wait_event(ev)
    return merge_lse_all(outs, lses, q_BHSD.dtype)[0]


def _gqa(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    rep = q.size(1) // k.size(1)
    if rep == 1:
        return k, v
    return k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
