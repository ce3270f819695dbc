"""split_cat_linears_pass: a linear over a concatenation of wide parts becomes a sum of linears over the parts.

    before:  y = linear(cat([a, m], -1), W, b)                       # W: (O, A + M)
    after:   y = linear(a, W[:, :A], b) + linear(m, W[:, A:])        # A, M: the parts' widths

The concatenation is a copy of every part (read once, written once, then read again by the GEMM). The split
reads each part where it lies (W's column slices are strided views, no copy) and pays one add of the output
width instead, which Inductor fuses into the elementwise ops that follow (FLUX's single block: the gated
residual). So the pass applies only where the concatenation is at least twice the output's width. FLUX's and
HunyuanVideo's single blocks: proj_out over [attention (3072), mlp (12288)] -> 3072; one H200, FLUX 2048² at
world size 1: the concatenation was a 9.8 ms copy per step (benchmarks/results/session19). One more bf16
rounding of the partial sum: a difference of the order of bf16's epsilon.

`split_linear_over_cat` does the rewrite; schedule_transfers calls it too, with an anchor: under copy_engine the
part that needs no transfer is placed right after the transfer the other part waits on starts, so it runs
while that transfer moves. This pass runs after schedule_transfers and splits what is left, each new node placed
right before the linear it replaces (no transfer moves).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

LINEAR = {torch._C._nn.linear, F.linear}
CAT = {torch.cat, torch.concat, torch.ops.aten.cat.default}
MIN_WIDTH_RATIO = 2
"""Split only where the concatenation is at least this many times as wide as the output."""


def cat_linear_parts(lin: fx.Node):
    """(parts, their example values, weight, bias) of `linear(cat(parts, -1), W, b)` with a parameter W and a
    concatenation used only there; None for any other node."""
    if lin.op != "call_function" or lin.target not in LINEAR:
        return None
    x = lin.args[0]
    w = lin.args[1] if len(lin.args) > 1 else lin.kwargs.get("weight")
    b = lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias")
    if not (isinstance(x, fx.Node) and x.target in CAT and len(x.users) == 1
            and isinstance(w, fx.Node) and w.op in ("get_attr", "placeholder")):
        return None
    parts = x.args[0] if x.args else x.kwargs.get("tensors")
    dim = x.args[1] if len(x.args) > 1 else x.kwargs.get("dim", 0)
    vals = [p.meta.get("example_value") if isinstance(p, fx.Node) else None for p in parts]
    if len(parts) < 2 or not all(isinstance(v, torch.Tensor) for v in vals) or dim not in (-1, vals[0].dim() - 1):
        return None
    return list(parts), vals, w, b


def split_linear_over_cat(g: fx.Graph, lin: fx.Node, early: int | None = None,
                          anchor: fx.Node | None = None) -> fx.Node:
    """Replace `linear(cat(parts, -1), W, b)` by the sum of one linear per part (the bias goes to one of them).

    With `early` and `anchor`: part `early`'s linear (with the bias) is placed right after `anchor`, the rest
    right before the replaced linear. Returns the node of the sum."""
    parts, vals, w, b = cat_linear_parts(lin)
    widths = [int(v.shape[-1]) for v in vals]
    offsets = [sum(widths[:i]) for i in range(len(parts))]
    first = early if early is not None else 0
    terms = {}

    def emit(i, bias):
        ws = g.call_function(operator.getitem, (w, (slice(None), slice(offsets[i], offsets[i] + widths[i]))))
        terms[i] = g.call_function(torch._C._nn.linear, (parts[i], ws, bias))

    if anchor is not None:
        with g.inserting_after(anchor):
            emit(first, b)
    with g.inserting_before(lin):
        for i in range(len(parts)):
            if i not in terms:
                emit(i, b if i == first else None)
        order = [first] + [i for i in range(len(parts)) if i != first]
        total = terms[order[0]]
        for i in order[1:]:
            total = g.call_function(operator.add, (total, terms[i]))
    total.meta = dict(lin.meta)
    cat = lin.args[0]
    lin.replace_all_uses_with(total)
    g.erase_node(lin)
    g.erase_node(cat)
    return total


def split_cat_linears_pass(gm: fx.GraphModule, ctx) -> bool:
    g = gm.graph
    count = 0
    for lin in list(g.nodes):
        found = cat_linear_parts(lin)
        if found is None:
            continue
        _, vals, w, _ = found
        out_width = (w.meta.get("example_value") if w.op == "placeholder" else _attr(gm, w.target)).shape[0]
        if sum(int(v.shape[-1]) for v in vals) < MIN_WIDTH_RATIO * out_width:
            continue
        split_linear_over_cat(g, lin)
        count += 1
    if hasattr(ctx, "fuse_report"):
        ctx.fuse_report["split_cat_linears"] = count
    return count > 0


def _attr(gm: fx.GraphModule, target: str):
    obj = gm
    for name in target.split("."):
        obj = getattr(obj, name)
    return obj
