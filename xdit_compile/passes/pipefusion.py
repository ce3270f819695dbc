"""pipefusion_pass: split the block stack into stages, patches of the sequence through them, stale-KV attention.

Terms: *stage* s = a contiguous run of blocks (find_blocks.py) run by pipefusion rank s; *patch* m = the m-th
of ``num_patches`` pieces of every sequence unit (text and image segments alike, as in shard_sequence), cut
inside this rank's sequence-parallel shard, so the union of the patches is exactly what a full call holds;
*full program* / *patch program* = the graph split (``split_module`` on ``xdit::pipe_split`` markers) into
prologue | stage 0 | ... | stage N-1 | epilogue, run on the whole sequence / on patch m.

    captured:  prologue | block 0 .. block k | block k+1 .. block n-1 | epilogue
    marked:    prologue | pipe_split | blocks of stage 0 | pipe_split | blocks of stage 1 | pipe_split | epilogue
    full:      the core passes (cfg split, sequence sharding), each sequence attention -> PFAttention(full)
    patch m:   epilogue dropped (outputs = the stack's live values), shard_sequence with the patch-m layout and
               outputs left LOCAL, each sequence attention -> PFAttention(patch m: write K/V at the patch's
               buffer positions, attend over the whole buffer)
    ring:      the ring group is in one stage on one patch; each ring rank's buffer holds its own token
               shard, and PFAttention runs the ring over the buffers (xDiT's pipefusion x ring hybrid)

The runtime (runtime/pipefusion.py) runs the full program for warm-up calls and the patch programs after,
puts the last stage's patch outputs back in place and runs the full epilogue. Each rank keeps only its
stage's parameters (``free_ids``: the other stages' parameter tensors, for the caller to drop).
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.passes.split_module import split_module

from ..runtime.pipefusion import KVState, P2P, PFAttention, PipeFusionRunner, Program
from . import token_dims as td
from .find_blocks import find_blocks
from .shard_sequence import Axis, ShardContext, choose_units, even_layout, shard_sequence_pass
from .split_cfg import split_cfg_pass
from .token_dims import arg

_MARK = torch.ops.xdit.pipe_split.default


def split_stages(numels: list[int], n: int) -> list[tuple[int, int]]:
    """Contiguous block ranges [start, stop) per stage, balanced by parameter count (block count if none)."""
    if len(numels) < n:
        raise ValueError(f"parallel.pipefusion={n} needs at least {n} transformer blocks; this model has "
                         f"{len(numels)}")
    w = numels if sum(numels) else [1] * len(numels)
    cum = [0]
    for x in w:
        cum.append(cum[-1] + x)
    cuts = [0]
    for s in range(1, n):
        lo, hi = cuts[-1] + 1, len(w) - (n - s)
        best = min(range(lo, hi + 1), key=lambda i: abs(cum[i] - cum[-1] * s / n))
        cuts.append(best)
    cuts.append(len(w))
    return [(cuts[i], cuts[i + 1]) for i in range(n)]


def mark_stages(gm: fx.GraphModule, stack, ranges) -> None:
    g = gm.graph
    with g.inserting_before(stack.blocks[0].first):
        g.call_function(_MARK, ())
    for _, stop in ranges:
        with g.inserting_after(stack.blocks[stop - 1].last):
            g.call_function(_MARK, ())


def copy_graph(gm: fx.GraphModule) -> fx.GraphModule:
    g = fx.Graph()
    out = g.graph_copy(gm.graph, {})
    g.output(out)
    return fx.GraphModule(gm, g)


def _is_mark(n):
    return n.op == "call_function" and n.target is _MARK


def split(gm: fx.GraphModule) -> fx.GraphModule:
    """split_module at the markers: partition = number of markers before the node."""
    part, k = {}, 0
    for n in list(gm.graph.nodes):
        if _is_mark(n):
            k += 1
            gm.graph.erase_node(n)
        else:
            part[n] = k
    gm.recompile()
    return split_module(gm, gm, lambda n: part[n], keep_original_order=True, keep_original_node_name=True)


def truncate(gm: fx.GraphModule) -> list[str]:
    """Drop the epilogue: the graph returns the values the blocks make and the epilogue reads."""
    nodes = list(gm.graph.nodes)
    marks = [i for i, n in enumerate(nodes) if _is_mark(n)]
    first, last = marks[0], marks[-1]
    order = {n: i for i, n in enumerate(nodes)}
    live = [n for n in nodes[first:last] if any(order[u] > last for u in n.users)]
    out = next(n for n in nodes if n.op == "output")
    gm.graph.erase_node(out)
    for n in reversed(nodes[last + 1:]):
        if n.op != "output":
            gm.graph.erase_node(n)
    gm.graph.output(tuple(live))
    gm.recompile()
    return [n.name for n in live]


class _Sub:
    """The slice of CompileContext that split_cfg_pass reads and writes."""

    def __init__(self, an, cfg_size):
        self.analysis, self.cfg_size = an, cfg_size
        self.unit_axis, self.layout = {}, {}


def _axes(ctx):
    axes = {"sp": Axis(ctx.sp_rank, ctx.sp_size, ctx.group_name("sp"))}
    if ctx.cfg_split:
        axes["cfg"] = Axis(ctx.cfg_rank, ctx.cfg_size, ctx.group_name("cfg"))
        axes["cfg+sp"] = Axis(ctx.cfg_rank * ctx.sp_size + ctx.sp_rank, ctx.cfg_size * ctx.sp_size,
                              ctx.group_name("cfg+sp"))
    return axes


def shard_patch(gm, ctx, m: int, num_patches: int):
    """Run shard_sequence on a truncated copy with the patch-m layout. Returns (patch ctx, full ctx)."""
    an = td.analyze(gm)
    units, _ = choose_units(an)
    if not units:
        raise ValueError("parallel.pipefusion needs a self-attention sequence to cut into patches; "
                         "this graph has none")
    sub = _Sub(an, ctx.cfg_size)
    if ctx.cfg_split:
        split_cfg_pass(gm, sub)
    full, patch = dict(sub.layout), dict(sub.layout)
    unit_axis = dict(sub.unit_axis)
    for u in units:
        unit_axis[u] = "sp"
        full[u] = even_layout(an.classes.size[u], ctx.sp_size)
        patch[u] = []
        for start, length in full[u]:
            s, n = even_layout(length, num_patches)[m]
            patch[u].append((start + s, n))
    # A short segment (7 text tokens in 8 patches) may be empty in a patch; the patch itself may not.
    if any(sum(patch[u][r][1] for u in units) < 1 for r in range(ctx.sp_size)):
        raise ValueError(f"pipefusion.num_patches={num_patches} leaves patch {m} without tokens "
                         f"(sequence segments {[an.classes.size[u] for u in units]} over "
                         f"{ctx.sp_size} sequence-parallel ranks); use fewer patches")
    axes = _axes(ctx)
    pctx = ShardContext(an=an, unit_axis=unit_axis, layout=patch, axes=axes, whole_outputs=False)
    fctx = ShardContext(an=an, unit_axis=unit_axis, layout=full, axes=axes)
    shard_sequence_pass(gm, pctx)
    return pctx, fctx


def _attention_nodes(gm):
    return [n for n in gm.graph.nodes if (n.meta.get("xdit_attention") or {}).get("kind") == "sequence"]


def _replace_attention(gm, n, module: torch.nn.Module, name: str):
    mask = arg(n, 3, "attn_mask")
    gm.add_submodule(name, module)
    q, k, v = (arg(n, i, nm) for i, nm in enumerate(("query", "key", "value")))
    with gm.graph.inserting_before(n):
        new = gm.graph.call_module(name, (q, k, v, mask))
    new.meta = dict(n.meta)
    n.replace_all_uses_with(new)
    gm.graph.erase_node(n)


def _attn_args(n):
    scale = n.kwargs.get("scale", n.args[6] if len(n.args) > 6 else None)
    if arg(n, 5, "is_causal", False):
        raise ValueError(f"attention {n.name}: causal attention is not supported by pipefusion")
    return scale, bool(n.kwargs.get("enable_gqa", False))


def build_pipefusion(gm: fx.GraphModule, example_inputs, ctx, run_core, *, num_patches: int,
                     warmup_steps: int):
    """The runner for this rank, the ids of the example inputs (parameters) it may free, and a report."""
    dims = ctx.dims
    n_stages, stage = dims.axis_size("pipefusion"), dims.axis_rank("pipefusion")
    stack = find_blocks(gm)
    if stack is None:
        raise ValueError("parallel.pipefusion needs the model's transformer blocks (an nn.ModuleList at the top "
                         "level of the model) in one captured graph; none found")
    ranges = split_stages([b.numel for b in stack.blocks], n_stages)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    free = [id(example_inputs[placeholders.index(p)]) for s, (a, b) in enumerate(ranges) if s != stage
            for blk in stack.blocks[a:b] for p in blk.params]
    stage_numel = [sum(blk.numel for blk in stack.blocks[a:b]) for a, b in ranges]
    mark_stages(gm, stack, ranges)
    sp, nu = ctx.sp_size, ctx.ulysses
    # This rank's Ulysses group = sp ranks mine[0] .. mine[-1] (sp is ring-major); with ring, the KV buffer
    # holds that group's token shard, and the other ring ranks' buffers come around the ring.
    mine = range(dims.axis_rank("ring") * nu, (dims.axis_rank("ring") + 1) * nu)
    ulysses_group = ctx.group_name("ulysses") if nu > 1 else None
    ring_group = ctx.group_name("ring") if ctx.ring > 1 else None
    states: dict[str, KVState] = {}

    def attention(state, index, scale, gqa, seq_sizes, ring_sizes):
        return PFAttention(state, index, scale, gqa, ulysses_group, seq_sizes[mine[0]:mine[-1] + 1],
                           ctx.attention_backend, ring_group, ring_sizes if ring_group else None)

    # --- patch programs ---------------------------------------------------------------------------------
    patches, names, pieces, input_boxes, out_dtypes = [], None, [], [], []
    for m in range(num_patches):
        g = copy_graph(gm)
        names = truncate(g)
        pctx, fctx = shard_patch(g, ctx, m, num_patches)
        out_args = next(n for n in g.graph.nodes if n.op == "output").args[0]
        pieces.append([_piece(pctx, fctx, a, local) for a, local in zip(out_args, pctx.local_outputs)])
        # what patch m reads of each input (the displaced loop feeds the latent patch by patch)
        input_boxes.append([_input_box(pctx, p) for p in g.graph.nodes if p.op == "placeholder"])
        out_dtypes = [getattr(a.meta.get("example_value"), "dtype", None) if isinstance(a, fx.Node) else None
                      for a in out_args]
        for i, n in enumerate(_attention_nodes(g)):
            if arg(n, 3, "attn_mask") is not None:
                raise ValueError(f"attention {n.name} has a mask over the joint sequence; pipefusion does not "
                                 "support masked self-attention yet")
            scale, gqa = _attn_args(n)
            c = pctx.an.dims[arg(n, 0, "query")][-2]
            full_sizes = [len(fctx.positions(c, {"sp": r})) for r in range(sp)]
            index, off = [], 0
            for r in mine:
                at = {p: j for j, p in enumerate(fctx.positions(c, {"sp": r}))}
                index += [off + at[p] for p in pctx.positions(c, {"sp": r})]
                off += full_sizes[r]
            ring_sizes = [sum(full_sizes[j:j + nu]) for j in range(0, sp, nu)]
            mod = attention(states.setdefault(n.name, KVState()), index, scale, gqa,
                            n.meta["xdit_attention"]["seq_sizes"], ring_sizes)
            _replace_attention(g, n, mod, f"xdit_pf_attn_{i}")
        g.graph.lint()
        g.recompile()
        patches.append(Program(split(g), n_stages))
    assemble = []
    for i, name in enumerate(names):
        dim, _, shape = pieces[0][i]
        assemble.append((name, dim, [p[i][1] for p in pieces] if dim is not None else None, shape))

    # --- the full program -------------------------------------------------------------------------------
    f = copy_graph(gm)
    run_core(f, ctx)
    by_name = {n.name: n for n in f.graph.nodes}
    for i, name in enumerate(states):
        n = by_name.get(name)
        if n is None:
            raise ValueError(f"pipefusion: attention {name} of the patch program is missing from the full one")
        info = n.meta.get("xdit_attention") or {}
        if sp > 1 and info.get("kind") != "sequence":
            raise ValueError(f"pipefusion: attention {name} is sharded in patches but not over the sequence")
        scale, gqa = _attn_args(n)
        sizes = info.get("seq_sizes", [0] * sp)
        ring_sizes = [sum(sizes[j:j + nu]) for j in range(0, sp, nu)]
        _replace_attention(f, n, attention(states[name], None, scale, gqa, sizes, ring_sizes), f"xdit_pf_attn_{i}")
    f.graph.lint()
    f.recompile()
    out_node = next(n for n in f.graph.nodes if n.op == "output")
    outs = out_node.args[0] if isinstance(out_node.args[0], (tuple, list)) else (out_node.args[0],)
    out_meta = []
    for o in outs:
        v = o.meta.get("example_value") if isinstance(o, fx.Node) else None
        out_meta.append((tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else (None, None))
    full = Program(split(f), n_stages)
    epi = {}
    for name in names:
        node = full.by_name.get(name)
        if node is None:
            raise ValueError(f"pipefusion: value {name} that the epilogue reads is missing from the full program")
        epi[name] = node
    report = {
        "stages": [{"rank": s, "blocks": [b.name for b in stack.blocks[a:z]], "params": stage_numel[s]}
                   for s, (a, z) in enumerate(ranges)],
        "num_patches": num_patches,
        "warmup_steps": warmup_steps,
        "patch_tokens": _patch_tokens(pieces, names),
        "attention_layers": len(states),
        "kv_buffer": _kv_buffer_text(nu, ctx.ring),
    }
    p2p = P2P(ctx.group_name("pipefusion"), dims.device)
    runner = PipeFusionRunner(full=full, patches=patches, assemble=assemble, epilogue_inputs=epi, stage=stage,
                              num_stages=n_stages, warmup_steps=warmup_steps, p2p=p2p, out_meta=out_meta,
                              report=report)
    runner.input_boxes = {j: [ib[j] for ib in input_boxes] for j in range(len(input_boxes[0]))
                          if input_boxes[0][j]}
    runner.assemble_dtypes = out_dtypes
    return runner, set(free), report


def _piece(pctx, fctx, a, local: bool):
    """Where patch output ``a`` goes in the full-call value: (dim, index, full-call shape) or Nones."""
    if not local or not isinstance(a, fx.Node):
        return None, None, None
    dims = pctx.an.dims.get(a)
    shape = list(td._shape(a))
    where = None
    for i, c in enumerate(dims):
        if not pctx.sharded(c):
            continue
        shape[i] = fctx.local_size(c)
        p, full = pctx.positions(c), fctx.positions(c)
        if p != full:
            if where is not None:
                raise ValueError(f"pipefusion: value {a.name} has two patch-split dims")
            at = {x: j for j, x in enumerate(full)}
            where = (i, torch.tensor([at[x] for x in p], dtype=torch.long))
    if where is None:
        return None, None, None
    return where[0], where[1], tuple(shape)


def _input_box(pctx, p) -> dict:
    """{dim: (axes, positions in the whole input)} for the dims of input ``p`` that patch m reads in part."""
    dims = pctx.an.dims.get(p)
    if not isinstance(dims, list) or td._shape(p) is None:
        return {}
    return {i: (pctx.axes_of(c), torch.tensor(pctx.positions(c), dtype=torch.long))
            for i, c in enumerate(dims) if pctx.sharded(c)}


def _patch_tokens(pieces, names) -> list[int]:
    """Tokens per patch along the first patch-split value (the hidden states at the end of the stack)."""
    for i in range(len(names)):
        if pieces[0][i][0] is not None:
            return [len(p[i][1]) for p in pieces]
    return []


def _kv_buffer_text(nu: int, nr: int) -> str:
    heads = f"this rank's heads after the Ulysses all-to-all over {nu} ranks" if nu > 1 else "all heads"
    if nr == 1:
        return f"the whole sequence, {heads}; attention is local"
    return (f"this ring rank's token shard, {heads}; a patch's queries attend over every shard, K/V passed "
            f"around the ring of {nr} ranks (LSE merge)")
