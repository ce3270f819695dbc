"""find_attention_pass: tag every attention node and decide which token dim sequence parallelism shards.

Runs the dim-class analysis (token_dims.analyze) over the captured graph. Every
`scaled_dot_product_attention` node (diffusers' dispatch_attention_fn inlines to exactly that) is an
attention node. The *sequence class* to shard is the self-attention sequence dim (q and k of the same
class) with the most attention work; its units (text and image segments of a joint sequence, say) are
split evenly over the sequence-parallel ranks. Writes ctx.analysis, ctx.unit_axis and ctx.layout;
no graph change.
"""
from __future__ import annotations

import torch.fx as fx

from . import token_dims as td
from .shard_sequence import choose_units, even_layout


def find_attention_pass(gm: fx.GraphModule, ctx) -> bool:
    an = td.analyze(gm)
    ctx.analysis = an
    if ctx.sp_size > 1:
        units, ctx.seq_class = choose_units(an)
        ctx.unit_axis.update({u: "sp" for u in units})
        ctx.layout.update({u: even_layout(an.classes.size[u], ctx.sp_size) for u in units})
    for n in an.attention:
        n.meta["xdit_attention"] = {"kind": "local"}
    return False
