"""fuse_linears_pass: linears that read the same input become one GEMM over their joined weights.

    before:  q = linear(x, wq, bq) ; k = linear(x, wk, bk) ; v = linear(x, wv, bv)
    after:   y = xdit.sibling_linear(x, key)        (at q's place; key: wq|wk|wv and bq|bk|bv joined, see below)
             q = narrow(y, -1, 0, nq) ; k = narrow(y, -1, nq, nk) ; v = narrow(y, -1, nq + nk, nv)

Only groups of at most MAX_ROWS rows per rank: a per-shape rule, from the measurements below.

Why: under sequence parallelism a rank's GEMMs have few rows (FLUX 1024² ulysses 4: 1024 image, 128 text tokens),
and three narrow GEMMs fill the GPU worse than one wide one. One H200 (benchmarks/results/gemm_fusion.md): FLUX's
text q/k/v at 256 rows 47-56 -> 26-32 us, at 128 rows 45-66 -> 21-33; with 1024 rows or more the two are within
the run-to-run spread (+-10%). Whole steps on 2 x H200 with every group joined: FLUX 1024² ulysses 2 (2048 / 256 /
2304 rows) 70.9 -> 70.0 ms, FLUX 2048² ulysses 2 (8192 / 256 / 8448 rows) 357.6 -> 361.2 ms, hence MAX_ROWS.

Members: call_function linears of one input node, each weight a parameter (the real tensor at hand: get_attr, or
a placeholder with the example inputs), all of one dtype, device and in_features, all with a bias or all without,
no weight twice. A linear whose only user is a tanh-GELU is left out when compile.fuse_gelu is on (fuse_gelu makes
it one GEMM with a GELU epilogue, which saves more: FLUX's single-block proj_mlp). Nothing the members read may be
written in place in the graph (the fused GEMM runs at the first member's place).

Weights: joined right after the graph is lowered (runtime/fused_linear.py, join_pending), one group at a time, and
the model's parameters are rebound to views of the joined tensor (``param.data = joined[a:b]``), so no memory is
added and weights loaded in place afterwards are used. A later compile finds them joined and takes views. The
graph calls the op with a key; the tensors live in runtime/fused_linear.py, not in the graph (like fuse_modulation).

Runs after decompose_ulysses and before schedule_transfers (which then places the transfers around the fused
GEMM), on any lowering, also without parallelism. The narrow views keep the members' full-size example values.
"""
from __future__ import annotations

import contextlib

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..runtime import fused_linear
from .shard_modulation import _arg, _mutates, real_tensor

_LINEAR = {torch._C._nn.linear, F.linear}
MAX_ROWS = 2560
"""Only groups whose input has at most this many rows on this rank (after sequence sharding) are joined: below it
the joined GEMM was as fast or faster in every measurement, above it slower or within the noise (FLUX 2048²
ulysses 2, 8192 image rows per rank: 357.6 -> 361.2 ms/step with every group joined)."""
_GELU = {torch._C._nn.gelu, F.gelu}


def fuse_linears_pass(gm: fx.GraphModule, ctx) -> bool:
    g = gm.graph
    mutated = {n.args[0] for n in g.nodes if _mutates(n) and n.args and isinstance(n.args[0], fx.Node)}
    groups: dict[fx.Node, list[fx.Node]] = {}
    for n in g.nodes:
        if n.op == "call_function" and n.target in _LINEAR and isinstance(n.args[0], fx.Node) \
                and not _before_gelu(n, ctx) and n.args[0] not in mutated:
            groups.setdefault(n.args[0], []).append(n)
    fused = []
    for x, lins in groups.items():
        lins = _members(gm, lins, mutated, ctx)
        if len(lins) < 2 or _local_rows(x, ctx) > MAX_ROWS:
            continue
        ws = [real_tensor(gm, _arg(n, 1, "weight"), ctx) for n in lins]
        bs = [real_tensor(gm, _arg(n, 2, "bias"), ctx) for n in lins]
        key = fused_linear.hold_siblings(ws, None if bs[0] is None else bs)
        with g.inserting_before(lins[0]):
            y = g.call_function(torch.ops.xdit.sibling_linear.default, (x, key))
        vals = [n.meta.get("example_value") for n in lins]
        if all(isinstance(v, torch.Tensor) for v in vals):
            with getattr(vals[0], "fake_mode", None) or contextlib.nullcontext():
                y.meta["example_value"] = torch.cat(vals, -1)
        off = 0
        for n, w in zip(lins, ws):
            with g.inserting_before(lins[0] if n is lins[0] else n):
                piece = g.call_function(torch.narrow, (y, -1, off, w.shape[0]))
            piece.meta = dict(n.meta)
            n.replace_all_uses_with(piece)
            g.erase_node(n)
            off += w.shape[0]
        fused.append(len(lins))
    if hasattr(ctx, "fuse_report"):
        ctx.fuse_report["linears"] = fused
    return bool(fused)


def _local_rows(x: fx.Node, ctx) -> float:
    """Rows of x (all dims but the last) on this rank: token dims at their local size; inf where unknown."""
    v = x.meta.get("example_value")
    if not isinstance(v, torch.Tensor) or v.dim() < 1:
        return float("inf")
    sizes = list(v.shape[:-1])
    shard = getattr(ctx, "shard", None)
    dims = shard.an.dims.get(x) if shard is not None else None
    if isinstance(dims, list) and len(dims) == v.dim():
        sizes = [shard.local_size(c) if shard.sharded(c) else s for c, s in zip(dims, sizes)]
    rows = 1
    for s in sizes:
        if not isinstance(s, int):
            try:
                s = int(s)
            except (TypeError, ValueError):   # an unbacked symbolic size
                return float("inf")
        rows *= s
    return rows


def _before_gelu(n: fx.Node, ctx) -> bool:
    if not getattr(ctx, "fuse_gelu", False) or len(n.users) != 1:
        return False
    u = next(iter(n.users))
    return u.op == "call_function" and u.target in _GELU and _arg(u, 1, "approximate") == "tanh"


def _members(gm: fx.GraphModule, lins: list[fx.Node], mutated: set, ctx) -> list[fx.Node]:
    """The linears of one input that can be joined: those like the first one that qualifies."""
    out, seen, sig = [], set(), None
    for n in lins:
        wn, bn = _arg(n, 1, "weight"), _arg(n, 2, "bias")
        if len(n.args) + len(n.kwargs) > 3 or not isinstance(wn, fx.Node) or wn in seen or wn in mutated \
                or (bn is not None and (not isinstance(bn, fx.Node) or bn in mutated)):
            continue
        w, b = real_tensor(gm, wn, ctx), real_tensor(gm, bn, ctx)
        if w is None or w.dim() != 2 or (bn is not None and (b is None or b.shape != w.shape[:1])):
            continue
        s = (w.dtype, w.device, w.shape[1], bn is None, None if b is None else b.dtype)
        if sig is None:
            sig = s
        if s == sig:
            out.append(n)
            seen.add(wn)
    return out
