"""Dim classes: which tensor dims in a captured graph are "the same dim".

Every dim of every tensor value in the graph gets a *class* (union-find id). Ops unify the classes of dims
that correspond (a residual add unifies the token dims of its two operands, a linear keeps all but the last
dim, attention unifies q's batch/heads with k's, ...). Three kinds of class:

    atom            a dim born somewhere (an input dim, a linear's output features, a freshly created dim)
    cat(p0, p1..)   a dim made by concatenating dims (text tokens ++ image tokens)
    prod(f0, f1..)  a dim made by merging dims row-major (B*F, or h*w after a flatten)

After the walk, the sequence dim of an attention's q is a class; its *units* (the cat leaves, or the class
itself) are what sequence parallelism shards. Nothing here knows any model: only torch op semantics.
Ops without a rule get fresh classes (and the sharding pass gathers their inputs), so an unknown op costs
speed, never correctness.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F


class DimClasses:
    """Union-find over dim classes with cat/prod structure."""

    def __init__(self):
        self.parent: list[int] = []
        self.size: list[int] = []
        self.kind: list[str] = []        # "atom" | "cat" | "prod"
        self.parts: list[tuple[int, ...]] = []
        self.conflicts: list[str] = []

    def new(self, size: int, kind: str = "atom", parts: tuple[int, ...] = ()) -> int:
        self.parent.append(len(self.parent))
        self.size.append(int(size))
        self.kind.append(kind)
        self.parts.append(tuple(parts))
        return len(self.parent) - 1

    def find(self, c: int) -> int:
        while self.parent[c] != c:
            self.parent[c] = self.parent[self.parent[c]]
            c = self.parent[c]
        return c

    def cat(self, parts) -> int:
        parts = tuple(p for p in parts if self.size[p] > 0)
        if len(parts) == 1:
            return parts[0]
        return self.new(sum(self.size[p] for p in parts), "cat", parts)

    def prod(self, factors) -> int:
        factors = tuple(f for f in factors if self.size[f] != 1)
        if len(factors) == 1:
            return factors[0]
        n = 1
        for f in factors:
            n *= self.size[f]
        if not factors:
            return self.new(1)
        return self.new(n, "prod", factors)

    def unify(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a == b or self.size[a] == 1 or self.size[b] == 1:
            return
        if self.size[a] != self.size[b]:
            self.conflicts.append(f"size {self.size[a]} vs {self.size[b]}")
            return
        ka, kb = self.kind[a], self.kind[b]
        if ka == "atom":
            self.parent[a] = b
            return
        if kb == "atom":
            self.parent[b] = a
            return
        pa, pb = self.parts[a], self.parts[b]
        if ka == kb and len(pa) == len(pb) and all(self.size[x] == self.size[y] for x, y in zip(pa, pb)):
            self.parent[b] = a
            for x, y in zip(pa, pb):
                self.unify(x, y)
            return
        # Two different structures for one dim: keep the first, remember it (the sharder will not trust it).
        self.conflicts.append(f"{ka}{[self.size[x] for x in pa]} vs {kb}{[self.size[x] for x in pb]}")
        self.parent[b] = a

    def close(self) -> None:
        """Congruence closure: cat/prod classes whose parts are the same classes are the same class."""
        changed = True
        while changed:
            changed = False
            seen: dict[tuple, int] = {}
            for c in range(len(self.parent)):
                if self.parent[c] != c or self.kind[c] == "atom":
                    continue
                key = (self.kind[c], tuple(self.find(p) for p in self.parts[c]))
                other = seen.setdefault(key, c)
                if other != c:
                    self.parent[c] = other
                    changed = True

    def leaves(self, c: int, units: frozenset[int] = frozenset()) -> list[int]:
        """Leaf factors of a class (through prod only), stopping at units."""
        c = self.find(c)
        if c in units or self.kind[c] != "prod":
            return [c]
        out = []
        for f in self.parts[c]:
            out.extend(self.leaves(f, units))
        return out

    def units_of(self, c: int) -> list[int]:
        """The shardable units of a sequence class: cat leaves (recursively), else the class itself."""
        c = self.find(c)
        if self.kind[c] == "cat":
            out = []
            for p in self.parts[c]:
                out.extend(self.units_of(p))
            return out
        return [c]

    def contains(self, c: int, units: frozenset[int]) -> bool:
        c = self.find(c)
        if c in units:
            return True
        return any(self.contains(p, units) for p in self.parts[c])

    def positions(self, c: int, units: frozenset[int], span) -> list[int]:
        """Full-tensor positions along a dim of class `c` that a rank holds, in local order.
        `span(unit) -> (start, length)` is that rank's part of each unit."""
        c = self.find(c)
        if c in units:
            start, length = span(c)
            return list(range(start, start + length))
        if self.kind[c] == "cat":
            out, base = [], 0
            for p in self.parts[c]:
                out.extend(base + i for i in self.positions(p, units, span))
                base += self.size[self.find(p)]
            return out
        if self.kind[c] == "prod" and self.contains(c, units):
            out = [0]
            for f in self.parts[c]:
                sub = self.positions(f, units, span)
                n = self.size[self.find(f)]
                out = [o * n + s for o in out for s in sub]
            return out
        return list(range(self.size[c]))


def _shape(n) -> tuple[int, ...] | None:
    v = n.meta.get("example_value") if isinstance(n, fx.Node) else None
    if isinstance(v, torch.Tensor):
        return tuple(int(s) for s in v.shape)
    return None


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


@dataclass
class Analysis:
    classes: DimClasses
    dims: dict[fx.Node, object] = field(default_factory=dict)  # node -> list[int] | tuple[list[int], ...]
    unknown: dict[fx.Node, str] = field(default_factory=dict)  # nodes with no rule (fresh classes)
    attention: list[fx.Node] = field(default_factory=list)


# ---- op tables (torch-level dynamo graphs) ------------------------------------------------------------

SDPA = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}

POINTWISE_FN = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow, operator.neg,
    operator.mod, operator.and_, operator.or_, operator.invert, operator.eq, operator.ne, operator.lt,
    operator.le, operator.gt, operator.ge, operator.iadd, operator.imul, operator.isub, operator.itruediv,
    torch.add, torch.sub, torch.mul, torch.div, torch.true_divide, torch.pow, torch.neg, torch.exp, torch.log,
    torch.sin, torch.cos, torch.tanh, torch.sigmoid, torch.rsqrt, torch.sqrt, torch.abs, torch.where,
    torch.clamp, torch.clip, torch.maximum, torch.minimum, torch.erf, torch.square, torch.reciprocal,
    torch.masked_fill, torch.lerp, torch.addcmul, torch.logical_not, torch.logical_and, torch.logical_or,
    torch.exp2, torch.log1p, torch.expm1, torch.sign, torch.floor, torch.ceil, torch.round, torch.isnan,
    torch.nan_to_num, torch.float_power, torch.atan2, torch.polar, torch.complex, torch.relu,
    F.silu, F.gelu, F.relu, F.dropout, F.mish, F.softplus, F.leaky_relu, F.elu, F.hardswish, F.sigmoid,
    F.tanh, F.glu if False else F.silu, torch._C._nn.gelu, torch._C._nn.silu, torch.nn.functional.hardtanh,
}
POINTWISE_METHOD = {
    "float", "half", "bfloat16", "double", "to", "type", "type_as", "contiguous", "clone", "detach", "sin",
    "cos", "exp", "sigmoid", "tanh", "rsqrt", "sqrt", "pow", "mul", "add", "sub", "div", "neg", "abs",
    "masked_fill", "masked_fill_", "clamp", "clamp_min", "clamp_max", "float_power", "bool", "int", "long",
    "__and__", "__or__", "__invert__", "logical_not", "add_", "mul_", "sub_", "div_", "exp_", "square",
    "reciprocal", "log", "log1p", "relu", "silu", "gelu", "erf", "lerp", "addcmul", "where", "expm1",
    "nan_to_num", "sign", "floor", "ceil", "round", "copy_", "requires_grad_", "fill_", "zero_",
    "real", "imag",
}
# dims: rule(dim arg) -> the dim is mixed (a reduction-like op along it)
DIMWISE_FN = {torch.softmax, F.softmax, F.log_softmax, torch.log_softmax, torch.cumsum, torch.cumprod,
              torch.argsort, torch.flip, torch.roll}
DIMWISE_METHOD = {"softmax", "log_softmax", "cumsum", "cumprod", "argsort", "flip", "roll"}
REDUCE_FN = {torch.sum, torch.mean, torch.amax, torch.amin, torch.max, torch.min, torch.var, torch.std,
             torch.prod, torch.any, torch.all, torch.argmax, torch.argmin, torch.logsumexp, torch.norm,
             torch.linalg.vector_norm, torch.count_nonzero}
REDUCE_METHOD = {"sum", "mean", "amax", "amin", "max", "min", "var", "std", "prod", "any", "all", "argmax",
                 "argmin", "logsumexp", "norm", "count_nonzero"}
CREATE_FN = {torch.arange, torch.zeros, torch.ones, torch.full, torch.empty, torch.randn, torch.rand,
             torch.linspace, torch.tensor, torch.eye, torch.meshgrid, torch.randint}
LIKE_FN = {torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.randn_like,
           torch.rand_like}
LIKE_METHOD = {"new_zeros", "new_ones", "new_empty", "new_full", "new_tensor"}
VIEW_METHOD = {"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as"}
VIEW_FN = {torch.reshape, torch.flatten, torch.unflatten}
PERMUTE = {"permute", "transpose", "swapaxes", "movedim", "t", "mT"}
NORM_FN = {F.layer_norm, torch.layer_norm, torch.rms_norm, F.rms_norm if hasattr(F, "rms_norm") else F.layer_norm}
MATMUL_FN = {operator.matmul, torch.matmul, torch.bmm, torch.baddbmm, torch.mm}
SPLIT_METHOD = {"split", "split_with_sizes", "chunk", "unbind", "tensor_split"}
SPLIT_FN = {torch.split, torch.chunk, torch.unbind, torch.tensor_split, torch.split_with_sizes
            if hasattr(torch, "split_with_sizes") else torch.split}


PAD_FN = {F.pad, torch._C._nn.pad}


def op_key(n: fx.Node):
    return n.target if n.op == "call_function" else (("method", n.target) if n.op == "call_method" else None)


def is_method(n, names) -> bool:
    return n.op == "call_method" and n.target in names


def is_fn(n, fns) -> bool:
    return n.op == "call_function" and n.target in fns


def arg(n: fx.Node, i: int, name: str, default=None):
    if len(n.args) > i:
        return n.args[i]
    return n.kwargs.get(name, default)


def analyze(gm: fx.GraphModule) -> Analysis:
    """Assign a dim class to every dim of every tensor value of `gm` (see module doc)."""
    cl = DimClasses()
    an = Analysis(cl)
    for n in gm.graph.nodes:
        if n.op == "output":
            continue
        if is_fn(n, SDPA):
            an.attention.append(n)
        try:
            res = _rule(n, an)
        except _NoRule as e:
            res = None
            an.unknown[n] = str(e) or "no rule"
        if res is None:
            res = _fresh_for(n, cl)
        an.dims[n] = res
    cl.close()
    return an


class _NoRule(Exception):
    pass


def _fresh_for(n, cl):
    v = n.meta.get("example_value")
    if isinstance(v, torch.Tensor):
        return [cl.new(s) for s in v.shape]
    if isinstance(v, (tuple, list)):
        return tuple([cl.new(s) for s in t.shape] if isinstance(t, torch.Tensor) else None for t in v)
    return None


def _d(an, x):
    """Dim classes of an argument (None for non-tensors)."""
    if isinstance(x, fx.Node):
        d = an.dims.get(x)
        return d if isinstance(d, list) else None
    return None


def _broadcast(n, an, tensors):
    return _broadcast_list(an, tensors, _shape(n))


def _tensor_args(n):
    return [a for a in list(n.args) + list(n.kwargs.values()) if isinstance(a, fx.Node) and _shape(a) is not None]


def _rule(n: fx.Node, an: Analysis):
    cl = an.classes
    shp = _shape(n)
    if n.op in ("placeholder", "get_attr"):
        return None
    if n.op == "call_function" and n.target is operator.setitem:
        xd = _d(an, n.args[0])
        if xd is None:
            raise _NoRule("setitem on a non-tensor")
        sub = _index_rule(n, an, xd)
        vd = _d(an, n.args[2])
        if vd is not None:
            vs = _shape(n.args[2])
            for j in range(1, min(len(sub), len(vd)) + 1):
                if vs[-j] != 1:
                    cl.unify(sub[-j], vd[-j])
        return None
    if n.op == "call_function" and n.target is operator.getitem:
        src = n.args[0]
        sd = an.dims.get(src)
        if isinstance(sd, tuple):
            return sd[n.args[1]]
        if isinstance(sd, list):
            return _index_rule(n, an, sd)
        return None
    if shp is None and not isinstance(n.meta.get("example_value"), (tuple, list)):
        return None
    if is_fn(n, SDPA):
        return _sdpa_rule(n, an)
    if is_fn(n, {torch.view_as_complex}):
        return list(_d(an, n.args[0])[:-1])
    if is_fn(n, {torch.view_as_real}):
        return list(_d(an, n.args[0])) + [cl.new(2)]
    if is_fn(n, POINTWISE_FN) or is_method(n, POINTWISE_METHOD):
        return _broadcast(n, an, _tensor_args(n))
    if is_fn(n, {F.linear}):
        xd = _d(an, n.args[0])
        return list(xd[:-1]) + [cl.new(shp[-1])]
    if is_fn(n, NORM_FN) or is_fn(n, {F.group_norm}):
        return list(_d(an, n.args[0]))
    if is_fn(n, DIMWISE_FN) or is_method(n, DIMWISE_METHOD) or is_fn(n, REDUCE_FN) or is_method(n, REDUCE_METHOD):
        return _reduce_like(n, an)
    if is_fn(n, MATMUL_FN) or is_method(n, {"matmul", "bmm"}):
        return _matmul_rule(n, an)
    if is_method(n, VIEW_METHOD) or is_fn(n, VIEW_FN):
        return _view_rule(n, an)
    if is_method(n, PERMUTE) or is_fn(n, {torch.permute, torch.transpose, torch.swapaxes, torch.movedim}):
        return _permute_rule(n, an)
    if is_method(n, {"unsqueeze", "squeeze"}) or is_fn(n, {torch.unsqueeze, torch.squeeze}):
        return _squeeze_rule(n, an)
    if is_method(n, {"expand", "expand_as", "repeat"}) or is_fn(n, {torch.broadcast_to}):
        return _expand_rule(n, an)
    if is_fn(n, {torch.cat, torch.concat, torch.concatenate}):
        return _cat_rule(n, an)
    if is_fn(n, {torch.stack}):
        ts = n.args[0] if n.args else n.kwargs["tensors"]
        dim = _norm_dim(arg(n, 1, "dim", 0), len(shp))
        base = _broadcast_list(an, ts, shp[:dim] + shp[dim + 1:])
        return base[:dim] + [cl.new(shp[dim])] + base[dim:]
    if is_method(n, SPLIT_METHOD) or is_fn(n, SPLIT_FN):
        return _split_rule(n, an)
    if is_method(n, {"repeat_interleave"}) or is_fn(n, {torch.repeat_interleave}):
        xd = _d(an, n.args[0])
        dim = arg(n, 2, "dim", None)
        if dim is None or xd is None:
            raise _NoRule("repeat_interleave without dim")
        dim = _norm_dim(dim, len(shp))
        return [c if i != dim else cl.new(shp[i]) for i, c in enumerate(xd)]
    if is_fn(n, PAD_FN):
        xd, pads = _d(an, n.args[0]), arg(n, 1, "pad")
        k = len(pads) // 2
        return [c if i < len(xd) - k or (pads[2 * (len(xd) - 1 - i)] == 0 and pads[2 * (len(xd) - 1 - i) + 1] == 0)
                else cl.new(shp[i]) for i, c in enumerate(xd)]
    if is_fn(n, {torch.outer, torch.ger}):
        return [_d(an, n.args[0])[0], _d(an, n.args[1])[0]]
    if is_fn(n, CREATE_FN):
        return None
    if is_fn(n, LIKE_FN):
        return list(_d(an, n.args[0]))
    if is_method(n, LIKE_METHOD):
        return None
    if is_method(n, {"size", "dim", "numel", "item", "tolist", "data_ptr", "__bool__", "is_contiguous"}):
        return None
    raise _NoRule(f"no rule for {n.op} {getattr(n.target, '__name__', n.target)}")


def _broadcast_list(an, ts, out_shape):
    cl = an.classes
    out = []
    nd = len(out_shape)
    for i in range(nd):
        c = None
        for t in ts:
            td, tshape = _d(an, t), _shape(t)
            if td is None:
                continue
            j = i - (nd - len(tshape))
            if j >= 0 and tshape[j] == out_shape[i] and out_shape[i] != 1:
                if c is None:
                    c = td[j]
                else:
                    cl.unify(c, td[j])
        out.append(c if c is not None else cl.new(out_shape[i]))
    return out


def _sdpa_rule(n, an):
    cl = an.classes
    q, k, v = (arg(n, i, nm) for i, nm in enumerate(("query", "key", "value")))
    mask = arg(n, 3, "attn_mask")
    qd, kd, vd = _d(an, q), _d(an, k), _d(an, v)
    qs, ks = _shape(q), _shape(k)
    for i in range(len(qs) - 2):                      # batch dims (and heads when equal)
        if ks[i] == qs[i]:
            cl.unify(qd[i], kd[i])
            cl.unify(kd[i], vd[i])
    cl.unify(kd[-2], vd[-2])
    md = _d(an, mask)
    if md is not None:
        ms = _shape(mask)
        full = qs[:-2] + (qs[-2], ks[-2])
        ref = qd[:-2] + [qd[-2], kd[-2]]
        off = len(full) - len(ms)
        for j, s in enumerate(ms):
            if s != 1 and j + off >= 0 and full[j + off] == s:
                cl.unify(md[j], ref[j + off])
    return list(qd[:-1]) + [vd[-1]]


def _reduce_like(n, an):
    cl = an.classes
    xd = _d(an, n.args[0])
    if xd is None:
        raise _NoRule("reduction of a non-tensor")
    shp = _shape(n)
    xs = _shape(n.args[0])
    dim = arg(n, 1, "dim", None)
    name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "")
    if shp is not None and len(shp) == len(xs) and dim is not None and not isinstance(dim, (list, tuple)) \
            and name not in ("sum", "mean", "amax", "amin", "var", "std", "prod", "any", "all", "logsumexp",
                             "norm", "max", "min", "argmax", "argmin", "count_nonzero"):
        return list(xd)                                 # dim-wise op (softmax, cumsum): same dims
    if shp is None:
        return None
    if dim is None:
        if len(shp) == 0:
            return []
        raise _NoRule("reduction with unknown output")
    dims = [dim] if isinstance(dim, int) else list(dim)
    dims = {_norm_dim(d, len(xs)) for d in dims}
    keep = len(shp) == len(xs)
    out = []
    for i, c in enumerate(xd):
        if i in dims:
            if keep:
                out.append(cl.new(1))
        else:
            out.append(c)
    return out


def _matmul_rule(n, an):
    cl = an.classes
    if n.target is torch.baddbmm:
        a, b = n.args[1], n.args[2]
    else:
        a, b = n.args[0], n.args[1]
    ad, bd, sa, sb = _d(an, a), _d(an, b), _shape(a), _shape(b)
    shp = _shape(n)
    if ad is None or bd is None or len(sa) < 2 or len(sb) < 2:
        raise _NoRule("matmul of vectors")
    cl.unify(ad[-1], bd[-2])
    batch = _broadcast_list(an, [], shp[:-2])
    nb = len(shp) - 2
    for t, td, ts in ((a, ad, sa), (b, bd, sb)):
        for i in range(nb):
            j = i - (nb - (len(ts) - 2))
            if j >= 0 and ts[j] == shp[i] and shp[i] != 1:
                cl.unify(batch[i], td[j])
    return batch + [ad[-2], bd[-1]]


def _view_target_shape(n):
    return _shape(n)


def _view_rule(n, an):
    """Align input and output dims into groups of equal products (row-major views)."""
    cl = an.classes
    xd = _d(an, n.args[0])
    xs, ys = _shape(n.args[0]), _shape(n)
    if xd is None or ys is None:
        raise _NoRule("view of a non-tensor")
    out: list[int | None] = [None] * len(ys)
    i = j = 0
    while i < len(xs) or j < len(ys):
        if i < len(xs) and xs[i] == 1 and (j >= len(ys) or ys[j] != 1):
            i += 1
            continue
        if j < len(ys) and ys[j] == 1 and (i >= len(xs) or xs[i] != 1):
            out[j] = cl.new(1)
            j += 1
            continue
        if i < len(xs) and j < len(ys) and xs[i] == ys[j]:
            out[j] = xd[i]
            i += 1
            j += 1
            continue
        # a group: grow the smaller side until the products match
        gi, gj = [i], [j]
        pi, pj = xs[i], ys[j]
        i += 1
        j += 1
        while pi != pj:
            if pi < pj:
                pi *= xs[i]
                gi.append(i)
                i += 1
            else:
                pj *= ys[j]
                gj.append(j)
                j += 1
        in_cls = [xd[k] for k in gi if xs[k] != 1]
        if len(gj) == 1:                                    # merge
            out[gj[0]] = cl.prod(in_cls)
        elif len(in_cls) == 1:                              # split
            src = cl.find(in_cls[0])
            sizes = [ys[k] for k in gj]
            facs = cl.parts[src] if cl.kind[src] == "prod" else ()
            if facs and [cl.size[cl.find(f)] for f in facs] == [s for s in sizes if s != 1]:
                it = iter(facs)
                for k in gj:
                    out[k] = next(it) if ys[k] != 1 else cl.new(1)
            else:
                new = [cl.new(ys[k]) for k in gj]
                for k, c in zip(gj, new):
                    out[k] = c
                cl.unify(src, cl.prod(new))
        else:                                               # many to many
            new = [cl.new(ys[k]) for k in gj]
            for k, c in zip(gj, new):
                out[k] = c
            cl.unify(cl.prod(in_cls), cl.prod(new))
    return [c if c is not None else cl.new(ys[k]) for k, c in enumerate(out)]


def _permute_rule(n, an):
    xd = list(_d(an, n.args[0]))
    nd = len(xd)
    name = n.target if n.op == "call_method" else n.target.__name__
    rest = list(n.args[1:])
    if name == "permute":
        perm = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        if not perm:
            perm = n.kwargs["dims"]
        return [xd[_norm_dim(p, nd)] for p in perm]
    if name in ("transpose", "swapaxes"):
        a, b = (_norm_dim(d, nd) for d in rest[:2])
        xd[a], xd[b] = xd[b], xd[a]
        return xd
    if name == "t" or name == "mT":
        xd[-1], xd[-2] = xd[-2], xd[-1]
        return xd
    if name == "movedim":
        src, dst = _norm_dim(rest[0], nd), _norm_dim(rest[1], nd)
        c = xd.pop(src)
        xd.insert(dst, c)
        return xd
    raise _NoRule(name)


def _squeeze_rule(n, an):
    xd, xs, ys = _d(an, n.args[0]), _shape(n.args[0]), _shape(n)
    cl = an.classes
    name = n.target if n.op == "call_method" else n.target.__name__
    if name == "unsqueeze":
        d = _norm_dim(arg(n, 1, "dim"), len(ys))
        return list(xd[:d]) + [cl.new(1)] + list(xd[d:])
    return [c for c, s in zip(xd, xs) if s != 1] if len(ys) == sum(s != 1 for s in xs) else _view_rule(n, an)


def _expand_rule(n, an):
    cl = an.classes
    xd, xs, ys = _d(an, n.args[0]), _shape(n.args[0]), _shape(n)
    name = n.target if n.op == "call_method" else "expand"
    out = []
    off = len(ys) - len(xs)
    for i, s in enumerate(ys):
        j = i - off
        if name != "repeat" and j >= 0 and xs[j] == s:
            out.append(xd[j])
        elif name == "repeat" and j >= 0 and xs[j] == s:
            out.append(xd[j])
        else:
            out.append(cl.new(s))
    if name == "expand_as":
        od = _d(an, n.args[1])
        for a, b in zip(out, od):
            cl.unify(a, b)
    return out


def _cat_rule(n, an):
    cl = an.classes
    ts = n.args[0] if n.args else n.kwargs["tensors"]
    shp = _shape(n)
    dim = _norm_dim(arg(n, 1, "dim", 0), len(shp))
    ts = [t for t in ts if _shape(t) is not None and (len(_shape(t)) > 1 or _shape(t)[0] > 0)]
    out = []
    for i in range(len(shp)):
        if i == dim:
            out.append(cl.cat([_d(an, t)[i] for t in ts]))
        else:
            c = None
            for t in ts:
                if _shape(t)[i] == shp[i] and shp[i] != 1:
                    c = _d(an, t)[i] if c is None else (cl.unify(c, _d(an, t)[i]) or c)
            out.append(c if c is not None else cl.new(shp[i]))
    return out


def _split_rule(n, an):
    cl = an.classes
    xd, xs = _d(an, n.args[0]), _shape(n.args[0])
    outs = n.meta.get("example_value")
    name = n.target if n.op == "call_method" else n.target.__name__
    if name == "unbind":
        dim = _norm_dim(arg(n, 1, "dim", 0), len(xs))
        return tuple([c for i, c in enumerate(xd) if i != dim] for _ in outs)
    dim = _norm_dim(arg(n, 2, "dim", 0), len(xs))
    sizes = [int(o.shape[dim]) for o in outs]
    src = cl.find(xd[dim])
    parts = cl.parts[src] if cl.kind[src] == "cat" else ()
    if parts and [cl.size[cl.find(p)] for p in parts] == sizes:
        split_cls = list(parts)
    else:
        split_cls = [cl.new(s) for s in sizes]
        if len(sizes) > 1:
            cl.unify(src, cl.cat(split_cls))
    return tuple([split_cls[k] if i == dim else c for i, c in enumerate(xd)] for k in range(len(outs)))


def _index_rule(n, an, xd):
    """x[idx] with None / int / slice / Ellipsis (no tensor indices)."""
    cl = an.classes
    xs = _shape(n.args[0])
    idx = n.args[1]
    if not isinstance(idx, tuple):
        idx = (idx,)
    if any(isinstance(i, fx.Node) or isinstance(i, (list, torch.Tensor)) for i in idx):
        raise _NoRule("tensor indexing")
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    expanded = []
    for i in idx:
        if i is Ellipsis:
            expanded.extend([slice(None)] * (len(xs) - n_real))
        else:
            expanded.append(i)
    out = []
    d = 0
    for i in expanded:
        if i is None:
            out.append(cl.new(1))
        elif isinstance(i, int):
            d += 1
        elif isinstance(i, slice):
            if i == slice(None) or (i.start in (None, 0) and i.stop is None and i.step in (None, 1)):
                out.append(xd[d])
            else:
                start, stop, step = i.indices(xs[d])
                length = len(range(start, stop, step))
                out.append(_slice_class(cl, xd[d], start, stop, step, length))
            d += 1
        else:
            raise _NoRule(f"index {i!r}")
    out.extend(xd[d:])
    return out


def _slice_class(cl, c, start, stop, step, length):
    """Class of x[start:stop] along a dim of class c: a cat part (or a run of parts) when aligned."""
    c = cl.find(c)
    if step == 1 and cl.kind[c] == "cat":
        base, picked = 0, []
        for p in cl.parts[c]:
            sz = cl.size[cl.find(p)]
            if base >= start and base + sz <= stop:
                picked.append(p)
            base += sz
        if picked and sum(cl.size[cl.find(p)] for p in picked) == length:
            return cl.cat(picked)
    if length == cl.size[c]:
        return c
    return cl.new(length)
