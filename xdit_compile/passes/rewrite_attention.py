"""rewrite_attention_pass: attention over the sharded sequence -> Ulysses / Ring / USP custom ops.

Input: SDPA nodes tagged by shard_sequence_pass with {"kind": "sequence", "seq_sizes": [...]}: q, k, v (and
the mask) already hold this rank's tokens. Output: one call of

    xdit::ulysses_attention   ring=1       all-to-all heads <-> sequence, local attention, all-to-all back
    xdit::ring_attention      ulysses=1    K/V rotate around the ring, log-sum-exp merge
    xdit::usp_attention       both         Ulysses inside ring

with the same q/k/v/mask/scale/enable_gqa arguments. Attention tagged "local" (cross-attention with full
keys, or sequence dims carried in the batch position) is left alone.

    before:  o = scaled_dot_product_attention(q, k, v, attn_mask=m)
    after:   o = xdit.ulysses_attention(q, k, v, m, None, False, "ulysses-group", [2048, 2048], "auto")
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .token_dims import arg


def rewrite_attention_pass(gm: fx.GraphModule, ctx) -> bool:
    changed = False
    for n in list(gm.graph.nodes):
        info = n.meta.get("xdit_attention")
        if not info:
            continue
        q, k, v = (arg(n, i, nm) for i, nm in enumerate(("query", "key", "value")))
        mask = arg(n, 3, "attn_mask")
        if arg(n, 5, "is_causal", False):
            raise ValueError(f"attention {n.name}: causal attention is not supported by sequence parallelism")
        scale = n.kwargs.get("scale", n.args[6] if len(n.args) > 6 else None)
        gqa = bool(n.kwargs.get("enable_gqa", False))
        rec = {"node": n.name, "q": _shape(q), "k": _shape(k), "mask": _shape(mask) if mask is not None else None}
        if info["kind"] != "sequence":
            rec["became"] = "local attention (no communication)"
            ctx.attention_report.append(rec)
            continue
        sizes = list(info["seq_sizes"])
        u, r = ctx.ulysses, ctx.ring
        backend = ctx.attention_backend
        if r == 1:
            target, args = torch.ops.xdit.ulysses_attention.default, (ctx.group_name("ulysses"), sizes, backend)
            kind = f"ulysses x{u}"
        elif u == 1:
            ce = getattr(ctx, "ring_transfer", "nccl") == "copy_engine" and mask is None and len(set(sizes)) == 1
            target = torch.ops.xdit.ring_attention.default
            args = (ctx.group_name("ring"), sizes, backend, "copy_engine" if ce else "nccl")
            kind = f"ring x{r}" + (" (k/v by the copy engines)" if ce else "")
            if ce and hasattr(ctx, "ce_buffers"):    # made before the graph first runs (ce_a2a.reserve)
                from ..runtime import ce_ring
                kv, vv = k.meta["example_value"], v.meta["example_value"]
                ctx.ce_buffers += ce_ring.buffer_specs(ctx.group_name("ring"), r, kv.shape, vv.shape[3], sizes[0],
                                                       kv.dtype, kv.device)
        else:
            target = torch.ops.xdit.usp_attention.default
            args = (ctx.group_name("ulysses"), ctx.group_name("ring"), sizes, backend)
            kind = f"usp ulysses x{u} ring x{r}"
        with gm.graph.inserting_before(n):
            new = gm.graph.call_function(target, (q, k, v, mask, scale, gqa, *args))
        new.meta = dict(n.meta)
        n.replace_all_uses_with(new)
        gm.graph.erase_node(n)
        rec["became"] = kind
        rec["op_node"] = new.name    # decompose_ulysses reports against it
        rec["seq_sizes"] = sizes
        rec["bytes"] = _attn_bytes(q, k, mask, u, r)
        ctx.attention_report.append(rec)
        changed = True
    return changed


def _shape(n):
    v = n.meta.get("example_value") if isinstance(n, fx.Node) else None
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _attn_bytes(q, k, mask, u, r) -> int:
    """Bytes this rank sends per call (full-size shapes / sequence degree = local)."""
    qv, kv = q.meta["example_value"], k.meta["example_value"]
    n = u * r
    esz = qv.element_size()
    q_local = qv.numel() // n * esz
    kv_local = 2 * kv.numel() // n * esz
    sent = 0
    if u > 1:   # q, k, v out and o back, each (u-1)/u of the local tensor leaves the rank
        sent += (q_local * 2 + kv_local) * (u - 1) // u
    if r > 1:   # k, v (after Ulysses: full heads / u, seq local * u) rotate r-1 times
        sent += kv_local * (r - 1)
    return int(sent)
