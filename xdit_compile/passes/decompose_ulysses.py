"""decompose_ulysses_pass: simple `xdit::ulysses_attention` calls -> functional collectives Inductor can see.

Runs after rewrite_attention, only with compile.lowering = "inductor" and compile.decompose_collectives on.
The custom op is opaque to Inductor: the layout copies around its all-to-alls run as separate eager kernels
and its blocking all-to-all cannot overlap independent compute. Here a call is replaced by plain graph
nodes: the layout ops (which Inductor fuses into one copy kernel each way), `_c10d_functional`
all-to-all + wait (which Inductor schedules, and with compile.overlap may move), and SDPA on the local heads.

Simple case only (everything else stays on the custom op, unchanged): no mask, q/k/v of the same shape
(same head count H, no GQA, same head dim), H % N == 0 (no padded heads), every rank holding the same
number of tokens, attention backend "auto", "sdpa" or "fa3_cute". The decision depends on shapes and degrees only,
so every rank rewrites the same calls.

Legend: B batch, H heads, N ranks of the Ulysses group, h = H / N, S this rank's tokens, L = N * S, D head
dim; the leading dim of what goes into an all-to-all is the destination rank, of what comes out the source.

    before:  o_BHSD = xdit.ulysses_attention(q, k, v, None, scale, False, "g", [S, S], "auto")
    after:   x = stack([q.transpose(1, 2), k..., v...], 2)          # (B, S, 3, H, D), token-major
             x = unflatten(x, 3, [N, -1]).permute(3, 0, 1, 2, 4, 5).clone(contiguous)   # (N, B, S, 3, h, D)
             y = wait_tensor(all_to_all_single(x, [1]*N, [1]*N, "g"))  # (N, B, S, 3, h, D), N = source
             q_l = y.select(3, 0).permute(1, 0, 2, 3, 4).flatten(1, 2).transpose(1, 2)   # (B, h, L, D); k_l, v_l
             o = scaled_dot_product_attention(q_l, k_l, v_l, scale=scale)   # (B, h, L, D)
             o = o.transpose(1, 2).unflatten(1, [N, -1]).permute(1, 0, 2, 3, 4).contiguous()  # (N, B, S, h, D)
             o = wait_tensor(all_to_all_single(o, [1]*N, [1]*N, "g"))     # (N, B, S, h, D), N = heads' rank
             o_BHSD = o.permute(1, 2, 0, 3, 4).flatten(2, 3).transpose(1, 2)   # (B, H, S, D) view of (B, S, H, D)

For B = 1 the received q/k/v are views (the token blocks of the N sources are consecutive), which attention
kernels read through their strides (flash_cute, SDPA), and attention kernels that return their output in q's
token-major layout (flash_cute, SDPA's CUDA kernels) make the output's .contiguous() free. So one copy packs
q/k/v (it fuses with their producers' last op) and one unpacks the output (the out projection's input layout);
the head-major layout before session 23 copied q/k/v on arrival too, and the output twice more (measured on
one GPU standing for a ulysses-4 rank, benchmarks/results/session23/).

No shape argument holds a size other than N, so the nodes are right for the LOCAL shapes the graph runs on
(node meta keeps the full-size fake values, see README.md) and under dynamic shapes.

compile.all_to_all = "allgather_kv": no all-to-all at all; one all-gather of k and v (token-major), then SDPA
of this rank's queries over every key on all heads. Same result; it moves (N - 1) x 2 shards in one collective
instead of 2 x (N - 1) / N x 4 shards in two, and the output needs no return trip.

compile.all_to_all = "copy_engine": q, k, v and the output each go through ``xdit.a2a_start`` / ``xdit.a2a_wait``
(runtime/ce_a2a.py: copy-engine transfers straight into the peers' buffers, in the layouts SDPA and the out
projection read, so no layout copies either side); attention i uses buffer slot i % 2. The starts and waits
are placed by schedule_transfers (the next pass), which puts independent compute between them.

    tq = a2a_start(q, "g", "q", slot) ; tk = ... ; tv = ...
    o  = scaled_dot_product_attention(a2a_wait([tq], [q], "g", "q", slot), ...k..., ...v..., scale=scale)  # (B, h, L, D)
    o  = a2a_wait([a2a_start(o, "g", "o", slot)], [o], "g", "o", slot)    # (B, H, S, D), a strided view

With compile.query_parts = P (P divides N, no head chunks; only for attention whose output is not concatenated
with a tensor computed before it, see _output_has_partner) q travels rotated ("qr": block b of rank j's
queries are rank (j + 1 + b) % N's tokens), SDPA runs per query part and each part's output starts back at
once ("op"); one wait takes every part. Part p's transfer runs beside part p + 1's attention, and the part
computed last ends with the rank's own tokens (no transfer): what a FLUX double block, with nothing
independent after its attention, can hide of the output's return trip.

    tq = a2a_start(q, "g", "qr", slot) ; tk, tv as above ; q_r = a2a_wait([tq], [q], "g", "qr", slot)
    o_p = sdpa(unflatten(q_r, 2, [P, -1]).select(2, p), k_l, v_l)            # (B, h, L/P, D)   for p < P
    o   = a2a_wait([a2a_start(o_p, "g", "op", slot, p, P) for p], [o_p ...], "g", "op", slot, 0, P)

With compile.ce_in_place (the default) the producers of q, k and v write into the receive buffers (kinds qi, ki, vi,
and the output's producer oi; runtime/ce_in_place.py); with query parts q's kind is qri (rotated, its own rows in the
last block) and the output's parts stay op. Head chunks keep the plain kinds.

Attention without such a partner (not in query parts) has nothing computing beside two of its transfers: q's
(v and k move while k and q are computed; with head chunks, q's first chunk) and the output's (with head chunks,
the last chunk's). Those starts carry exposed=True, and with XDIT_CE_SM_PEERS=k SM kernels store k peers' pieces
of them over NVLink beside the copy engine, which runs a rank's peer copies one at a time (runtime/ce_a2a.py).

With compile.ulysses_chunks = C (again only for attention without such a partner) each q/k/v start sends one
head chunk (a2a_start(q, "g", "q", slot, c, C)), SDPA runs per chunk on its wait's view and each chunk's output
starts back at once; one wait takes every output chunk's token. Chunk c + 1's q/k/v transfers run beside chunk
c's attention, chunk c's output beside chunk c + 1's: what the double blocks of FLUX (no independent matmul
around their attention) can hide.

USP (`xdit::usp_attention`, ulysses x ring), with all_to_all nccl or copy_engine: the same two functional
all-to-alls inside the Ulysses group, and between them `xdit::ring_attention` over the ring group instead of SDPA
(each ring rank holds its Ulysses group's L tokens). The copy engines stay with Ulysses-only attention (on a
Ulysses subgroup they are not measured); symm_mem and allgather_kv keep the op for USP.

    before:  o_BHSD = xdit.usp_attention(q, k, v, None, scale, False, "u", "r", [S] * (U * R), "auto")
    after:   ... the all-to-all of q, k, v in "u" as above ...                            # (3, B, h, L, D)
             o = xdit.ring_attention(ql, kl, vl, None, scale, False, "r", [L] * R, "auto")  # (B, h, L, D)
             ... the output's all-to-all in "u" as above ...                              # (B, H, S, D)

compile.all_to_all = "symm_mem": each all_to_all_single + wait_tensor pair is one
``xdit.symm_all_to_all(x, "g")`` instead (runtime/symm_a2a.py: stores straight into the peers' buffers).

Head chunks (compile.ulysses_chunks = C > 1): the h local heads are cut into C chunks of h / C, and the
all-to-alls are issued so that communication runs beside attention: every chunk's q/k/v all-to-all is
started first (NCCL runs them one after another on its own stream), then per chunk: wait, SDPA, start its
output all-to-all; the output waits come last. Chunk c + 1's q/k/v transfer overlaps chunk c's attention and
chunk c's output transfer overlaps chunk c + 1's attention; only the first and the last transfer are exposed.

    x = stack([q, k, v] as (B, S, H, D), 2) -> unflatten(3, [N, C, -1]) -> permute to (C, N, B, S, 3, hc, D)
    a_c = all_to_all_single(x[c])                            for c < C    (no wait yet)
    o_c = sdpa(views of wait(a_c), as above) -> (N, B, S, hc, D) -> all_to_all_single   for c < C
    o   = stack([wait(o_c)], 3)                 # (N, B, S, C, hc, D) -> (B, S, N, C, hc, D) -> (B, S, H, D)

Head n * h + c * hc + j of the input is head c * hc + j of rank n's local heads, so chunk c of every rank
holds the same heads of the full attention. When C does not divide h, the largest divisor of h below C is
used (the report says which).
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from .shard_modulation import _arg
from ..runtime import ce_a2a, ce_in_place  # noqa: F401  (ce_in_place registers xdit::*_into)
from ..runtime import norm_rope as _norm_rope  # noqa: F401  (registers xdit::norm_rope)

aten = torch.ops.aten
c10d = torch.ops._c10d_functional

ULYSSES_OP = torch.ops.xdit.ulysses_attention.default
USP_OP = torch.ops.xdit.usp_attention.default
RING_OP = torch.ops.xdit.ring_attention.default
NORM_ROPE = torch.ops.xdit.norm_rope.default
NORM_ROPE_INTO = torch.ops.xdit.norm_rope_into.default
ATTENTION_INTO = torch.ops.xdit.attention_into.default
LINEARS_INTO = torch.ops.xdit.linears_into.default
DECOMPOSED = "decomposed: _c10d_functional all-to-all + sdpa"
CE = "decomposed: copy-engine all-to-all (xdit.a2a_start / a2a_wait) + sdpa"
ALLGATHER_KV = "decomposed: all-gather of k, v (_c10d_functional) + sdpa of the local queries on all heads"


def decompose_ulysses_pass(gm: fx.GraphModule, ctx) -> bool:
    by_node = {rec["op_node"]: rec for rec in ctx.attention_report if "op_node" in rec}
    changed = False
    slot = 0
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or n.target not in (ULYSSES_OP, USP_OP):
            continue
        mode = getattr(ctx, "all_to_all", "nccl")
        ring = None
        if n.target is USP_OP:      # (group, sizes) of the Ulysses part; the ring op's (group, sizes, backend)
            q, k, v, _mask, scale, _gqa, group, rgroup, sp_sizes, backend = n.args
            u = getattr(ctx, "ulysses", 0)
            reason = (_not_simple(n, u) or (f"usp with all_to_all = {mode!r} (nccl / copy_engine are decomposed)"
                                            if mode not in ("nccl", "copy_engine") else None))
            if not reason:
                sizes = list(sp_sizes[:u])
                ring_ce = getattr(ctx, "ring_transfer", "nccl") == "copy_engine"   # asked for explicitly
                ring = (rgroup, [u * sizes[0]] * (len(sp_sizes) // u), backend, "copy_engine" if ring_ce else "nccl")
                mode = "nccl"    # copy_engine stays with Ulysses-only attention (unmeasured on subgroups)
        else:
            q, k, v, _mask, scale, _gqa, group, sizes, _backend = n.args
            reason = _not_simple(n)
        rec = by_node.get(n.name)
        if reason:
            if rec is not None:
                rec["kept_op"] = reason
            continue
        g = gm.graph
        before = set(g.nodes)
        chunks = 1 if ring else _chunks(q.meta["example_value"].shape[1] // len(sizes),
                                        getattr(ctx, "ulysses_chunks", 1))
        parts = 1
        partner = mode == "copy_engine" and _output_has_partner(n)
        if partner:
            chunks = 1     # its transfers already run beside independent compute: cutting it would only cost
        elif mode == "copy_engine" and chunks == 1:
            parts = _chunks(len(sizes), getattr(ctx, "query_parts", 1))
        symm = mode == "symm_mem"
        with g.inserting_before(n):
            if mode == "allgather_kv":
                chunks = 1
                out = _emit_allgather_kv(g, q, k, v, scale, group, len(sizes))
            elif mode == "copy_engine":
                qv = q.meta["example_value"]      # full size; this rank holds sizes[0] of its tokens
                allowed = _in_place_kinds(ctx, qv) if chunks == 1 else ()
                if parts > 1:    # k and v travel as without parts, q rotated ("qri"), the output in parts ("op")
                    allowed = tuple(kind for kind in allowed if kind in ("qi", "ki", "vi"))
                out, in_place = _emit_copy_engine(g, q, k, v, scale, group, slot % 2, chunks, parts,
                                                  exposed=not partner, in_place=allowed, ctx=ctx)
                if hasattr(ctx, "ce_buffers"):
                    ctx.ce_buffers += ce_a2a.buffer_specs(group, len(sizes), (*qv.shape[:2], sizes[0], qv.shape[3]),
                                                          qv.dtype, qv.device, slot % 2, chunks, parts, in_place)
                slot += 1
            else:
                out = _emit(g, q, k, v, scale, group, len(sizes), chunks, symm, ring)
                if ring and ring[3] == "copy_engine" and hasattr(ctx, "ce_buffers"):   # the ring's k / v buffers
                    from ..runtime import ce_ring
                    kv = k.meta["example_value"]     # full size (B, H, L, D): after the all-to-all H / u heads
                    ctx.ce_buffers += ce_ring.buffer_specs(ring[0], len(ring[1]), (kv.shape[0], kv.shape[1] // u, 0,
                                                           kv.shape[3]), v.meta["example_value"].shape[3],
                                                           ring[1][0], kv.dtype, kv.device)
                if symm and hasattr(ctx, "symm_buffers"):    # its two calls' buffers, made before the first run
                    qv = q.meta["example_value"]
                    local = qv.numel() // qv.shape[2] * sizes[0]
                    ctx.symm_buffers += [(group, 3 * local, qv.dtype, qv.device), (group, local, qv.dtype, qv.device)]
        out.meta = {key: val for key, val in n.meta.items() if key != "xdit_attention"}  # a copy, not attention
        for x in set(g.nodes) - before:     # what attention_kernel checks: the op's q / k / v (full size)
            if x.target is F.scaled_dot_product_attention:
                x.meta["sdpa_inputs"] = tuple(a.meta.get("example_value") for a in (q, k, v))
        n.replace_all_uses_with(out)
        g.erase_node(n)
        if rec is not None:
            how = DECOMPOSED.replace("_c10d_functional", "xdit.symm_all_to_all") if symm else DECOMPOSED
            if mode == "copy_engine":
                how = CE
            if mode == "allgather_kv":
                how = ALLGATHER_KV
                kv = k.meta["example_value"]   # full size: (B, H, L, D); each rank sends its k, v shard N - 1 times
                rec["bytes"] = (len(sizes) - 1) * 2 * kv.numel() // len(sizes) * kv.element_size()
            extra = f", {chunks} head chunks" if chunks > 1 else f", {parts} query parts" if parts > 1 else ""
            if mode == "copy_engine" and in_place:
                extra += f", written in place: {' '.join(k[0] for k in in_place)}"
            if ring:
                how = how.replace("+ sdpa", f"+ ring attention over {len(ring[1])} ranks"
                                  + (" (k/v by the copy engines)" if ring[3] == "copy_engine" else ""))
            rec["became"] = f"{rec['became']} ({how}{extra})"
            rec["decomposed"] = True
        changed = True
    return changed


def _not_simple(n: fx.Node, ulysses: int = 0) -> str | None:
    """Why this call stays on the custom op (None: it is decomposed). ulysses: the Ulysses degree of a
    usp_attention call (its sizes are over every sequence-parallel rank)."""
    if n.target is USP_OP:
        q, k, v, mask, _scale, _gqa, _group, _rgroup, sizes, backend = n.args
        if ulysses < 2 or len(sizes) % ulysses:
            return f"usp with {len(sizes)} shards and ulysses degree {ulysses}"
    else:
        q, k, v, mask, _scale, _gqa, _group, sizes, backend = n.args
        ulysses = len(sizes)
    if mask is not None:
        return "mask"
    if backend not in ("auto", "sdpa", "fa3_cute"):    # fa3_cute: the attention_kernel pass swaps the SDPA node
        return f"backend {backend}"
    vals = [x.meta.get("example_value") if isinstance(x, fx.Node) else None for x in (q, k, v)]
    if not all(isinstance(x, torch.Tensor) and x.dim() == 4 for x in vals):
        return "q/k/v shapes unknown"
    if not (vals[0].shape == vals[1].shape == vals[2].shape) or len({x.dtype for x in vals}) != 1:
        return "q, k, v differ in heads, head dim or dtype"
    num = ulysses
    if not isinstance(vals[0].shape[1], int) or vals[0].shape[1] % num:
        return f"{vals[0].shape[1]} heads not divisible by {num} (padded heads)"
    if len(set(sizes)) != 1:
        return f"uneven sequence shards {list(sizes)}"
    return None


_LAYOUT = {"permute", "transpose", "reshape", "view", "flatten", "to", "contiguous", "type_as", "float",
           torch.permute, torch.transpose, torch.reshape, torch.flatten}
_CAT = {torch.cat, torch.concat, aten.cat.default}


def _output_has_partner(n: fx.Node, depth: int = 6) -> bool:
    """Whether the attention output reaches (through layout ops only) a concatenation with a tensor computed
    before the attention: FLUX's single block, proj_out(cat([attention, mlp])). There schedule_transfers already
    runs the mlp half of that linear beside the output's return trip, so query parts would only cut the attention
    in two; they are for attention whose output has nothing to run beside (FLUX's double blocks)."""
    order = {x: i for i, x in enumerate(n.graph.nodes)}
    frontier = [n]
    for _ in range(depth):
        nxt = []
        for x in frontier:
            for u in x.users:
                if u.target in _CAT:
                    others = [a for a in (u.args[0] if u.args else []) if isinstance(a, fx.Node) and a is not x]
                    if others and all(order[a] < order[n] for a in others):
                        return True
                elif u.target in _LAYOUT:
                    nxt.append(u)
        frontier = nxt
    return False


def _chunks(local_heads: int, asked: int) -> int:
    """The largest divisor of the local head count that is <= the asked chunk count."""
    return max(c for c in range(1, max(1, min(asked, local_heads)) + 1) if local_heads % c == 0)


def _emit(g: fx.Graph, q, k, v, scale, group, num: int, chunks: int = 1, symm: bool = False,
          ring: tuple | None = None) -> fx.Node:
    """ring: (ring group, ring sizes, backend) of a USP call: ring attention between the all-to-alls."""
    def call(target, *args, **kwargs):
        return g.call_function(target, args, kwargs)

    def all_to_all(x):
        if symm:
            return call(torch.ops.xdit.symm_all_to_all.default, x, group)
        splits = [1] * num
        return call(c10d.wait_tensor.default, call(c10d.all_to_all_single.default, x, splits, splits, group))

    def contiguous(x):
        return call(aten.clone.default, x, memory_format=torch.contiguous_format)

    if chunks > 1:
        if symm:
            raise ValueError("compile.all_to_all = \"symm_mem\" with compile.ulysses_chunks > 1 is not supported "
                             "(the chunked pipeline starts NCCL all-to-alls without waiting); use one of them")
        return _emit_chunked(call, all_to_all, contiguous, q, k, v, scale, group, num, chunks)
    # token-major: for B = 1 what arrives is q / k / v in the (B, L, h, D) memory attention kernels read, and the
    # output (B, L, h, D) leaves as it is, so only the send of q/k/v and the output's arrival are copies
    qkv = [call(aten.transpose.int, x, 1, 2) for x in (q, k, v)]                  # (B, S, H, D) views
    x = call(aten.unflatten.int, call(aten.stack.default, qkv, 2), 3, [num, -1])  # (B, S, 3, N, h, D)
    x = contiguous(call(aten.permute.default, x, [3, 0, 1, 2, 4, 5]))             # (N, B, S, 3, h, D)
    y = all_to_all(x)                                                             # (N, B, S, 3, h, D), N = source
    ql, kl, vl = (call(aten.transpose.int, call(aten.flatten.using_ints, call(aten.permute.default, call(
        aten.select.int, y, 3, i), [1, 0, 2, 3, 4]), 1, 2), 1, 2) for i in range(3))   # (B, h, L, D) views (B = 1)
    if ring:
        o = call(RING_OP, ql, kl, vl, None, scale, False, *ring)                  # (B, h, L, D)
    else:
        o = call(F.scaled_dot_product_attention, ql, kl, vl, scale=scale)          # (B, h, L, D)
    o = call(aten.unflatten.int, call(aten.transpose.int, o, 1, 2), 1, [num, -1])  # (B, N, S, h, D)
    o = call(torch.Tensor.contiguous, call(aten.permute.default, o, [1, 0, 2, 3, 4]))   # (N, B, S, h, D): no copy
    o = all_to_all(o)                                                             # (N, B, S, h, D), N = heads' rank
    o = call(aten.flatten.using_ints, call(aten.permute.default, o, [1, 2, 0, 3, 4]), 2, 3)   # (B, S, H, D)
    return call(aten.transpose.int, o, 1, 2)                                      # (B, H, S, D) view


def _in_place_kinds(ctx, qv) -> tuple:
    """compile.ce_in_place: the transfers whose producer may write into the receive buffer (runtime/ce_in_place.py):
    q and k (when xdit::norm_rope makes them), v (when linears that fuse_linears leaves alone make it), the output
    when the attention kernel writes through strides (attention backend fa3_cute; off CUDA the same math, so the
    tests run it)."""
    if not getattr(ctx, "ce_in_place", False):
        return ()
    cuda = getattr(getattr(qv, "device", None), "type", "cpu") == "cuda"
    return ("qi", "ki", "vi") + (("oi",) if getattr(ctx, "attention_backend", "auto") == "fa3_cute" or not cuda
                                 else ())


_PERMUTE = {"permute", torch.permute, aten.permute.default}
_TRANSPOSE = {"transpose", torch.transpose, aten.transpose.int}


def _norm_rope_into(g: fx.Graph, x: fx.Node, kind: str, group, slot: int) -> bool:
    """x = (B, H, S, D) view of an xdit::norm_rope output nothing else reads: that op becomes xdit::norm_rope_into,
    which writes into the in-place receive buffer of `kind`. Whether it did."""
    if not isinstance(x, fx.Node) or not x.args or not isinstance(x.args[0], fx.Node):
        return False
    nr, dims = x.args[0], tuple(a for a in x.args[1:] if isinstance(a, int))
    if not ((x.target in _PERMUTE and dims in ((0, 2, 1, 3),)) or (x.target in _TRANSPOSE and set(dims) == {1, 2})):
        return False
    if nr.op != "call_function" or nr.target is not NORM_ROPE or len(nr.args) < 8:
        return False
    # x, and what only takes its dtype (Wan: the attention output's type_as(query))
    if any(u is not x and not (u.target == "type_as" and u.args[1:] == (nr,)) for u in nr.users):
        return False
    args = [nr.args[i] if i < len(nr.args) else nr.kwargs.get("round_first", False) for i in range(9)]
    with g.inserting_before(nr):
        new = g.call_function(NORM_ROPE_INTO, (*args, group, kind, slot))
    new.meta = dict(nr.meta)
    nr.replace_all_uses_with(new)
    g.erase_node(nr)
    return True


_RESHAPE = {"reshape", "view", "unflatten", torch.reshape, aten.view.default, aten.reshape.default,
            aten.unflatten.int}


def _linears_into(g: fx.Graph, x: fx.Node, kind: str, group, slot: int, ctx) -> bool:
    """x = (B, H, S, D) view of [B, S, H, D] made by linears only (reshape(linear(a)), or FLUX's cat of the text and
    image projections along S) that nothing else reads: one xdit::linears_into writes them into the in-place receive
    buffer of `kind` instead. Not where fuse_linears would join the linear with its siblings (at most MAX_ROWS rows
    per rank: a joined GEMM is worth more there). Whether it did."""
    from .fuse_linears import _LINEAR, MAX_ROWS, _local_rows
    if not isinstance(x, fx.Node) or not x.args or not isinstance(x.args[0], fx.Node):
        return False
    y, dims = x.args[0], tuple(a for a in x.args[1:] if isinstance(a, int))
    if not ((x.target in _PERMUTE and dims == (0, 2, 1, 3)) or (x.target in _TRANSPOSE and set(dims) == {1, 2})):
        return False
    if y.target in _CAT:
        dim = y.args[1] if len(y.args) > 1 else y.kwargs.get("dim", 0)
        parts = list(y.args[0]) if dim in (1, -3) else []
    else:
        parts = [y]
    if not parts or len(y.users) != 1:
        return False
    lins = []
    for p in parts:
        if not isinstance(p, fx.Node) or p.target not in _RESHAPE or len(p.users) != 1 or not p.args:
            return False
        lin = p.args[0]
        if not (isinstance(lin, fx.Node) and lin.op == "call_function" and lin.target in _LINEAR
                and len(lin.users) == 1):
            return False
        pv, lv = p.meta.get("example_value"), lin.meta.get("example_value")
        if not (isinstance(pv, torch.Tensor) and isinstance(lv, torch.Tensor) and pv.dim() == 4 and lv.dim() == 3
                and tuple(pv.shape[:2]) == tuple(lv.shape[:2]) and pv.shape[2] * pv.shape[3] == lv.shape[2]):
            return False
        if getattr(ctx, "fuse_linears", False) and _local_rows(lin.args[0], ctx) <= MAX_ROWS:
            return False
        lins.append(lin)
    heads = y.meta["example_value"].shape[2]
    args = [(_arg(n, 0, "input"), _arg(n, 1, "weight"), _arg(n, 2, "bias")) for n in lins]
    with g.inserting_before(y):
        new = g.call_function(LINEARS_INTO, ([a[0] for a in args], [a[1] for a in args], [a[2] for a in args], heads,
                                             group, kind, slot))
    new.meta = dict(y.meta)
    y.replace_all_uses_with(new)
    for n in dict.fromkeys([y, *parts, *lins]):     # what made y, now unused
        g.erase_node(n)
    return True


def _emit_copy_engine(g: fx.Graph, q, k, v, scale, group, slot: int, chunks: int = 1, parts: int = 1,
                      exposed: bool = False, in_place=(), ctx=None) -> tuple[fx.Node, tuple]:
    """q, k, v transfers per head chunk, SDPA per chunk, each chunk's output sent back as soon as it is computed;
    one wait for all output chunks (schedule_transfers places starts early and waits late). parts > 1: SDPA per
    query part of the rotated q instead, each part's output sent back at once. exposed: an output without a
    partner, so q's transfer (of the first chunk) and the output's (of the last) have no compute beside them: those
    starts say so (XDIT_CE_SM_PEERS). in_place: the in-place kinds allowed (one chunk; with query parts qi (as qri),
    ki and vi); returns the output and the in-place kinds used."""
    start, wait = torch.ops.xdit.a2a_start.default, torch.ops.xdit.a2a_wait.default
    qi = "qri" if parts > 1 else "qi"      # query parts: q rotated, the own rows last
    used = tuple(kind for kind, x in ((qi, q), ("ki", k)) if kind[0] + kind[-1] in in_place
                 and _norm_rope_into(g, x, kind, group, slot))
    used += ("vi",) if "vi" in in_place and _linears_into(g, v, "vi", group, slot, ctx) else ()
    used += ("oi",) if "oi" in in_place else ()
    kinds = {base: base + "i" if base + "i" in used else base for base in "qkvo"}
    if in_place and parts == 1:
        tokens = {kind: g.call_function(start, (x, group, kinds[kind], slot, 0, 1),
                                        {"exposed": True} if exposed and kind == "q" else {})
                  for kind, x in (("v", v), ("k", k), ("q", q))}
        # an in-place kind's wait does not take x (a view of the buffer it returns a view of): see ce_a2a._token
        got = [g.call_function(wait, ([tokens[kind]], [] if kinds[kind] in used else [x], group, kinds[kind], slot,
                                      0, 1)) for kind, x in (("q", q), ("k", k), ("v", v))]
        if "oi" in used:
            o = g.call_function(ATTENTION_INTO, (*got, scale, group, slot))
        else:
            o = g.call_function(F.scaled_dot_product_attention, tuple(got), {"scale": scale})
        sent = g.call_function(start, (o, group, kinds["o"], slot, 0, 1), {"exposed": True} if exposed else {})
        return g.call_function(wait, ([sent], [] if "oi" in used else [o], group, kinds["o"], slot, 0, 1)), used
    if parts > 1:     # q, k and v may be in place (qri, ki, vi), the output is not
        qkv = ((kinds["v"], v), (kinds["k"], k), ("qri" if "qri" in used else "qr", q))
        tokens = {kind: g.call_function(start, (x, group, kind, slot, 0, 1)) for kind, x in qkv}
        got = {"qr" if kind[:2] == "qr" else kind[0]: g.call_function(
            wait, ([tokens[kind]], [] if kind in used else [x], group, kind, slot, 0, 1)) for kind, x in qkv}
        qs = g.call_function(aten.unflatten.int, (got["qr"], 2, [parts, -1]))        # (B, h, P, L/P, D)
        outs, sent = [], []
        for p in range(parts):
            qp = g.call_function(aten.select.int, (qs, 2, p))
            o = g.call_function(F.scaled_dot_product_attention, (qp, got["k"], got["v"]), {"scale": scale})
            outs.append(o)                                                        # (B, h, L/P, D)
            sent.append(g.call_function(start, (o, group, "op", slot, p, parts)))
        return g.call_function(wait, (sent, outs, group, "op", slot, 0, parts)), used   # (B, H, S, D), strided view
    qkv = (("v", v), ("k", k), ("q", q))

    def kw(kind: str, c: int) -> dict:
        # what waits with nothing beside it: q's first chunk (v and k move while k and q are computed, later
        # chunks beside the attention of earlier ones) and the last chunk's output
        first_or_last = (kind == "q" and c == 0) or (kind == "o" and c == chunks - 1)
        return {"exposed": True} if exposed and first_or_last else {}
    tokens = {(kind, c): g.call_function(start, (x, group, kind, slot, c, chunks), kw(kind, c)) for kind, x in qkv
              for c in range(chunks)}
    outs, sent = [], []
    for c in range(chunks):
        got = {kind: g.call_function(wait, ([tokens[kind, c]], [x], group, kind, slot, c, chunks)) for kind, x in qkv}
        o = g.call_function(F.scaled_dot_product_attention, (got["q"], got["k"], got["v"]), {"scale": scale})
        outs.append(o)                                                            # (B, h/C, L, D)
        sent.append(g.call_function(start, (o, group, "o", slot, c, chunks), kw("o", c)))
    return g.call_function(wait, (sent, outs, group, "o", slot, 0, chunks)), ()   # (B, H, S, D), a strided view


def _emit_allgather_kv(g: fx.Graph, q, k, v, scale, group, num: int) -> fx.Node:
    """Every rank gathers all keys and values (one all-gather) and attends its own queries on all heads.

    k/v travel token-major, (B, S, 2, H, D), so for B = 1 the gathered (N * S, 2, H, D) is the whole sequence
    in order and k, v are strided views of it (no copy); the output is already this rank's (B, H, S, D).
    """
    def call(target, *args, **kwargs):
        return g.call_function(target, args, kwargs)

    kt, vt = (call(aten.transpose.int, x, 1, 2) for x in (k, v))                    # (B, S, H, D)
    kv = call(aten.clone.default, call(aten.stack.default, [kt, vt], 2),
              memory_format=torch.contiguous_format)                              # (B, S, 2, H, D)
    y = call(c10d.wait_tensor.default, call(c10d.all_gather_into_tensor.default, kv, num, group))  # (N*B, S, 2, H, D)
    y = call(aten.unflatten.int, y, 0, [num, -1])                                 # (N, B, S, 2, H, D)
    y = call(aten.flatten.using_ints, call(aten.transpose.int, y, 0, 1), 1, 2)    # (B, L, 2, H, D)
    kf, vf = (call(aten.transpose.int, call(aten.select.int, y, 2, i), 1, 2) for i in range(2))  # (B, H, L, D)
    return call(F.scaled_dot_product_attention, q, kf, vf, scale=scale)


def _emit_chunked(call, all_to_all, contiguous, q, k, v, scale, group, num: int, chunks: int) -> fx.Node:
    """Head chunks on the nccl path, in _emit's token-major layout: every chunk's q/k/v all-to-all started first,
    then per chunk its wait, SDPA and output all-to-all; the output waits last (see the module doc)."""
    splits = [1] * num
    qkv = [call(aten.transpose.int, x, 1, 2) for x in (q, k, v)]                   # (B, S, H, D) views
    x = call(aten.unflatten.int, call(aten.stack.default, qkv, 2), 3, [num, chunks, -1])   # (B, S, 3, N, C, hc, D)
    x = contiguous(call(aten.permute.default, x, [4, 3, 0, 1, 2, 5, 6]))          # (C, N, B, S, 3, hc, D)
    started = [call(c10d.all_to_all_single.default, call(aten.select.int, x, 0, c), splits, splits, group)
               for c in range(chunks)]                                            # all q/k/v transfers queued
    outs = []
    for a in started:
        y = call(c10d.wait_tensor.default, a)                                     # (N, B, S, 3, hc, D), N = source
        ql, kl, vl = (call(aten.transpose.int, call(aten.flatten.using_ints, call(aten.permute.default, call(
            aten.select.int, y, 3, i), [1, 0, 2, 3, 4]), 1, 2), 1, 2) for i in range(3))   # (B, hc, L, D) views
        o = call(F.scaled_dot_product_attention, ql, kl, vl, scale=scale)          # (B, hc, L, D)
        o = call(aten.unflatten.int, call(aten.transpose.int, o, 1, 2), 1, [num, -1])   # (B, N, S, hc, D)
        o = call(torch.Tensor.contiguous, call(aten.permute.default, o, [1, 0, 2, 3, 4]))   # (N, B, S, hc, D)
        outs.append(call(c10d.all_to_all_single.default, o, splits, splits, group))
    o = call(aten.stack.default, [call(c10d.wait_tensor.default, a) for a in outs], 3)   # (N, B, S, C, hc, D)
    o = call(aten.flatten.using_ints, call(aten.permute.default, o, [1, 2, 0, 3, 4, 5]), 2, 4)   # (B, S, H, D)
    return call(aten.transpose.int, o, 1, 2)                                      # (B, H, S, D) view
