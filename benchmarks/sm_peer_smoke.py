"""One GPU, a group of one: the pieces XDIT_CE_SM_PEERS runs on, before a multi-GPU check can: a receive buffer
in symmetric memory (ce_a2a._buffer), rank j's whole allocation as a tensor (ce_a2a._peer_view, here j = this
rank), and local_copy.copy2d storing a 2-D piece into it at the offset a2a_start computes from buffer_ptrs.

    CUDA_VISIBLE_DEVICES=0 torchrun --nproc_per_node 1 benchmarks/sm_peer_smoke.py
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_util import init_nccl  # noqa: E402


def main():
    dev, rank, n = init_nccl()
    from xdit_compile.runtime import ce_a2a
    from xdit_compile.runtime.local_copy import copy2d
    g = dist.group.WORLD.group_name
    bf = torch.bfloat16
    st = ce_a2a._buffer(g, "q", 0, (1, 4 * 96, 6, 128), bf, dev, True)
    peer = ce_a2a._peer_view(st, rank, bf)
    e = 2
    assert peer.data_ptr() == st["hdl"].buffer_ptrs[rank], (peer.data_ptr(), st["hdl"].buffer_ptrs[rank])
    assert peer.numel() * e >= st["buf"].numel() * e + (st["buf"].data_ptr() - peer.data_ptr())
    x = torch.randn(1, 96, 24, 128, device=dev, dtype=bf)        # (B, S, H, D): 96 tokens, 24 heads
    st["buf"].zero_()
    blk, h = 2, 6                                                # my 96 rows at block 2, heads 6..11 of x
    dst = st["ptrs"][rank] + (blk * 96 * h * 128) * e
    src = x.data_ptr() + (h * 128) * e
    copy2d(peer, (dst - st["hdl"].buffer_ptrs[rank]) // e, h * 128, x, (src - x.data_ptr()) // e, 24 * 128,
           h * 128, 96)
    torch.cuda.synchronize()
    got = st["buf"][:, blk * 96:(blk + 1) * 96]
    ok = torch.equal(got, x[:, :, h:2 * h]) and st["buf"][:, :blk * 96].abs().sum().item() == 0
    print(f"sm_peer_smoke: buffer_size {st['hdl'].buffer_size} bytes, view {peer.numel()} elements, exact {ok}")
    dist.destroy_process_group()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
