"""Producers that write straight into a copy-engine receive buffer (compile.ce_in_place), so a transfer's own piece
needs no copy.

Each copy-engine transfer (runtime/ce_a2a.py) has a piece that stays on the rank: q/k/v's own heads of its own
tokens, the output's own tokens of its own heads. The plain kinds copy it into the receive buffer with an SM
kernel (the driver's copy inside one GPU): one rank of FLUX 2048² ulysses 4 spends 2.1 ms per step on those copies
(benchmarks/results/session25/, `profile_step.py --fake-world 4`), and the output's copy sits between the
attention and the out projection, with nothing to hide it. The in-place kinds make the receive buffer the whole
(B, L, H, D) of all tokens and heads, so the producer's output can sit in it at the place its own piece belongs:

    q / k:  rows me*S of the buffer, all heads  <- xdit::norm_rope_into (FLUX's and Wan's q and k)
    v:      rows me*S of the buffer, all heads  <- xdit::linears_into (its projection, or FLUX's text and image
            projections one after another: their cat; one cuBLAS GEMM per part, out= the buffer's rows)
            this rank receives: every rank's rows, its heads (B, h, L, D), a strided view SDPA reads
    o:      all rows, heads me*h of the buffer  <- xdit::attention_into (the attention kernel's output)
            this rank receives: its rows, every rank's heads (B, S', H, D), what the out projection reads

and the peers' pieces go from where they sit in this rank's buffer to the same place in the peer's. Memory: the
buffers of those kinds are N times larger (FLUX 2048² ulysses 4: 104 MB instead of 26 MB each, 2 slots x 4).

v is written in place only where fuse_linears leaves its projection alone (more than fuse_linears.MAX_ROWS rows per
rank: FLUX 2048², Wan 480p), since at fewer rows one GEMM joined with q's and k's is worth more. attention_into runs
flash_attn.cute's kernel, which writes through the output's strides; decompose_ulysses uses it only where the
plan's attention backend is fa3_cute (SDPA would write elsewhere and copy: more than the own piece) or off CUDA
(the same math, so the CPU tests run the path). Off CUDA, under a fake group or with the gloo fallback, the ops
compute as usual and copy into the buffer view: the same values.

With query parts (compile.query_parts) q travels rotated, so norm_rope_into writes the own rows into the last block
(kind qri); k and v as above; the output goes back in parts, not in place. Head chunks keep the plain kinds.

All three return a view of a persistent buffer, like a2a_wait: the lowering marks their outputs never-reuse.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from . import ce_a2a, flash_cute
from .norm_rope import norm_rope_out

__all__ = ["attention_into", "linears_into", "norm_rope_into"]


@torch.library.custom_op("xdit::norm_rope_into", mutates_args=())
def norm_rope_into(xs: list[Tensor], weights: list[Tensor], eps: float, norm_all: bool, ce: Tensor, se: Tensor,
                   co: Tensor, so: Tensor, round_first: bool, group_name: str, kind: str, slot: int) -> Tensor:
    """xdit::norm_rope's [B, sum S_i, H, D], written into the receive buffer of the in-place kind (qi / ki) at this
    rank's rows; returns that view."""
    B, _, H, D = xs[0].shape
    S = sum(x.shape[1] for x in xs)
    out = ce_a2a.in_place_out(group_name, kind, slot, (B, S, H, D), xs[0].dtype, xs[0].device)
    return norm_rope_out(out, xs, weights, eps, norm_all, ce, se, co, so, round_first)


@norm_rope_into.register_fake
def _(xs, weights, eps, norm_all, ce, se, co, so, round_first, group_name, kind, slot):
    B, _, H, D = xs[0].shape
    S = sum(x.shape[1] for x in xs)
    return xs[0].new_empty((B, _size(group_name) * S, H, D))[:, :S]    # the strides of the buffer's rows


@torch.library.custom_op("xdit::linears_into", mutates_args=())
def linears_into(xs: list[Tensor], weights: list[Tensor], biases: list[Tensor | None], heads: int, group_name: str,
                 kind: str, slot: int) -> Tensor:
    """linear(xs[i], weights[i], biases[i]) for each i ([B, S_i, K_i] -> [B, S_i, heads * D]), one after another
    along S as their torch.cat, as [B, sum S_i, heads, D], written into the receive buffer of the in-place kind (vi)
    at this rank's rows, each part by one cuBLAS GEMM with its bias (addmm); returns that view."""
    x0 = xs[0]
    B, S, hd = x0.shape[0], sum(x.shape[1] for x in xs), weights[0].shape[0]
    out = ce_a2a.in_place_out(group_name, kind, slot, (B, S, heads, hd // heads), x0.dtype, x0.device)
    off = 0
    for x, w, b in zip(xs, weights, biases):
        s = x.shape[1]
        for bi in range(B):                     # this batch row's rows of out are packed: a (s, hd) matrix
            o = out[bi, off:off + s].view(s, hd)
            if b is None:
                torch.mm(x[bi], w.t(), out=o)
            else:
                torch.addmm(b, x[bi], w.t(), out=o)
        off += s
    return out


@linears_into.register_fake
def _(xs, weights, biases, heads, group_name, kind, slot):
    B, S, hd = xs[0].shape[0], sum(x.shape[1] for x in xs), weights[0].shape[0]
    return xs[0].new_empty((B, _size(group_name) * S, heads, hd // heads))[:, :S]


@torch.library.custom_op("xdit::attention_into", mutates_args=())
def attention_into(q: Tensor, k: Tensor, v: Tensor, scale: float | None, group_name: str, slot: int) -> Tensor:
    """Attention (no mask, not causal) of this rank's heads over all tokens, (B, h, L, Dv), written into the output's
    in-place receive buffer (kind oi) at this rank's heads; returns that view."""
    B, h, L, _ = q.shape
    out = ce_a2a.in_place_out(group_name, "oi", slot, (B, h, L, v.shape[-1]), q.dtype, q.device)
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and flash_cute.available(q.device):
        flash_cute.attention(q, k, v, scale, out=out)
        return out
    return out.copy_(F.scaled_dot_product_attention(q, k, v, scale=scale))


@attention_into.register_fake
def _(q, k, v, scale, group_name, slot):
    B, h, L, _ = q.shape
    return q.new_empty((B, L, h * _size(group_name), v.shape[-1]))[:, :, :h].transpose(1, 2)


def _size(group_name: str) -> int:
    return dist.distributed_c10d._resolve_process_group(group_name).size() if dist.is_initialized() else 1
