"""fuse_norm_rope_pass: RMSNorm followed by an interleaved rotary embedding becomes one ``xdit::norm_rope`` call.

Terms: X is the normalised q (or k), [B, S, H, D]; a pair is (X[..., 2i], X[..., 2i + 1]); the cosine / sine
tensors broadcast over the heads.

    before (FLUX: diffusers' apply_rotary_emb, use_real_unbind_dim = -1):
        X   = rms_norm(x, (D,), w)        or  cat([rms_norm(x_txt, (D,), w_txt), rms_norm(x_img, (D,), w_img)], 1)
        re, im = reshape(X, ..., -1, 2).unbind(-1) ;  R = stack([-im, re], -1).flatten(3)
        out = (X.float() * cos + R.float() * sin).to(X.dtype)
    (HunyuanVideo's dual-stream blocks: the same rotary after diffusers' own RMSNorm, x * rsqrt(mean(x²) + eps),
    rounded to the weight's dtype before the weight: round_first)
    before (Wan: the processor's own rotary, norm over the whole token):
        X   = unflatten(rms_norm(x, (H * D,), w), 2, (H, -1))
        x1, x2 = unflatten(X, -1, (-1, 2)).unbind(-1) ;  out = empty_like(X)
        out[..., 0::2] = x1 * c - x2 * s ;  out[..., 1::2] = x1 * s + x2 * c ;  out = out.type_as(X)
    after:
        out = xdit::norm_rope([x, ...], [w, ...], eps, norm_all, ce, se, co, so, round_first)   (runtime/norm_rope.py)

The match is structural (these ops, this wiring, shapes from the fake ``example_value``s) and every node it
replaces must have no user outside it; anything else is left alone. On CUDA the op is one Triton kernel that
reads x once and writes out once; elsewhere the same math in torch ops, so the graph means the same everywhere.
It runs after the sharding passes (the op sees this rank's tokens and its share of cos / sin) and before the
attention rewrite.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..runtime import norm_rope as _norm_rope  # noqa: F401  (registers xdit::norm_rope)

_RMS = {F.rms_norm, getattr(torch, "rms_norm", F.rms_norm)}
_ADD = {operator.add, torch.add}
_SUB = {operator.sub, torch.sub}
_MUL = {operator.mul, torch.mul}
_NEG = {operator.neg, torch.neg}


def _val(n):
    return n.meta.get("example_value") if isinstance(n, fx.Node) else None


def _is(n, kind: str, targets) -> bool:
    if not isinstance(n, fx.Node):
        return False
    if kind == "method":
        return n.op == "call_method" and n.target in targets
    return n.op == "call_function" and n.target in targets


def _arg(n: fx.Node, i: int, name: str, default=None):
    return n.args[i] if len(n.args) > i else n.kwargs.get(name, default)


def _upcast_src(n):
    """n = X.float() / X.to(torch.float32) -> X (else n itself)."""
    if _is(n, "method", {"float"}) and len(n.args) == 1:
        return n.args[0]
    if _is(n, "method", {"to"}) and len(n.args) == 2 and n.args[1] is torch.float32:
        return n.args[0]
    return n


def _pairs_of(n):
    """n = reshape(X, ..., -1, 2) / unflatten(X, -1, (-1, 2)) / view(...): X when n pairs X's last dim."""
    if not _is(n, "method", {"reshape", "view", "unflatten"}) or not isinstance(n.args[0], fx.Node):
        return None
    x, xv, nv = n.args[0], _val(n.args[0]), _val(n)
    if xv is None or nv is None or nv.dim() != xv.dim() + 1 or nv.shape[-1] != 2:
        return None
    return x if tuple(nv.shape[:-2]) == tuple(xv.shape[:-1]) else None


def _halves(g0, g1):
    """g0, g1 = getitem(unbind(pairs(X), -1), 0 / 1) -> X."""
    if not (_is(g0, "function", {operator.getitem}) and _is(g1, "function", {operator.getitem})):
        return None
    u = g0.args[0]
    if g1.args[0] is not u or g0.args[1] != 0 or g1.args[1] != 1:
        return None
    if not (_is(u, "method", {"unbind"}) or _is(u, "function", {torch.unbind})):
        return None
    if _arg(u, 1, "dim", 0) not in (-1, _val(u.args[0]).dim() - 1 if _val(u.args[0]) is not None else -1):
        return None
    return _pairs_of(u.args[0])


def _rotated_of(n):
    """n = flatten(stack([-im, re], -1), -2) -> X."""
    n = _upcast_src(n)
    if not _is(n, "method", {"flatten", "reshape", "view"}) or not _is(n.args[0], "function", {torch.stack}):
        return None
    st = n.args[0]
    sv, nv = _val(st), _val(n)       # flatten(-2) or the reshape the sharding pass made of it (local sizes)
    if sv is None or nv is None or tuple(nv.shape) != (*sv.shape[:-2], sv.shape[-2] * sv.shape[-1]):
        return None
    parts = st.args[0]
    if _arg(st, 1, "dim", 0) != -1 or not isinstance(parts, (list, tuple)) or len(parts) != 2:
        return None
    neg, re = parts
    if not _is(neg, "function", _NEG):
        return None
    return _halves(re, neg.args[0])


def _freq_ok(f, xv) -> bool:
    """f broadcasts over X = [B, S, H, D] along the heads (one cosine per token and channel)."""
    fv = _val(f)
    if fv is None or xv is None or fv.dim() > 4 or xv.dim() != 4:
        return False
    s = (1,) * (4 - fv.dim()) + tuple(fv.shape)
    return s[3] == xv.shape[3] and s[2] == 1 and s[1] in (1, xv.shape[1]) and s[0] in (1, xv.shape[0])


def _match_stack(add):
    """FLUX's form, anchored on the add; returns (X, (ce, se, co, so), parities, last node, []) or None."""
    if not _is(add, "function", _ADD) or len(add.args) != 2 or len(add.users) != 1:
        return None
    last = next(iter(add.users))
    if not (_is(last, "method", {"to", "type_as"}) and len(last.args) == 2):
        return None
    for m_x, m_r in (add.args, add.args[::-1]):
        if not (_is(m_x, "function", _MUL) and _is(m_r, "function", _MUL)):
            continue
        for a, c in (m_x.args, m_x.args[::-1]):
            x = _upcast_src(a)
            for r, s in (m_r.args, m_r.args[::-1]):
                if isinstance(x, fx.Node) and _rotated_of(r) is x and _freq_ok(c, _val(x)) and _freq_ok(s, _val(x)):
                    return x, (c, s, c, s), (0, 0, 1, 1), last, []
    return None


def _match_setitem(empty):
    """Wan's form, anchored on the empty_like; returns (X, (ce, se, co, so), parities, last node, the setitems)
    or None."""
    if not _is(empty, "function", {torch.empty_like}) or not isinstance(empty.args[0], fx.Node):
        return None
    x = empty.args[0]
    sets = [u for u in empty.users if _is(u, "function", {operator.setitem})]
    others = [u for u in empty.users if u not in sets]
    if len(sets) != 2 or len(others) != 1 or not _is(others[0], "method", {"type_as", "to"}):
        return None
    last = others[0]
    by_parity = {}
    for st in sets:
        idx = st.args[1]
        if not (isinstance(idx, tuple) and len(idx) == 2 and idx[0] is Ellipsis and isinstance(idx[1], slice)
                and idx[1].stop is None and idx[1].step == 2 and idx[1].start in (0, 1)):
            return None
        by_parity[idx[1].start or 0] = st.args[2]
    ev, od = by_parity.get(0), by_parity.get(1)
    if not (_is(ev, "function", _SUB) and _is(od, "function", _ADD)):
        return None
    # ev = x1 * c - x2 * s ; od = x1 * s' + x2 * c'
    terms = []
    for m in (*ev.args, *od.args):
        if not _is(m, "function", _MUL):
            return None
        terms.append(m.args)
    (a1, a2), (b1, b2), (c1, c2), (d1, d2) = terms
    x1, ce = (a1, a2) if _is(a1, "function", {operator.getitem}) and a1.args[1] == 0 else (a2, a1)
    x2, se = (b1, b2) if _is(b1, "function", {operator.getitem}) and b1.args[1] == 1 else (b2, b1)
    x1b, so = (c1, c2) if c1 is x1 else (c2, c1)
    x2b, co = (d1, d2) if d1 is x2 else (d2, d1)
    if x1b is not x1 or x2b is not x2 or _halves(x1, x2) is not x:
        return None
    if not all(_freq_ok(f, _val(x)) for f in (ce, se, co, so)):
        # Wan slices the halves out of full cos / sin ([..., 0::2]); the op wants them as given ([.., P])
        if not all(_half_ok(f, _val(x)) for f in (ce, se, co, so)):
            return None
        return x, (ce, se, co, so), None, last, sets
    return x, (ce, se, co, so), (0, 0, 1, 1), last, sets


def _half_ok(f, xv) -> bool:
    fv = _val(f)
    if fv is None or xv is None or fv.dim() > 4 or xv.dim() != 4:
        return False
    s = (1,) * (4 - fv.dim()) + tuple(fv.shape)
    return s[3] * 2 == xv.shape[3] and s[2] == 1 and s[1] in (1, xv.shape[1]) and s[0] in (1, xv.shape[0])


def _manual_rms(n, width):
    """diffusers' own RMSNorm: x * rsqrt(x.to(float32).pow(2).mean(-1, keepdim=True) + eps) [.to(w.dtype)] * w
    -> (x, w, eps, round_first, [its nodes]) or None. round_first: rounded to w's dtype before the weight."""
    if not _is(n, "function", _MUL) or len(n.args) != 2:
        return None
    for a, w in (n.args, n.args[::-1]):
        wv = _val(w)
        if not (isinstance(w, fx.Node) and w.op in ("get_attr", "placeholder") and wv is not None
                and tuple(wv.shape) == (width,)):
            continue
        nodes, round_first = [n], False
        if _is(a, "method", {"to"}) and len(a.args) == 2 and isinstance(a.args[1], torch.dtype):
            nodes.append(a)
            a, round_first = a.args[0], True
        if not _is(a, "function", _MUL) or len(a.args) != 2:
            continue
        for x, r in (a.args, a.args[::-1]):
            if not (_is(r, "function", {torch.rsqrt}) and _is(r.args[0], "function", _ADD)):
                continue
            var, eps = r.args[0].args
            if isinstance(var, fx.Node) and not isinstance(eps, fx.Node) and _is(var, "method", {"mean"}) \
                    and _arg(var, 1, "dim") in (-1, [-1], (-1,)) and var.kwargs.get("keepdim") \
                    and _is(var.args[0], "method", {"pow"}) and var.args[0].args[1] == 2 \
                    and _upcast_src(var.args[0].args[0]) is x and x is not var.args[0].args[0]:
                return x, w, float(eps), round_first, [*nodes, a, r, r.args[0], var, var.args[0],
                                                       var.args[0].args[0]]
    return None


def _norm_of(x):
    """X's RMSNorm: ([inputs], [weights], eps, norm_all, round_first, [nodes replaced]) or None."""
    def rms(n, width):
        if (m := _manual_rms(n, width)) is not None:       # HunyuanVideo
            return m
        if not _is(n, "function", _RMS):
            return None
        shape, w, eps = _arg(n, 1, "normalized_shape"), _arg(n, 2, "weight"), _arg(n, 3, "eps")
        if not isinstance(w, fx.Node) or eps is None or tuple(shape) != (width,):
            return None
        return n.args[0], w, eps, False, [n]
    xv = _val(x)
    H, D = xv.shape[2], xv.shape[3]
    if (r := rms(x, D)) is not None:                                          # FLUX single block
        return [r[0]], [r[1]], r[2], False, r[3], r[4]
    if _is(x, "function", {torch.cat}) and _arg(x, 1, "dim", 0) in (1, -3):    # FLUX double block: cat along S
        rs = [rms(p, D) for p in x.args[0]]
        if rs and all(r is not None for r in rs) and len({(r[2], r[3]) for r in rs}) == 1:
            return [r[0] for r in rs], [r[1] for r in rs], rs[0][2], False, rs[0][3], [x, *(n for r in rs
                                                                                             for n in r[4])]
    if _is(x, "method", {"unflatten", "reshape", "view"}) and (r := rms(x.args[0], H * D)) is not None \
            and tuple(_val(x.args[0]).shape) == (*xv.shape[:2], H * D):     # Wan: norm over the token, then heads
        return [("unflatten", r[0], H, D)], [r[1]], r[2], True, r[3], [x, *r[4]]
    return None


def _chain(x, ends, pos):
    """The nodes between x (excluded) and ends (included): x's descendants that lead to one of ends."""
    limit = max(pos[e] for e in ends)
    desc, todo = set(), [x]
    while todo:
        for u in todo.pop().users:
            if u not in desc and pos.get(u, limit + 1) <= limit:
                desc.add(u)
                todo.append(u)
    chain, todo = set(), list(ends)
    while todo:
        n = todo.pop()
        if n not in chain:
            chain.add(n)
            todo += [a for a in n.all_input_nodes if a in desc]
    return chain, desc


def fuse_norm_rope_pass(gm: fx.GraphModule, ctx) -> bool:
    g = gm.graph
    count, erased = 0, set()
    for n in list(g.nodes):
        if n in erased:
            continue
        m = _match_stack(n) or _match_setitem(n)
        if m is None:
            continue
        x, freqs, parities, last, extra = m
        xv, lv = _val(x), _val(last)
        norm = _norm_of(x) if xv is not None and xv.dim() == 4 else None
        if norm is None or lv is None or lv.dtype != xv.dtype:
            continue
        xs, ws, eps, norm_all, round_first, norm_nodes = norm
        # the op computes in x's dtype: inputs, weights and the result all of one dtype (no promotion to mimic)
        vals = [_val(a[1] if isinstance(a, tuple) else a) for a in xs] + [_val(w) for w in ws]
        if any(v is None or v.dtype != xv.dtype for v in vals):
            continue
        pos = {n: i for i, n in enumerate(g.nodes)}
        chain, desc = _chain(x, [last, *extra], pos)
        chain |= set(norm_nodes)
        # closed: nothing outside the chain reads a node it replaces; cos / sin do not come from x
        if any(u not in chain for c in chain if c is not last for u in c.users) or any(f in desc for f in freqs):
            continue
        with g.inserting_before(last):
            args_x = []
            for a in xs:
                if isinstance(a, tuple):              # ("unflatten", y, H, D)
                    a = g.call_method("unflatten", (a[1], 2, (a[2], a[3])))
                args_x.append(a)
            if parities is not None:
                fr = [g.call_function(operator.getitem, (f, (Ellipsis, slice(p, None, 2))))
                      for f, p in zip(freqs, parities)]
            else:
                fr = list(freqs)
            fused = g.call_function(torch.ops.xdit.norm_rope.default,
                                    (args_x, list(ws), float(eps), bool(norm_all), *fr, bool(round_first)))
        fused.meta = {k: v for k, v in last.meta.items() if k in ("example_value", "val", "stack_trace",
                                                                   "nn_module_stack")}
        last.replace_all_uses_with(fused)
        for c in sorted(chain, key=lambda c: pos[c], reverse=True):
            if not c.users:
                g.erase_node(c)
                erased.add(c)
        count += 1
    if hasattr(ctx, "fuse_report"):
        ctx.fuse_report["norm_rope"] = count
    return count > 0

