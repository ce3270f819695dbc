"""shard_modulation_pass: split the per-sample modulation linears over the sequence-parallel ranks.

Every DiT block computes its AdaLN modulation (shift / scale / gate) as ``linear(silu(temb))``: a matrix
times ONE row per sample, so the cost is reading the weight (FLUX.1: 77 such linears, 6.5 GB per step in
bf16). ``temb`` carries no token dim, so every sequence-parallel rank computes all of them redundantly. Here
rank r computes rows [r*c, (r+1)*c) of each weight (c = out_features / N, a row slice is a view, no copy),
the local outputs of a whole *group* go out in ONE all-gather, and each linear's full output is put back
together from the N pieces, in the original row order. Weight reads per rank drop by N.

Terms:
  candidate   a `linear(x, w, b)` with w (and b) a parameter (placeholder / get_attr), w 2-D, N | out_features,
              x of at most MAX_ROWS rows and *replicated*: the same on every sp rank.
  replicated  shard_sequence runs token dims on LOCAL slices; every rank-dependent value descends from a node
              it inserted: a `tokens.take` along a dim of a sequence (sp) unit, or a collective. So x is
              replicated when no such node is among its ancestors and the dim analysis gives neither x nor
              the linear's output a sequence dim. A `take` along the cfg batch only (temb with cfg split)
              differs between cfg ranks but not inside one sp group, which is all the gather spans.
  group       candidates reading the same input after peeling no-op casts (`x.to(x.dtype)`) and merging
              identical activations (Flux recomputes `silu(temb)` in every block). The merged input is
              moved up to right after its own inputs (pure op, nothing mutated), so the group's nodes sit
              where temb is made, never inside a later block (the cache pass's regions stay as they were).
              A group is sharded only when its weights reach MIN_GROUP_BYTES: one collective costs tens
              of microseconds, which a few MB of saved reads do not pay for.

    before:  s = silu(temb) ; e0 = linear(s, w0, b0)   ...   s9 = silu(temb) ; e9 = linear(s9, w9, b9)
    after:   s = silu(temb)
             l_i = linear(s, w_i[r*c_i:(r+1)*c_i], b_i[r*c_i:(r+1)*c_i])        for every linear i
             g = wait(all_gather_into_tensor(cat([l_0 .. l_9], -1), N, sp)).unflatten(0, [N, -1])
             e_i = g[..., off_i:off_i+c_i].movedim(0, -2).flatten(-2)  (at linear i's old place)

compile.fuse_modulation: the l_i become ONE ``xdit.fused_linear(s, key)`` over this rank's rows of every w_i
(and b_i) concatenated at compile time from the real parameters (runtime/fused_linear.py); its output is the
``cat`` above.

Legend: N sp ranks, r this rank's index in the sp group, c_i = out_features_i / N, off_i = c_0 + .. + c_{i-1}.
The gathered tensor holds the ranks along dim 0; no shape argument holds a local size, so the rewrite is right
for cfg-local batches and symbolic shapes. New nodes get fake `example_value`s (full-size meta invariant).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..runtime import fused_linear, tokens

MIN_GROUP_BYTES = 32 << 20
"""A group's weights must reach this many bytes (tests lower it for tiny models)."""
MAX_ROWS = 64
"""A candidate's input has at most this many rows (batch x cfg of one row each): a GEMV reading its weight."""

_LINEAR = {torch._C._nn.linear, F.linear}
_CSE_FN = {F.silu, torch._C._nn.silu, F.gelu, torch._C._nn.gelu, F.relu, torch.relu, F.mish, torch.sigmoid,
           torch.tanh}
aten, c10d = torch.ops.aten, torch.ops._c10d_functional


def shard_modulation_pass(gm: fx.GraphModule, ctx) -> bool:
    num = ctx.sp_size
    varies = _varies_over_sp(gm, ctx.shard)
    mutated = {n.args[0] for n in gm.graph.nodes if _mutates(n) and n.args and isinstance(n.args[0], fx.Node)}
    groups: dict[object, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if _candidate(n, num, varies, mutated, ctx.shard):
            groups.setdefault(_key(_peel(n.args[0])), []).append(n)
    changed = False
    for lins in groups.values():
        weight_bytes = sum(_nbytes(_arg(lin, 1, "weight")) for lin in lins)
        if weight_bytes < MIN_GROUP_BYTES:
            continue
        rec = {"input": _peel(lins[0].args[0]).name, "linears": len(lins), "ranks": num,
               "weight_bytes": weight_bytes}
        fused = _fused_weights(gm, lins, num, ctx) if getattr(ctx, "fuse_modulation", False) else None
        rec["gather_bytes"] = _rewrite(gm.graph, lins, num, ctx.sp_rank, ctx.group_name("sp"), fused)
        if fused is not None:
            rec["fused"] = True
        ctx.modulation_report.append(rec)
        changed = True
    return changed


def _rewrite(g: fx.Graph, lins: list[fx.Node], num: int, rank: int, group: str, fused=None) -> int:
    """Shard one group; returns the bytes this rank sends ((N - 1) x its local piece, as a ring all-gather).
    fused: the key of the group's concatenated local rows (compile.fuse_modulation): one xdit.fused_linear
    instead of one linear per member."""
    x = _peel(lins[0].args[0])
    if _cse_able(x) and x.all_input_nodes:   # the one copy all linears read: right after its inputs, in no block
        x.meta.pop("nn_module_stack", None)
        order = {n: i for i, n in enumerate(g.nodes)}
        max(x.all_input_nodes, key=order.__getitem__).append(x)
    order = {n: i for i, n in enumerate(g.nodes)}
    params = [a for lin in lins for a in (_arg(lin, 1, "weight"), _arg(lin, 2, "bias")) if a is not None]
    anchor = max([x, *params], key=order.__getitem__)
    sizes = [_arg(lin, 1, "weight").meta["example_value"].shape[0] // num for lin in lins]
    with g.inserting_before(anchor.next):
        if fused is None:
            local = []
            for lin, c in zip(lins, sizes):
                w, b = _arg(lin, 1, "weight"), _arg(lin, 2, "bias")
                w = _call(g, aten.slice.Tensor, w, 0, rank * c, (rank + 1) * c)
                b = b if b is None else _call(g, aten.slice.Tensor, b, 0, rank * c, (rank + 1) * c)
                local.append(_call(g, lin.target, x, w, b))
            cat = _call(g, aten.cat.default, local, -1)                              # (..., sum c_i)
        else:
            cat = _call(g, torch.ops.xdit.fused_linear.default, x, fused)             # the same, one GEMV
        gathered = _call(g, c10d.all_gather_into_tensor.default, cat, num, group)     # (N * first dim, ...)
        gathered = _call(g, aten.unflatten.int, _call(g, c10d.wait_tensor.default, gathered), 0, [num, -1])
    off = 0
    for lin, c in zip(lins, sizes):
        with g.inserting_before(lin):
            piece = _call(g, aten.slice.Tensor, gathered, -1, off, off + c)          # (N, ..., c_i)
            piece = _call(g, aten.flatten.using_ints, _call(g, aten.movedim.int, piece, 0, -2), -2, -1)
        piece.meta = dict(lin.meta)
        off += c
        old_x = lin.args[0]
        lin.replace_all_uses_with(piece)
        g.erase_node(lin)
        while isinstance(old_x, fx.Node) and old_x is not x and not old_x.users \
                and (_cse_able(old_x) or old_x is not _peel(old_x)):
            nxt = old_x.args[0]                   # its own silu / no-op cast, now unused
            g.erase_node(old_x)
            old_x = nxt
    v = cat.meta.get("example_value")
    return int(v.numel() * v.element_size() * (num - 1)) if isinstance(v, torch.Tensor) else 0


def real_tensor(gm: fx.GraphModule, node, ctx):
    """The real tensor behind a parameter node (get_attr, or a placeholder with ctx.example_inputs), or None where
    it is not at hand (fake or meta: an abstract trace)."""
    if node is None:
        return None
    if node.op == "get_attr":
        t = gm
        for part in node.target.split("."):
            t = getattr(t, part, None)
    elif node.op == "placeholder":
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        inputs = list(getattr(ctx, "example_inputs", None) or ())
        t = inputs[placeholders.index(node)] if len(inputs) == len(placeholders) else None
    else:
        t = None
    fake = isinstance(t, torch._subclasses.FakeTensor)
    return t if isinstance(t, torch.Tensor) and not fake and t.device.type != "meta" else None


def _fused_weights(gm: fx.GraphModule, lins: list[fx.Node], num: int, ctx):
    """compile.fuse_modulation: the key of this rank's rows of every member's weight and bias, concatenated once
    (runtime/fused_linear.py), or None where the real tensors are not at hand (then one linear per member)."""
    def real(node):
        return real_tensor(gm, node, ctx)

    ws, bs, rows = [], [], []
    for lin in lins:
        w, bnode = real(_arg(lin, 1, "weight")), _arg(lin, 2, "bias")
        b = real(bnode)
        if w is None or (bnode is not None and b is None):
            return None
        c = w.shape[0] // num
        ws.append(w)
        bs.append(b)
        rows.append((ctx.sp_rank * c, (ctx.sp_rank + 1) * c))
    if len({(w.dtype, w.device) for w in ws}) != 1:
        return None
    return fused_linear.hold(ws, bs, rows)


def _candidate(n: fx.Node, num: int, varies: set, mutated: set, shard) -> bool:
    if n.op != "call_function" or n.target not in _LINEAR:
        return False
    x, w, b = n.args[0], _arg(n, 1, "weight"), _arg(n, 2, "bias")
    if not isinstance(x, fx.Node) or x in varies or _has_sp_dim(shard, x) or _has_sp_dim(shard, n):
        return False
    v = x.meta.get("example_value")
    if not isinstance(v, torch.Tensor) or v.dim() == 0 or v.numel() > MAX_ROWS * v.shape[-1]:
        return False
    if not _is_param(w, 2) or w.meta["example_value"].shape[0] % num or (b is not None and not _is_param(b, 1)):
        return False
    # computed at the group's place instead of its own: nothing it reads may be written in between
    chain = [x, _peel(x), *_peel(x).all_input_nodes] if _cse_able(_peel(x)) else [x, _peel(x)]
    return not any(a in mutated for a in (*chain, w, b))


def _is_param(p, ndim: int) -> bool:
    v = p.meta.get("example_value") if isinstance(p, fx.Node) else None
    return p.op in ("placeholder", "get_attr") and isinstance(v, torch.Tensor) and v.dim() == ndim


def _varies_over_sp(gm: fx.GraphModule, shard) -> set[fx.Node]:
    """Nodes whose value may differ between the ranks of one sp group (see the module doc)."""
    out: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "call_function" and _differs(n, shard) or any(a in out for a in n.all_input_nodes):
            out.add(n)
    return out


def _differs(n: fx.Node, shard) -> bool:
    if n.target is tokens.take:
        dims = shard.an.dims.get(n) if shard is not None else None
        return not isinstance(dims, list) or "sp" in shard.axes_of(dims[n.args[1]])
    return n.target is tokens.gather or getattr(n.target, "namespace", None) in ("xdit", "_c10d_functional")


def _has_sp_dim(shard, n: fx.Node) -> bool:
    dims = shard.an.dims.get(n) if shard is not None else None
    return isinstance(dims, list) and any(shard.sharded(c) and "sp" in shard.axes_of(c) for c in dims)


def _peel(x: fx.Node) -> fx.Node:
    """x without no-op casts: ``y.to(torch.float32)`` of a float32 y is y itself (eager returns y)."""
    while x.op == "call_method" and x.target == "to" and set(x.kwargs) <= {"dtype"} \
            and isinstance(x.args[0], fx.Node) \
            and all(isinstance(a, (torch.dtype, torch.device)) for a in (*x.args[1:], *x.kwargs.values())):
        a, b = x.args[0].meta.get("example_value"), x.meta.get("example_value")
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and (a.dtype, a.device) == (b.dtype, b.device)):
            break
        x = x.args[0]
    return x


def _cse_able(x: fx.Node) -> bool:
    return x.op == "call_function" and x.target in _CSE_FN and not x.kwargs.get("inplace", False)


def _key(x: fx.Node):
    """Identical activations of the same node are one value."""
    key = (x.target, tuple(x.args), tuple(sorted(x.kwargs.items()))) if _cse_able(x) else x
    try:
        hash(key)
    except TypeError:      # a list among the arguments: no merging
        return x
    return key


def _mutates(n: fx.Node) -> bool:
    if n.target is operator.setitem or n.kwargs.get("inplace", False) is True:
        return True
    if n.op == "call_method":
        return n.target.endswith("_") and not n.target.endswith("__")
    schema = getattr(n.target, "_schema", None)
    return bool(schema is not None and schema.is_mutable)


def _nbytes(n: fx.Node) -> int:
    v = n.meta.get("example_value")
    return int(v.numel() * v.element_size()) if isinstance(v, torch.Tensor) else 0


def _arg(n: fx.Node, i: int, name: str):
    return n.args[i] if len(n.args) > i else n.kwargs.get(name)


def _call(g: fx.Graph, target, *args) -> fx.Node:
    """A new node with a fake example_value computed from its inputs' (full-size, see the README)."""
    node = g.call_function(target, args)
    vals = fx.node.map_arg(args, lambda a: a.meta.get("example_value"))
    mode = _fake_mode(vals)
    if mode is not None:
        with mode:
            node.meta["example_value"] = target(*vals)
    return node


def _fake_mode(vals):
    """The fake mode of the inputs' example values (not the tracing context's, which may be another)."""
    modes = []
    fx.node.map_aggregate(vals, lambda v: modes.append(getattr(v, "fake_mode", None)))
    return next((m for m in modes if m is not None), None)
