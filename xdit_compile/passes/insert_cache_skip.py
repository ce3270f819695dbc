"""insert_cache_skip_pass: First-Block-Cache / TeaCache inside the captured graph, decided by ``torch.cond``.

Terms:
  region      the nodes a skip replaces: blocks 1..n-1 (fbcache) or blocks 0..n-1 (teacache), from
              ``find_blocks`` (glue between blocks included).
  entry/exit  values read by the region from before it / made in it and read after it.
  residual    for an exit value x whose *match* m(x) is an entry value of the same local shape and dtype
              (the residual stream it came from), the cache keeps x - m(x); an exit value without a match is
              cached as is. Skip: x = m(x) + cached residual (or the cached x).
  statistic   fbcache: block 0's residual on its main stream (the largest block-0 output that has a
              matching block-0 input): s = out0 - in0. teacache: block 0's *modulated input*: the first value
              in block 0 that feeds a linear/matmul, has the main input's shape and depends on both the main
              input and a block-0 input of another shape (the timestep/conditioning vector); Flux, PixArt, Wan
              and DiT all give the norm1 output ``norm(x) * (1 + scale) + shift``. Without one, the main input.
  rel         sum|s - s_prev| / sum|s_prev|, both sums all-reduced over the cfg x sp ("replica") group
              first, so every rank takes the same branch (their collectives stay in step).

The decision is data in the graph: state enters as extra graph inputs (cached residuals, s_prev, the TeaCache
accumulator, a mode flag: 0 decide, 1 compute, 2 skip) and leaves as extra outputs; runtime/cache.py keeps
them per request. Matching runs on the LOCAL shapes (a fake-tensor run of the rewritten graph), so the pass
runs last, after shard_sequence / rewrite_attention / split_cfg.

    before:  h0 = block0(x) ; h = blocks1..n(h0) ; out = epilogue(h)
    after:   h0 = block0(x) ; s = h0 - x ; skip = decide(allreduce(l1(s, s_prev)), mode)
             h, res' = cond(skip, lambda: (h0 + res, res.clone()), lambda: (hn := blocks1..n(h0), hn - h0))
             out = epilogue(h)          # graph outputs += res', s_prev', skip, rel
"""
from __future__ import annotations

import operator
import warnings

import torch
import torch.fx as fx

from ..runtime.cache import TEACACHE_COEFFICIENTS, CacheGraphInfo, StateSpec
from .find_blocks import _is_param, find_blocks

_LINEAR = {torch._C._nn.linear, torch.nn.functional.linear, torch.matmul, operator.matmul, torch.addmm,
           torch.mm, torch.bmm}
_CONST = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.Size, slice)


# --- helpers the rewritten graph calls (traced through by Inductor) -----------------------------------

def l1_stats(s: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """[sum |s - prev|, sum |prev|] in float32 (partial sums: the caller all-reduces them)."""
    s32, p32 = s.float(), prev.float()
    return torch.stack([(s32 - p32).abs().sum(), p32.abs().sum()])


def fb_decide(stats, mode, threshold):
    rel = stats[0] / stats[1]
    skip = (mode == 2) | ((mode == 0) & (threshold > 0) & (rel < threshold))
    return skip, rel


def tea_decide(stats, mode, acc, threshold, coefficients: list):
    rel = stats[0] / stats[1]
    scaled = torch.zeros_like(rel)
    for c in coefficients:                 # Horner, highest degree first (numpy.polyval)
        scaled = scaled * rel + c
    acc_new = acc + scaled
    skip = (mode == 2) | ((mode == 0) & (threshold > 0) & (acc_new < threshold))
    return skip, torch.where(skip, acc_new, torch.zeros_like(acc_new)), rel


# --- analysis -----------------------------------------------------------------------------------------

class _Refuse(Exception):
    pass


class _Prop(fx.Interpreter):
    """Every node's value on THIS rank (fake tensors): the LOCAL shapes the full-size meta doesn't hold."""

    def __init__(self, gm):
        super().__init__(gm)
        self.vals: dict[fx.Node, object] = {}

    def run_node(self, n):
        r = super().run_node(n)
        self.vals[n] = r
        return r


def local_values(gm: fx.GraphModule, example_inputs) -> dict:
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    mode = detect_fake_mode(example_inputs) or FakeTensorMode(allow_non_fake_inputs=True)
    inputs = [mode.from_tensor(x) if isinstance(x, torch.Tensor) and not isinstance(x, FakeTensor) else x
              for x in example_inputs]
    prop = _Prop(gm)
    with mode, torch.no_grad():
        prop.run(*inputs)
    return prop.vals


def _ordered(nodes, order):
    return sorted(set(nodes), key=order.__getitem__)


def _io(nodes: list[fx.Node], order):
    inside = set(nodes)
    ins = _ordered([a for n in nodes for a in n.all_input_nodes if a not in inside], order)
    outs = [n for n in nodes if any(u not in inside for u in n.users)]
    return ins, outs


def _mutates(n: fx.Node) -> bool:
    if n.target is operator.setitem:
        return True
    name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
    if n.op == "call_method" and name.endswith("_") and not name.endswith("__"):
        return True
    schema = getattr(n.target, "_schema", None)
    return bool(schema is not None and schema.is_mutable)


class _Finder:
    def __init__(self, gm, vals):
        self.gm, self.vals = gm, vals
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}

    def tensor(self, n):
        v = self.vals.get(n)
        return v if isinstance(v, torch.Tensor) else None

    def same(self, a, b) -> bool:
        ta, tb = self.tensor(a), self.tensor(b)
        return ta is not None and tb is not None and ta.shape == tb.shape and ta.dtype == tb.dtype

    def candidates(self, ins):
        return [i for i in ins if self.tensor(i) is not None and not (i.op == "placeholder" and _is_param(i))]

    def match(self, x: fx.Node, cands: list[fx.Node]) -> fx.Node | None:
        """The entry value x's residual is taken against: the first candidate on x's first-argument chain
        (the residual stream: ``x = h + f(h)`` traces with h first), else the latest same-shaped ancestor."""
        same = [c for c in cands if self.same(c, x)]
        if not same:
            return None
        cset, cur = set(cands), x
        for _ in range(100000):
            nxt = next(iter(cur.all_input_nodes), None)
            if nxt is None:
                break
            if nxt in cset:
                if nxt in same:
                    return nxt
                break
            cur = nxt
        anc, todo = set(), [x]
        while todo:
            n = todo.pop()
            for a in n.all_input_nodes:
                if a not in anc:
                    anc.add(a)
                    if a not in cset:
                        todo.append(a)
        hits = [c for c in same if c in anc]
        return max(hits, key=self.order.__getitem__) if hits else None

    def main_stream(self, block_nodes):
        """(input, output) of block 0's main stream: its largest output that has a matching input."""
        ins, outs = _io(block_nodes, self.order)
        cands = self.candidates(ins)
        pairs = [(self.match(o, cands), o) for o in outs if self.tensor(o) is not None]
        matched = [p for p in pairs if p[0] is not None]
        pool = matched or pairs
        if not pool:
            raise _Refuse("block 0 has no tensor output")
        return max(pool, key=lambda p: self.tensor(p[1]).numel()), cands

    def modulated_input(self, block_nodes, h, cands) -> fx.Node:
        """The first value of block 0 that feeds a linear, has h's shape and depends on h and on a
        conditioning input (another block-0 input of a different shape)."""
        if h is None:
            raise _Refuse("teacache needs block 0's main input (no block-0 output matches an input)")
        cond = {c for c in cands if c is not h and not self.same(c, h)}
        deps: dict[fx.Node, frozenset] = {}
        for n in block_nodes:
            d = set()
            for a in n.all_input_nodes:
                if a is h:
                    d.add("h")
                elif a in cond:
                    d.add("c")
                d |= deps.get(a, frozenset())
            deps[n] = frozenset(d)
            if deps[n] == {"h", "c"} and self.same(n, h) and any(
                    u.op == "call_function" and u.target in _LINEAR and u.args and u.args[0] is n for u in n.users):
                return n
        return h


# --- the pass -----------------------------------------------------------------------------------------

def insert_cache_skip_pass(gm: fx.GraphModule, ctx) -> bool:
    cfg = ctx.cache_config
    try:
        info = _rewrite(gm, ctx, cfg)
    except _Refuse as e:
        warnings.warn(f"xdit: cache.method={cfg.method!r} left this graph uncached: {e}", stacklevel=2)
        ctx.cache_report = {"method": cfg.method, "refused": str(e)}
        return False
    ctx.cache_info = info
    ctx.cache_report = info.report
    return True


def _coefficients(cfg, cls) -> tuple[list[float], str]:
    if cfg.coefficients is not None:
        return list(cfg.coefficients), "plan"
    if cls in TEACACHE_COEFFICIENTS:
        return list(TEACACHE_COEFFICIENTS[cls]), f"published for {cls}"
    warnings.warn(f"xdit: no TeaCache coefficients for {cls or 'this model'}; using the raw relative change "
                  "(run `xdit-compile calibrate plan.toml` to fit them)", stacklevel=3)
    return [1.0, 0.0], "identity (uncalibrated)"


def _rewrite(gm, ctx, cfg) -> CacheGraphInfo:
    stack = find_blocks(gm)
    if stack is None:
        raise _Refuse("found no transformer block list (or its blocks interleave)")
    tea = cfg.method == "teacache"
    if not tea and len(stack) < 2:
        raise _Refuse("fbcache needs at least 2 blocks")
    if not isinstance(next(n for n in gm.graph.nodes if n.op == "output").args[0], (tuple, list)):
        raise _Refuse("the graph output is not a tuple")  # pragma: no cover - dynamo always returns one
    vals = local_values(gm, ctx.example_inputs)
    f = _Finder(gm, vals)
    order = f.order
    b0 = stack.blocks[0].nodes
    (in0, out0), cands0 = f.main_stream(b0)
    if tea:
        stat = f.modulated_input(b0, in0, cands0)
        hoist = _ancestors_within(stat, set(b0)) if stat is not in0 else set()
        region = [n for b in stack.blocks for n in b.nodes if n not in hoist]
    else:
        stat, hoist = None, set()
        region = [n for b in stack.blocks[1:] for n in b.nodes]
    # getitems of a tuple made outside the region are moved out with it (a tuple can't be a cond operand)
    rset = set(region)
    for n in list(region):
        if n.target is operator.getitem and n.args[0] not in rset and all(a not in rset for a in n.all_input_nodes):
            hoist.add(n)
            rset.discard(n)
    region = [n for n in region if n in rset]
    first = region[0]
    for h in _ordered(hoist, order):
        if order[h] > order[first]:
            first.prepend(h)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    f.order = order
    ins, outs = _io(region, order)
    consts = {}
    for a in ins:
        v = vals.get(a)
        if not isinstance(v, torch.Tensor):
            if not _is_const(v):
                raise _Refuse(f"the block stack reads a non-tensor value {a.name} ({type(v).__name__})")
            consts[a] = v
    tin = [a for a in ins if a not in consts]
    for n in region:
        if _mutates(n) and isinstance(n.args[0], fx.Node) and n.args[0] not in rset:
            raise _Refuse(f"{n.name} writes in place into {n.args[0].name}, made before the block stack")
    touts, couts = [], {}
    for o in outs:
        v = vals.get(o)
        if isinstance(v, torch.Tensor):
            touts.append(o)
        elif _is_const(v):
            couts[o] = v
        else:
            raise _Refuse(f"the block stack hands a non-tensor value {o.name} on")
    cands = [c for c in f.candidates(tin) if c not in hoist]
    matches = [f.match(o, cands) for o in touts]
    g = gm.graph
    # --- state placeholders, after the existing ones
    res_specs = [StateSpec(f"xdit_cache_res_{i}", tuple(f.tensor(o).shape), f.tensor(o).dtype)
                 for i, o in enumerate(touts)]
    if tea:
        s_node = stat
    else:
        s_node = out0
    sv = f.tensor(s_node)
    specs = res_specs + [StateSpec("xdit_cache_prev", tuple(sv.shape), sv.dtype)]
    if tea:
        specs.append(StateSpec("xdit_cache_acc", (), torch.float32))
    last_ph = [n for n in g.nodes if n.op == "placeholder"][-1]
    phs = []
    with g.inserting_after(last_ph):
        for spec in reversed(specs + [StateSpec("xdit_cache_mode", (), torch.int32),
                                      StateSpec("xdit_cache_threshold", (), torch.float32)]):
            phs.insert(0, g.placeholder(spec.name))
    res_ph, prev_ph, mode_ph, thr_ph = phs[:len(res_specs)], phs[len(res_specs)], phs[-2], phs[-1]
    acc_ph = phs[len(res_specs) + 1] if tea else None
    # --- branches
    offsets = {o: f.tensor(o).storage_offset() != 0 for o in touts}
    skip_gm = _branch(gm, region, tin, consts, res_specs, touts, matches, offsets, skip=True)
    comp_gm = _branch(gm, region, tin, consts, res_specs, touts, matches, offsets, skip=False)
    gm.add_submodule("xdit_cache_skip_branch", skip_gm)
    gm.add_submodule("xdit_cache_compute_branch", comp_gm)
    # --- decision + cond, where the region started
    replica = ctx.cfg_size * ctx.sp_size
    with g.inserting_before(first):
        if not tea and in0 is not None:
            s_node = g.call_function(torch.sub, (out0, in0))
        stats = g.call_function(l1_stats, (s_node, prev_ph))
        if replica > 1:
            stats = g.call_function(torch.ops.xdit.all_reduce_sum.default, (stats, ctx.group_name("cfg+sp")))
        if tea:
            coeffs, coeff_src = _coefficients(cfg, ctx.model_class)
            dec = g.call_function(tea_decide, (stats, mode_ph, acc_ph, thr_ph, coeffs))
            new_acc = g.call_function(operator.getitem, (dec, 1))
            rel = g.call_function(operator.getitem, (dec, 2))
        else:
            coeff_src = None
            dec = g.call_function(fb_decide, (stats, mode_ph, thr_ph))
            rel = g.call_function(operator.getitem, (dec, 1))
        skip = g.call_function(operator.getitem, (dec, 0))
        new_prev = s_node if tea else g.call_function(torch.where, (skip, prev_ph, s_node))
        skip_attr = g.get_attr("xdit_cache_skip_branch")
        comp_attr = g.get_attr("xdit_cache_compute_branch")
        cond = g.call_function(torch.ops.higher_order.cond,
                               (skip, skip_attr, comp_attr, (*_unaliased(g, tin, f), *res_ph)))
        got = [g.call_function(operator.getitem, (cond, i)) for i in range(2 * len(touts))]
    for o, new in zip(touts, got[:len(touts)]):
        new.meta = {k: v for k, v in o.meta.items() if k in ("example_value", "val", "stack_trace")}
        o.replace_all_uses_with(new, delete_user_cb=lambda u: u not in rset)
    for o, v in couts.items():
        for u in list(o.users):
            if u not in rset:
                u.args = fx.node.map_arg(u.args, lambda a: v if a is o else a)
                u.kwargs = fx.node.map_arg(u.kwargs, lambda a: v if a is o else a)
    for n in reversed(region):
        g.erase_node(n)
    out_node = next(n for n in g.nodes if n.op == "output")
    orig = out_node.args[0]
    orig_t = tuple(orig)
    extra = [*got[len(touts):], new_prev] + ([new_acc] if tea else []) + [skip, rel]
    out_node.args = ((*orig_t, *extra),)
    g.lint()
    gm.recompile()
    report = {
        "method": cfg.method, "threshold": cfg.threshold, "blocks": stack.describe(),
        "region": f"{stack.blocks[0 if tea else 1].name} .. {stack.blocks[-1].name}",
        "statistic": (f"modulated input {stat.name}" if tea and stat is not in0 else
                      f"main input {in0.name}" if tea else
                      f"block-0 residual {out0.name} - {in0.name}" if in0 is not None else
                      f"block-0 output {out0.name}"),
        "residuals": [(o.name, m.name if m is not None else None) for o, m in zip(touts, matches)],
        "all_reduce_over": replica if replica > 1 else 0,
        "coefficients": coeff_src,
    }
    return CacheGraphInfo(cfg.method, len(orig_t), specs, report)


def _unaliased(g, nodes, f) -> list:
    """cond refuses operands that share storage (rope cos/sin views of one table): clone all but the first
    of each group (small tensors in the models seen; the clone is outside the branches)."""
    from torch.multiprocessing.reductions import StorageWeakRef
    seen, out = set(), []
    for n in nodes:
        ref = StorageWeakRef(f.tensor(n).untyped_storage())
        if ref in seen:
            n = g.call_method("clone", (n,))
        seen.add(ref)
        out.append(n)
    return out


def _is_const(v) -> bool:
    if isinstance(v, (tuple, list)):
        return all(_is_const(x) for x in v)
    return isinstance(v, _CONST)


def _ancestors_within(n: fx.Node, within: set) -> set:
    out, todo = {n}, [n]
    while todo:
        for a in todo.pop().all_input_nodes:
            if a in within and a not in out:
                out.add(a)
                todo.append(a)
    return out


def _branch(gm, region, tin, consts, res_specs, touts, matches, offsets, *, skip: bool) -> fx.GraphModule:
    """Both branches take (entry tensors..., cached residuals...) and return (exit values..., residuals...)."""
    g = fx.Graph()
    env = {}
    for a in tin:
        env[a] = g.placeholder(a.name)
        env[a].meta = dict(a.meta)
    res = [g.placeholder(s.name) for s in res_specs]
    if skip:
        outs = [g.call_function(torch.add, (env[m], r)) if m is not None else g.call_method("clone", (r,))
                for m, r in zip(matches, res)]
        new_res = [g.call_method("clone", (r,)) for r in res]
    else:
        def lookup(a):
            return env[a] if a in env else consts[a]
        for n in region:
            env[n] = g.node_copy(n, lookup)
        outs = [env[o] for o in touts]
        new_res = [g.call_function(torch.sub, (env[o], env[m])) if m is not None else g.call_method("clone", (env[o],))
                   for o, m in zip(touts, matches)]
        # A slice of a larger tensor (Flux's image part of [text, image]) has a storage offset; cond wants
        # both branches' outputs laid out alike, and the skip branch makes fresh tensors.
        outs = [g.call_method("clone", (x,), {"memory_format": torch.contiguous_format})
                if offsets.get(o) else x for o, x in zip(touts, outs)]
    outs = [g.call_method("contiguous", (x,)) for x in outs]
    new_res = [g.call_method("contiguous", (x,)) for x in new_res]
    g.output((*outs, *new_res))
    return fx.GraphModule(gm, g)
