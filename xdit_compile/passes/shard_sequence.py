"""shard_sequence_pass: run the token dims of the graph on this rank's part of the sequence.

Terms (see token_dims.py): a *unit* is a dim class chosen to be split over the sequence-parallel ranks; a
value is LOCAL when every dim whose class contains a unit holds only this rank's positions, FULL otherwise.

The pass walks the graph once. Each op either runs LOCAL (its inputs are made LOCAL by slicing, which costs
no communication, and literal shapes in its arguments are rewritten to local sizes), or it needs the whole
token dim (a *sink*: unflatten of the sequence into h x w, a reduction or conv over tokens, an op with no
rule), and then its LOCAL inputs are gathered first. Partial sums over tokens (sum, matmul contracting the
token dim) run LOCAL followed by an all-reduce. Graph outputs are gathered, so every rank returns the full
result.

    before:  x = linear(hidden_states)       ; y = x.reshape(1, 4096, 24, 128) ; out = unpatchify(y)
    after:   h = take(hidden_states, 1, mine) ; x = linear(h) ; y = x.reshape(1, 2048, 24, 128)
             out = unpatchify(gather(y, 1))

Attention nodes whose q and k sequence dims are both sharded are tagged (node.meta["xdit_attention"]) for
rewrite_attention_pass; cross-attention with full keys runs LOCAL as is.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..runtime import tokens
from . import token_dims as td
from .token_dims import arg, is_fn, is_method


@dataclass(frozen=True)
class Axis:
    """A mesh axis the token/batch units are split over (as the sharding pass sees it)."""
    rank: int
    size: int
    group: str


@dataclass
class ShardContext:
    an: td.Analysis
    unit_axis: dict[int, str]                    # unit -> "sp" (sequence) | "cfg" (batch)
    layout: dict[int, list[tuple[int, int]]]     # unit -> per rank of its axis: (start, length)
    axes: dict[str, Axis]                        # "sp", "cfg" and the combined "cfg+sp" (cfg-major)
    events: list[dict] = field(default_factory=list)
    whole_outputs: bool = True                   # False (pipefusion patches): outputs stay LOCAL, no gathers
    local_outputs: list[bool] = field(default_factory=list)   # per graph output: LOCAL (after the pass)
    _pos: dict = field(default_factory=dict)
    units: frozenset = frozenset()

    def __post_init__(self):
        self.units = frozenset(self.unit_axis)
        self._sharded: dict[int, bool] = {}

    def positions(self, c: int, ranks: dict[str, int] | None = None) -> tuple[int, ...]:
        r = {name: ax.rank for name, ax in self.axes.items()}
        r.update(ranks or {})
        key = (self.an.classes.find(c), r.get("sp"), r.get("cfg"))
        if key not in self._pos:
            self._pos[key] = tuple(self.an.classes.positions(
                c, self.units, lambda u: self.layout[u][r[self.unit_axis[u]]]))
        return self._pos[key]

    def sharded(self, c: int) -> bool:
        c = self.an.classes.find(c)
        if c not in self._sharded:
            self._sharded[c] = self.an.classes.contains(c, self.units)
        return self._sharded[c]

    def local_size(self, c: int) -> int:
        return len(self.positions(c))

    def axes_of(self, c: int) -> tuple[str, ...]:
        cl = self.an.classes
        return tuple(sorted({a for u, a in self.unit_axis.items() if cl.contains(c, frozenset([u]))}))

    def group_of(self, axes: tuple[str, ...]):
        """(Axis, rank index -> {axis: rank}) for a collective over exactly these axes."""
        if len(axes) == 1:
            a = axes[0]
            return self.axes[a], lambda r: {a: r}
        sp = self.axes["sp"].size
        return self.axes["cfg+sp"], lambda r: {"cfg": r // sp, "sp": r % sp}


def even_layout(length: int, parts: int) -> list[tuple[int, int]]:
    base, extra = divmod(length, parts)
    out, start = [], 0
    for r in range(parts):
        n = base + (1 if r < extra else 0)
        out.append((start, n))
        start += n
    return out


def _dims(ctx, n):
    d = ctx.an.dims.get(n)
    return d if isinstance(d, list) else None


def _sharded_dims(ctx, n) -> list[int]:
    d = _dims(ctx, n)
    return [i for i, c in enumerate(d) if ctx.sharded(c)] if d is not None else []


def _token_dims(ctx, n) -> int:
    """How many dims of n hold sequence (sp) shards (a (L, L) mask has two)."""
    d = _dims(ctx, n)
    return sum(1 for c in d if ctx.sharded(c) and "sp" in ctx.axes_of(c)) if d is not None else 0


def _local_shape(ctx, n) -> list[int]:
    return [ctx.local_size(c) for c in _dims(ctx, n)]


def _nbytes(n, dims_idx=None) -> int:
    v = n.meta.get("example_value")
    return int(v.numel() * v.element_size()) if isinstance(v, torch.Tensor) else 0


class _Rewriter:
    def __init__(self, gm: fx.GraphModule, ctx: ShardContext):
        self.gm, self.g, self.ctx = gm, gm.graph, ctx
        self.mode: dict[fx.Node, str] = {}     # "L" local | "F" full
        self.local_of: dict[fx.Node, fx.Node] = {}
        self.full_of: dict[fx.Node, fx.Node] = {}
        self.modified = False

    # -- conversions ------------------------------------------------------------------------------
    def as_local(self, x: fx.Node, before: fx.Node) -> fx.Node:
        if not isinstance(x, fx.Node) or self.mode.get(x, "F") == "L" or not _sharded_dims(self.ctx, x):
            return x
        if x in self.local_of:
            return self.local_of[x]
        with self.g.inserting_before(before):
            cur = x
            for i in _sharded_dims(self.ctx, x):
                idx = self.ctx.positions(_dims(self.ctx, x)[i])
                cur = self.g.call_function(tokens.take, (cur, i, idx))
                cur.meta = dict(x.meta)
        self.ctx.an.dims[cur] = self.ctx.an.dims[x]
        self.ctx.events.append({"kind": "shard", "node": x.name, "dims": _sharded_dims(self.ctx, x), "bytes": 0})
        self.local_of[x] = cur
        self.mode[cur] = "L"
        self.modified = True
        return cur

    def as_full(self, x: fx.Node, before: fx.Node) -> fx.Node:
        if not isinstance(x, fx.Node) or self.mode.get(x, "F") == "F" or not _sharded_dims(self.ctx, x):
            return x
        if x in self.full_of:
            return self.full_of[x]
        ctx = self.ctx
        if not ctx.whole_outputs:
            raise ValueError(f"{before.name} ({_opname(before)}) needs the whole token dim of {x.name}, which a "
                             "pipefusion patch does not hold; pipefusion supports models whose blocks and "
                             "embeddings work token by token (attention aside)")
        cur = x
        with self.g.inserting_before(before):
            sent = 0
            for i in _sharded_dims(ctx, x):
                c = _dims(ctx, x)[i]
                ax, ranks_of = ctx.group_of(ctx.axes_of(c))
                per_rank = [ctx.positions(c, ranks_of(r)) for r in range(ax.size)]
                sizes = [len(p) for p in per_rank]
                flat = [p for rp in per_rank for p in rp]
                first = {}
                for q, p in enumerate(flat):
                    first.setdefault(p, q)
                perm = tuple(first[p] for p in range(ctx.an.classes.size[ctx.an.classes.find(c)]))
                perm = None if perm == tuple(range(len(flat))) else perm
                cur = self.g.call_function(tokens.gather, (cur, i, ax.group, sizes, perm))
                v = x.meta.get("example_value")
                if isinstance(v, torch.Tensor):
                    sent += v.numel() * v.element_size() * sizes[ax.rank] // max(1, v.shape[i])
            cur.meta = dict(x.meta)
        ctx.an.dims[cur] = ctx.an.dims[x]
        ctx.events.append({"kind": "gather", "node": x.name, "before": before.name, "bytes": int(sent)})
        self.full_of[x] = cur
        self.mode[cur] = "F"
        self.modified = True
        return cur

    def map_args(self, n: fx.Node, conv) -> None:
        n.args = fx.node.map_arg(n.args, lambda a: conv(a, n))
        n.kwargs = fx.node.map_arg(n.kwargs, lambda a: conv(a, n))

    # -- the walk ---------------------------------------------------------------------------------
    def run(self):
        self.force_full = {n.args[0] for n in self.g.nodes if _mutates(n) and not self._local_write_ok(n)}
        for n in list(self.g.nodes):              # nodes inserted on the way are not in this list
            if n.op in ("placeholder", "get_attr"):
                self.mode[n] = "F"
            elif n.op == "output" and not self.ctx.whole_outputs:
                outs = n.args[0] if isinstance(n.args[0], (tuple, list)) else (n.args[0],)
                self.ctx.local_outputs = [self.mode.get(a, "F") == "L" and bool(_sharded_dims(self.ctx, a))
                                          if isinstance(a, fx.Node) else False for a in outs]
            elif n.op == "output":
                self.map_args(n, self.as_full)
            else:
                self.visit(n)

    def visit(self, n: fx.Node):
        ctx = self.ctx
        ins = [a for a in n.all_input_nodes]
        touches = any(_sharded_dims(ctx, a) for a in ins) or bool(_sharded_dims(ctx, n)) \
            or isinstance(ctx.an.dims.get(n), tuple)
        if n.target is operator.getitem and isinstance(ctx.an.dims.get(n.args[0]), tuple):
            self.mode[n] = self.mode.get(n.args[0], "F")
            return
        if not touches:
            self.mode[n] = "L"
            return
        if _mutates(n):
            return self.visit_mutation(n)
        multi = _token_dims(ctx, n) > 1 or any(_token_dims(ctx, a) > 1 for a in ins)
        if n in self.force_full or (multi and not is_fn(n, td.SDPA)):
            # A value with two token dims (a (L, L) mask) is kept whole: a LOCAL copy would hold only the
            # diagonal block, which no gather can complete.
            how = "full"
        else:
            how = self.decide(n)
        if how == "sink":
            self.map_args(n, self.as_full)
            self.mode[n] = "F"
            if _sharded_dims(ctx, n) or any(_sharded_dims(ctx, a) for a in ins):
                ctx.events.append({"kind": "sink", "node": n.name, "op": _opname(n),
                                   "why": ctx.an.unknown.get(n, "needs the whole token dim")})
            return
        if how == "full":
            self.map_args(n, self.as_full)
            self.mode[n] = "F"
            return
        if how == "sequence_attention":
            return self.visit_sequence_attention(n)
        if not self._inherits_sharding(n, how):
            # The op creates a sharded-class dim itself (a slice of a table, a repeat): run it at full
            # size; its consumers take their part.
            self.map_args(n, self.as_full)
            self.mode[n] = "F"
            return
        self.map_args(n, self.as_local)
        self.mode[n] = "L"
        if callable(how):
            how(n)

    def visit_sequence_attention(self, n: fx.Node):
        """q, k, v LOCAL; the mask keeps its key dim whole (the kernels gather keys, not mask blocks) and
        takes this rank's rows of its query dim."""
        ctx = self.ctx
        mask = arg(n, 3, "attn_mask")
        self.map_args(n, lambda a, user: a if a is mask else self.as_local(a, user))
        if isinstance(mask, fx.Node):
            md = _dims(ctx, mask)
            sd = _sharded_dims(ctx, mask)
            q_sharded = len(md) - 2 in sd and td._shape(mask)[-2] > 1
            if len(md) - 1 in sd and q_sharded:
                # keys in the kernels' rank-major order, rows of this rank's queries
                rank_major = tuple(p for r in range(ctx.axes["sp"].size) for p in ctx.positions(md[-1], {"sp": r}))
                with self.g.inserting_before(n):
                    new = self.g.call_function(tokens.take, (self.as_full(mask, n), len(md) - 1, rank_major))
                    new = self.g.call_function(tokens.take, (new, len(md) - 2, ctx.positions(md[-2])))
                new.meta = dict(mask.meta)
            else:
                new = self.as_local(mask, n)
            if "attn_mask" in n.kwargs:
                n.kwargs = {**n.kwargs, "attn_mask": new}
            else:
                n.args = n.args[:3] + (new,) + n.args[4:]
        self.mode[n] = "L"

    def _inherits_sharding(self, n: fx.Node, how) -> bool:
        """Every sharded dim of n's output comes from a sharded dim of an input (so LOCAL inputs give a
        LOCAL output)."""
        ctx, cl = self.ctx, self.ctx.an.classes
        if getattr(how, "__name__", "") == "rewrite_expand":
            return True
        outs = ctx.an.dims.get(n)
        outs = [outs] if isinstance(outs, list) else [o for o in (outs or ()) if isinstance(o, list)]
        in_roots = set()
        for a in n.all_input_nodes:
            for c in _dims(ctx, a) or ():
                in_roots.add(cl.find(c))

        def inherited(c):
            c = cl.find(c)
            if c in in_roots or not ctx.sharded(c):
                return True
            if any(_descends(cl, r, c) for r in in_roots):
                return True
            return c not in ctx.units and cl.kind[c] != "atom" and all(inherited(p) for p in cl.parts[c])
        return all(inherited(c) for o in outs for c in o)

    def _local_write_ok(self, n: fx.Node) -> bool:
        """Can this in-place write run on the LOCAL part of its target?"""
        ctx, target = self.ctx, n.args[0]
        if not isinstance(target, fx.Node) or not _sharded_dims(ctx, target):
            return True
        if n.target is not operator.setitem:
            return True
        xs = td._shape(target)
        exp = _expand_index(n.args[1], len(xs))
        d = 0
        for i in exp:
            if i is None:
                continue
            if d in _sharded_dims(ctx, target) and \
                    (not isinstance(i, slice) or i.indices(xs[d]) != (0, xs[d], 1)):
                return False
            d += 1
        return True

    def visit_mutation(self, n: fx.Node):
        """In-place ops write into their first argument: never convert it (a converted copy would take the
        write); the other arguments follow its mode."""
        ctx = self.ctx
        target = n.args[0]
        mode = self.mode.get(target, "F")
        if mode == "L" and not self._local_write_ok(n):
            raise ValueError(f"in-place write {n.name} indexes the sharded token dim of {target.name}; "
                             "this pattern is not supported by sequence parallelism")
        conv = self.as_local if mode == "L" else self.as_full
        n.args = (target,) + tuple(fx.node.map_arg(a, lambda x: conv(x, n)) for a in n.args[1:])
        n.kwargs = fx.node.map_arg(n.kwargs, lambda x: conv(x, n))
        self.mode[n] = mode

    # Decide how a node runs: "local", "sink", "full" or a callable that rewrites it after localising.
    def decide(self, n: fx.Node):
        ctx, an = self.ctx, self.ctx.an
        if n in an.unknown:
            return "sink"
        if is_fn(n, td.CREATE_FN) or is_method(n, td.LIKE_METHOD):
            return "full"
        if n.target is operator.getitem:
            return self.decide_index(n)
        if is_fn(n, td.SDPA):
            return self.decide_sdpa(n)
        if is_fn(n, td.POINTWISE_FN) or is_method(n, td.POINTWISE_METHOD) or is_fn(n, {torch.nn.functional.linear}) \
                or is_fn(n, td.LIKE_FN) or is_fn(n, {torch.view_as_complex, torch.view_as_real}) \
                or is_fn(n, {torch.cat, torch.concat, torch.stack, torch.outer}) \
                or is_method(n, {"unsqueeze"}) or is_fn(n, {torch.unsqueeze}) or is_method(n, td.PERMUTE) \
                or is_fn(n, {torch.permute, torch.transpose, torch.swapaxes, torch.movedim}):
            return "local"
        if is_fn(n, td.NORM_FN):
            x, shape = n.args[0], arg(n, 1, "normalized_shape")
            k = len(shape) if isinstance(shape, (list, tuple)) else 1
            return "sink" if any(i >= len(_dims(ctx, x)) - k for i in _sharded_dims(ctx, x)) else "local"
        if is_fn(n, {torch.nn.functional.group_norm}):
            return "sink" if any(i >= 1 for i in _sharded_dims(ctx, n.args[0])) else "local"
        if is_fn(n, td.DIMWISE_FN) or is_method(n, td.DIMWISE_METHOD):
            dim = arg(n, 1, "dim")
            x = n.args[0]
            if dim is None or any(td._norm_dim(d, len(_dims(ctx, x))) in _sharded_dims(ctx, x)
                                  for d in (dim if isinstance(dim, (list, tuple)) else [dim])):
                return "sink"
            return "local"
        if is_fn(n, td.REDUCE_FN) or is_method(n, td.REDUCE_METHOD):
            return self.decide_reduce(n)
        if is_fn(n, td.MATMUL_FN) or is_method(n, {"matmul", "bmm"}):
            a = n.args[1] if n.target is torch.baddbmm else n.args[0]
            if (len(_dims(ctx, a)) - 1) in _sharded_dims(ctx, a):
                if _sharded_dims(ctx, n) or n.target is torch.baddbmm:
                    return "sink"
                return self.all_reduce_after
            return "local"
        if is_method(n, td.VIEW_METHOD) or is_fn(n, td.VIEW_FN) or is_method(n, {"squeeze"}) \
                or is_fn(n, {torch.squeeze}):
            return self.decide_view(n)
        if is_method(n, {"expand", "expand_as", "repeat"}) or is_fn(n, {torch.broadcast_to}):
            return self.decide_expand(n)
        if is_method(n, td.SPLIT_METHOD) or is_fn(n, td.SPLIT_FN):
            return self.decide_split(n)
        if is_fn(n, td.PAD_FN):
            x = n.args[0]
            return "sink" if any(ctx.an.classes.find(_dims(ctx, x)[i]) != ctx.an.classes.find(_dims(ctx, n)[i])
                                 for i in _sharded_dims(ctx, x)) else "local"
        if is_method(n, {"repeat_interleave"}) or is_fn(n, {torch.repeat_interleave}):
            dim = td._norm_dim(arg(n, 2, "dim"), len(_dims(ctx, n.args[0])))
            return "sink" if dim in _sharded_dims(ctx, n.args[0]) else "local"
        return "sink"

    def set_shape_args(self, n, keep: int = 1):
        shape = tuple(_local_shape(self.ctx, n))
        n.target = "reshape" if n.op == "call_method" and n.target in ("view", "reshape", "unflatten",
                                                                       "view_as", "reshape_as", "flatten",
                                                                       "squeeze") else n.target
        if n.op == "call_method":
            n.args = (n.args[0], *shape)
        else:
            n.target, n.args = torch.reshape, (n.args[0], shape)
        n.kwargs = {}

    def decide_view(self, n):
        ctx, cl = self.ctx, self.ctx.an.classes
        x = n.args[0]
        units = ctx.units
        lin = [c for c, s in zip(_dims(ctx, x), td._shape(x)) if s != 1]
        lout = [c for c, s in zip(_dims(ctx, n), td._shape(n)) if s != 1]
        fi = [cl.find(l) for c in lin for l in cl.leaves(c, units)]
        fo = [cl.find(l) for c in lout for l in cl.leaves(c, units)]
        if fi != fo:
            return "sink"
        return self.set_shape_args

    def decide_expand(self, n):
        ctx = self.ctx
        if n.op == "call_method" and n.target == "repeat":
            reps = n.args[1:] if not isinstance(n.args[1], (list, tuple)) else n.args[1]
            off = len(reps) - len(_dims(ctx, n.args[0]))
            if any(reps[i + off] != 1 for i in _sharded_dims(ctx, n.args[0])):
                return "sink"
            if any(reps[i] != 1 for i in _sharded_dims(ctx, n)):
                return "full"
            return "local"

        def rewrite_expand(n):
            shape = tuple(_local_shape(ctx, n))
            if n.op == "call_method":
                n.target, n.args, n.kwargs = "expand", (n.args[0], *shape), {}
            else:
                n.args, n.kwargs = (n.args[0], shape), {}
        return rewrite_expand

    def decide_reduce(self, n):
        ctx = self.ctx
        x = n.args[0]
        dim = arg(n, 1, "dim")
        sd = _sharded_dims(ctx, x)
        if dim is None:
            return "sink" if sd else "local"
        dims = {td._norm_dim(d, len(_dims(ctx, x))) for d in (dim if isinstance(dim, (list, tuple)) else [dim])}
        if not dims & set(sd):
            return "local"
        name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "")
        if name in ("sum", "mean") and not _sharded_dims(ctx, n):
            return self.all_reduce_after
        return "sink"

    def all_reduce_after(self, n: fx.Node):
        """n computes a partial sum over the local tokens: all-reduce it (mean: rescale first)."""
        ctx = self.ctx
        name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "")
        x = n.args[1] if n.target is torch.baddbmm else n.args[0]
        red = [c for i, c in enumerate(_dims(ctx, x)) if ctx.sharded(c) and not any(
            ctx.an.classes.find(c) == ctx.an.classes.find(o) for o in _dims(ctx, n))]
        group = ctx.group_of(tuple(sorted({a for c in red for a in ctx.axes_of(c)})))[0].group
        with self.g.inserting_after(n):
            scale = None
            if name == "mean":
                x = n.args[0]
                dims = arg(n, 1, "dim")
                dims = dims if isinstance(dims, (list, tuple)) else [dims]
                full = loc = 1
                for d in dims:
                    c = _dims(ctx, x)[td._norm_dim(d, len(_dims(ctx, x)))]
                    full *= ctx.an.classes.size[ctx.an.classes.find(c)]
                    loc *= ctx.local_size(c)
                scale = n.graph.call_function(operator.mul, (n, loc / full))
                scale.meta = dict(n.meta)
            src = scale if scale is not None else n
            with self.g.inserting_after(src):
                ar = self.g.call_function(torch.ops.xdit.all_reduce_sum, (src, group))
            ar.meta = dict(n.meta)
        ctx.an.dims[ar] = ctx.an.dims[n]
        if scale is not None:
            ctx.an.dims[scale] = ctx.an.dims[n]
        n.replace_all_uses_with(ar, delete_user_cb=lambda u: u is not ar and u is not scale)
        self.mode[ar] = "L"
        if scale is not None:
            self.mode[scale] = "L"
        v = n.meta.get("example_value")
        ctx.events.append({"kind": "all_reduce", "node": n.name, "bytes": _nbytes(n) * 2})
        self.full_of[ar] = ar

    def decide_split(self, n):
        ctx, cl = self.ctx, self.ctx.an.classes
        x = n.args[0]
        name = n.target if n.op == "call_method" else n.target.__name__
        nd = len(_dims(ctx, x))
        dim = td._norm_dim(arg(n, 1 if name == "unbind" else 2, "dim", 0), nd)
        if dim not in _sharded_dims(ctx, x):
            return "local"
        if name == "unbind":
            return "sink"
        outs = ctx.an.dims[n]
        src = cl.find(_dims(ctx, x)[dim])
        parts = cl.parts[src] if cl.kind[src] == "cat" else ()
        if not parts or [cl.find(o[dim]) for o in outs] != [cl.find(p) for p in parts]:
            return "sink"

        def rewrite(n):
            sizes = [ctx.local_size(o[dim]) for o in outs]
            n.op, n.target, n.args, n.kwargs = "call_method", "split_with_sizes", (n.args[0], sizes), {"dim": dim}
        return rewrite

    def decide_index(self, n):
        ctx, cl = self.ctx, self.ctx.an.classes
        x = n.args[0]
        sd = set(_sharded_dims(ctx, x))
        if not sd:
            return "local"
        xs = td._shape(x)
        exp = _expand_index(n.args[1], len(xs))
        new, d, od = [], 0, 0
        out_dims = _dims(ctx, n)
        for i in exp:
            if i is None:
                new.append(None)
                od += 1
                continue
            if isinstance(i, int):
                if d in sd:
                    return "sink"
                new.append(i)
                d += 1
                continue
            if d in sd:
                start, stop, step = i.indices(xs[d])
                if (start, stop, step) != (0, xs[d], 1):
                    # aligned cat parts: local bounds = local positions of the picked parts
                    src = cl.find(_dims(ctx, x)[d])
                    if step != 1 or cl.kind[src] != "cat":
                        return "sink"
                    full_pos = ctx.positions(src)
                    want = set(range(start, stop))
                    loc = [k for k, p in enumerate(full_pos) if p in want]
                    if len(loc) != ctx.local_size(out_dims[od]) or \
                            (loc and loc != list(range(loc[0], loc[0] + len(loc)))):
                        return "sink"
                    i = slice(loc[0], loc[0] + len(loc)) if loc else slice(0, 0)
            new.append(i)
            d += 1
            od += 1
        new_idx = tuple(new)

        def rewrite(n):
            n.args = (n.args[0], new_idx if len(new_idx) != 1 else new_idx[0])
        return rewrite

    def decide_sdpa(self, n):
        ctx = self.ctx
        q, k = arg(n, 0, "query"), arg(n, 1, "key")
        qs, ks = _dims(ctx, q), _dims(ctx, k)
        q_sh, k_sh = ctx.sharded(qs[-2]), ctx.sharded(ks[-2])
        if k_sh and q_sh:
            if ctx.axes_of(qs[-2]) != ("sp",) or ctx.axes_of(ks[-2]) != ("sp",):
                return "sink"
            n_sp = ctx.axes["sp"].size
            sizes = [len(ctx.positions(qs[-2], {"sp": r})) for r in range(n_sp)]
            ksizes = [len(ctx.positions(ks[-2], {"sp": r})) for r in range(n_sp)]
            same = ctx.an.classes.find(qs[-2]) == ctx.an.classes.find(ks[-2])
            if sizes != ksizes or not same:
                return "sink"
            if any("sp" in ctx.axes_of(qs[i]) for i in range(len(qs) - 2)):
                return "sink"
            n.meta["xdit_attention"] = {"kind": "sequence", "seq_sizes": sizes}
            return "sequence_attention"
        if k_sh:
            return "sink"
        n.meta["xdit_attention"] = {"kind": "local"}
        return "local"


def _expand_index(idx, ndim: int) -> list:
    """An indexing tuple with its Ellipsis spelled out as full slices."""
    idx = idx if isinstance(idx, tuple) else (idx,)
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    out = []
    for i in idx:
        out.extend([slice(None)] * (ndim - n_real) if i is Ellipsis else [i])
    return out


def _descends(cl, root: int, c: int) -> bool:
    root = cl.find(root)
    return any(cl.find(p) == c or _descends(cl, p, c) for p in cl.parts[root])


def _mutates(n: fx.Node) -> bool:
    if n.op == "call_function":
        return n.target is operator.setitem
    return n.op == "call_method" and n.target.endswith("_") and not n.target.startswith("__")


def _opname(n):
    return n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))


def choose_units(an: td.Analysis) -> tuple[frozenset[int], int | None]:
    """The sequence class to shard: the self-attention sequence with the most attention work."""
    cl = an.classes
    score: dict[int, int] = {}
    cross: dict[int, int] = {}
    for n in an.attention:
        q, k = arg(n, 0, "query"), arg(n, 1, "key")
        qd, kd = an.dims.get(q), an.dims.get(k)
        if not isinstance(qd, list) or not isinstance(kd, list):
            continue
        cq, ck = cl.find(qd[-2]), cl.find(kd[-2])
        if cl.size[cq] <= 1:
            continue
        qs, ks = td._shape(q), td._shape(k)
        work = 1
        for s in qs[:-1]:
            work *= s
        table = score if cq == ck else cross
        table[cq] = table.get(cq, 0) + work * ks[-2]
    # No softmax self-attention (Sana's linear attention is matmuls): shard the queries of the
    # cross-attention, which are the image tokens; the rest of the graph follows them.
    score = score or cross
    if not score:
        return frozenset(), None
    best = max(score, key=score.get)
    return frozenset(cl.find(u) for u in cl.units_of(best)), best


def shard_sequence_pass(gm: fx.GraphModule, ctx: ShardContext):
    rw = _Rewriter(gm, ctx)
    rw.run()
    return rw.modified
