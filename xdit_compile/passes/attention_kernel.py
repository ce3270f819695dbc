"""attention_kernel_pass: the graph's SDPA calls run flash_attn.cute's Hopper kernel (attention backend "fa3_cute").

    before:  o = scaled_dot_product_attention(q, k, v, scale=s)          # no mask, no dropout, not causal
    after:   o = xdit.fa3_attention(q, k, v, s)                           # runtime/flash_cute.py

Runs when the plan's attention backend resolves to "fa3_cute" (backend.py: "auto" does on a Hopper GPU where
flash_attn.cute and nvidia-cutlass-dsl import), last before insert_cache_skip, so every SDPA is covered: the ones
decompose_ulysses emits around its all-to-alls, and the model's own (cross-attention, attention that is not
sequence parallel, plans without parallelism). Attention inside the xdit ops (ring, USP, the undecomposed Ulysses
op) gets the backend as their argument instead.

Only calls the kernel takes: q/k/v 4-D (B, H, S, D) of one float16 / bfloat16 dtype, equal head counts, head dims
multiples of 8 up to 256, no attn_mask, dropout_p 0, is_causal false, enable_gqa false; others stay SDPA.

Why: one H200 (benchmarks/attn_kernels.py), against cuDNN (what SDPA runs there): FLUX 1024² shapes 3-8%
faster, 2048² 4-12%, Wan 480p 11-18%; the output differs from cuDNN's as much as torch's flash kernel's does.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..runtime import flash_cute  # noqa: F401  (registers xdit::fa3_attention)
from .shard_modulation import _arg
from .token_dims import SDPA

FA3 = torch.ops.xdit.fa3_attention.default


def attention_kernel_pass(gm: fx.GraphModule, ctx) -> bool:
    if getattr(ctx, "attention_backend", "auto") != "fa3_cute":
        return False
    g = gm.graph
    swapped = 0
    for n in list(g.nodes):
        if n.op != "call_function" or n.target not in SDPA or not _takes(n):
            continue
        with g.inserting_before(n):
            new = g.call_function(FA3, (*_qkv(n), _arg(n, 6, "scale")))
        new.meta.update(n.meta)
        n.replace_all_uses_with(new)
        g.erase_node(n)
        swapped += 1
    if hasattr(ctx, "fuse_report"):
        ctx.fuse_report["fa3_attention"] = swapped
    return swapped > 0


def _qkv(n: fx.Node) -> tuple:
    return _arg(n, 0, "query"), _arg(n, 1, "key"), _arg(n, 2, "value")


def _takes(n: fx.Node) -> bool:
    if _arg(n, 3, "attn_mask") is not None or (_arg(n, 4, "dropout_p") or 0.0) != 0.0 \
            or _arg(n, 5, "is_causal") or _arg(n, 7, "enable_gqa"):
        return False
    # decompose_ulysses' SDPA nodes carry the (full-size) q / k / v of the call they came from: same dtype, head dims
    vals = n.meta.get("sdpa_inputs") or [a.meta.get("example_value") if isinstance(a, fx.Node) else None
                                         for a in _qkv(n)]
    if not all(isinstance(v, torch.Tensor) and v.dim() == 4 for v in vals):
        return False
    q, k, v = vals
    return (q.dtype == k.dtype == v.dtype and q.dtype in (torch.float16, torch.bfloat16)
            and q.shape[1] == k.shape[1] == v.shape[1] and q.shape[-1] == k.shape[-1]
            and all(isinstance(d, int) and d % 8 == 0 and d <= 256 for d in (q.shape[-1], v.shape[-1])))
