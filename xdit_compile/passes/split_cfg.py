"""split_cfg_pass: split the batch of a batched classifier-free-guidance call over the cfg axis.

Pipelines such as PixArt, SD3, HunyuanDiT, CogVideoX and DiT call the transformer once per step with the
batch [uncond..., cond...]. The batch dim is a dim class like any other (the class of every attention's
q batch dim, unified with the inputs' batch dims); this pass makes it a *unit* split over the cfg ranks,
so shard_sequence runs each cfg rank on its half (rank 0 the unconditional rows, rank 1 the conditional
ones) and gathers the halves at the outputs. No graph change here: it only extends ctx.unit_axis.

    before:  out = transformer(x[2B, ...])                      on every rank
    after:   out = gather_cfg(transformer(x[B*cfg_rank : B*(cfg_rank+1), ...]))
"""
from __future__ import annotations

import warnings
from collections import Counter

import torch.fx as fx

from .shard_sequence import even_layout
from .token_dims import arg


def split_cfg_pass(gm: fx.GraphModule, ctx) -> bool:
    an = ctx.analysis
    cl = an.classes
    roots = Counter()
    for n in an.attention:
        qd = an.dims.get(arg(n, 0, "query"))
        if isinstance(qd, list) and qd:
            c = cl.find(qd[0])
            roots[cl.leaves(c)[0] if cl.kind[c] == "prod" else c] += 1
    if not roots:
        raise ValueError("parallel.cfg > 1 needs attention over a batch of [uncond, cond]; "
                         "this graph has no attention node")
    unit = cl.find(roots.most_common(1)[0][0])
    size = cl.size[unit]
    if size % ctx.cfg_size:
        # CFG is off for this call (guidance_scale <= 1) or the caller batches differently: the cfg ranks
        # then compute the same batch (correct, no speed-up) instead of failing.
        warnings.warn(f"xdit: parallel.cfg={ctx.cfg_size} but this transformer call has batch {size}, which does "
                      "not split into [uncond, cond] halves (is guidance off?); the cfg ranks compute it redundantly",
                      stacklevel=2)
        return False
    if unit in ctx.unit_axis:
        raise ValueError("the batch dim and the sequence dim of this model are the same dim class; "
                         "cfg and sequence parallelism cannot both split it")
    ctx.unit_axis[unit] = "cfg"
    ctx.layout[unit] = even_layout(size, ctx.cfg_size)
    return False
