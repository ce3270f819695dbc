"""Ring attention with k/v moved by the GPUs' copy engines (compile.ring_transfer = "copy_engine").

    out = ring_ce(q, k, v, scale, group_name, backend)   # (B, H, S, D) each; the same as attention over all keys

Why: the NCCL ring (attention._ring) moves each k/v block with send/recv kernels, which need SMs while the
block's attention holds every SM, and it merges one partial output per rank. Here each rank copies its k and v
once into every peer's receive buffer with cuMemcpy2DAsync (copy engines, no SM), attends its own block while
they travel, then attends every peer's block in one kernel call and merges the two partial outputs
(_lse.merge_lse_all). Attention without a mask does not depend on the order of the keys, so the peers' blocks
sit in one buffer in an order rotated per rank: block b of rank me's buffer holds rank (me + 1 + b) % n's k/v,
the n - 1 peers' blocks contiguous: one (B, (n - 1) * S, Hk, D) buffer for k and one for v, which the kernels read
as (B, Hk, L', D) views. Every rank holds every key, as an all-gather ring (xDiT's and torch's templated ring rotate by all-gather
too); a rank's sends are n - 1 copies of its k/v, in the order me + 1, me + 2, ..., so each rank receives from
me - 1 first.

Completion and reuse, with stream memory operations and flags in symmetric memory (2n int32 per group):
- ready[p] on rank j: rank p's block has landed in j's buffer. The sender's stream to j writes it after its copies
  (cuStreamWriteValue32, a memory fence first). The receiver waits for every ready flag before the peers' attention
  with runtime/spin_wait.py's kernel on the compute stream (it resets them; XDIT_TIMEOUT_S traps it instead of
  hanging), or with a front-end wait where triton is missing.
- free[j] on rank p: rank j has finished reading the block p wrote into j's buffer last time. j writes it into
  every peer after its peers' attention; p's stream to j waits for it (cuStreamWaitValue32, no SM) and resets it
  before writing j's buffer again. They start at 1. So one buffer per shape serves every call, whatever the order
  of calls or the parity of a CUDA graph's call count (a slot scheme would need an even count).
Each call's copies read k and v; the compute stream waits for them before returning, so the caching allocator
cannot hand their memory out early. CUDA graphs capture all of it (events fork and join the copy streams).

Fallback (CPU / gloo, GPUs without peer access, XDIT_CE_A2A=0): one all_gather of k/v fills the same rotated
layout, and the same two attentions and merge run, so CPU tests check the arrangement.
Limits: equal shards, no mask (the rewrite pass gives masked or uneven calls the NCCL ring).
Memory: a k and a v buffer of (B, (n - 1) * S, Hk, D) per shape, kept for the process (FLUX 2048² ring 2: 104 MB).
"""
from __future__ import annotations

import ctypes

import torch
import torch.distributed as dist
from torch import Tensor

from . import ce_a2a
from ._lse import attention_with_lse, merge_lse_all
from .symm_a2a import _in_side_thread, _timeout_ms

__all__ = ["ring_ce"]

_FLAGS: dict = {}    # (group, device) -> {"flags": (2n,) int32 [ready | free], "ptrs": every rank's address of it}


def _ring_flags(group_name: str, n: int, device: torch.device) -> dict:
    key = (group_name, device)
    st = _FLAGS.get(key)
    if st is None:
        def make():
            import torch.distributed._symmetric_memory as symm_mem
            flags = symm_mem.empty(2 * n, dtype=torch.int32, device=device)
            flags[:n].zero_()
            flags[n:].fill_(1)
            torch.cuda.synchronize(device)
            hdl = symm_mem.rendezvous(flags, group_name)
            off = flags.data_ptr() - hdl.buffer_ptrs[hdl.rank]
            return {"flags": flags, "ptrs": [p + off for p in hdl.buffer_ptrs]}
        st = _FLAGS[key] = _in_side_thread(make, device)
    return st


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
    streams, _ = ce_a2a._streams(k.device, n)
    cur = torch.cuda.current_stream(k.device)
    ev_in = cur.record_event()
    events = []
    for i in range(1, n):
        j = (me + i) % n
        sj = streams[j]
        sj.wait_event(ev_in)
        ce_a2a._wait_flags([fl["ptrs"][me] + (n + j) * 4], sj)     # j has read what I wrote last time
        blk = (me - j - 1) % n                                      # my block in j's rotated buffer
        for st, xt in zip(bufs, xts):
            row = hk * xt.size(3) * e
            for bi in range(b):
                dst = st["ptrs"][j] + (bi * (n - 1) + blk) * s * row
                ce_a2a._memcpy2d(dst, row, xt.data_ptr() + bi * xt.stride(0) * e, xt.stride(1) * e, row, s, sj)
        _write_flag(sj, fl["ptrs"][j] + me * 4)                     # ready[me] on j
        events.append(sj.record_event())
    return bufs[0]["buf"].transpose(1, 2), bufs[1]["buf"].transpose(1, 2), ["ce", events, fl, xts]


def ring_ce(q_BHSD: Tensor, k_BHSD: Tensor, v_BHSD: Tensor, scale, group_name: str, backend: str) -> Tensor:
    """Attention of the local queries over every rank's k/v (equal shards, no mask); see the module doc."""
    pg = dist.distributed_c10d._resolve_process_group(group_name)
    n, me = pg.size(), pg.rank()
    if n == 1:
        return attention_with_lse(q_BHSD, *_gqa(q_BHSD, k_BHSD, v_BHSD), None, scale, backend)[0].to(q_BHSD.dtype)
    k_peers, v_peers, pending = _peer_blocks(k_BHSD, v_BHSD, group_name, pg, n, me)
    out_own, lse_own = attention_with_lse(q_BHSD, *_gqa(q_BHSD, k_BHSD, v_BHSD), None, scale, backend)
    if pending[0] == "ce":
        _, events, fl, _keep = pending
        cur = torch.cuda.current_stream(q_BHSD.device)
        from . import spin_wait
        if spin_wait.available():
            spin_wait.spin_wait(fl["flags"], 0, n, n, me, _timeout_ms())
        else:
            ce_a2a._wait_flags([fl["ptrs"][me] + p * 4 for p in range(n) if p != me], cur)
    out_peers, lse_peers = attention_with_lse(q_BHSD, *_gqa(q_BHSD, k_peers, v_peers), None, scale, backend)
    if pending[0] == "ce":
        for p in range(n):              # done reading the peers' blocks: each may write this buffer again
            if p != me:
                _write_flag(cur, fl["ptrs"][p] + (n + me) * 4)
        for ev in events:               # the copies read k and v: keep them until the copies are done
            cur.wait_event(ev)
    return merge_lse_all([out_own, out_peers], [lse_own, lse_peers], q_BHSD.dtype)[0]


def _gqa(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    rep = q.size(1) // k.size(1)
    if rep == 1:
        return k, v
    return k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
