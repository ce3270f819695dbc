"""decompose_ulysses_pass: simple Ulysses attention -> `_c10d_functional` all-to-all + SDPA under Inductor.

Unit tests on a small hand-built graph (what is decomposed, what stays on the custom op, numerics against
the op in one process), then end to end: tiny diffusers Flux and Wan, ulysses = 2 on two gloo ranks,
lowering inductor, compared with the unparallelized model; the compiled graph holds
`_c10d_functional.all_to_all_single` and no `xdit.ulysses_attention` with decompose_collectives on, and the
custom op with it off. One ``run_distributed`` call runs every case (Inductor compiles dominate).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import types

import pytest
import torch
import torch.fx as fx
from dist_utils import each_case, run_distributed
from models import MODELS

import xdit_compile  # noqa: F401  (registers the xdit:: ops)
from xdit_compile.passes.decompose_ulysses import RING_OP, ULYSSES_OP, USP_OP, decompose_ulysses_pass

REL_TOL = 1e-4
A2A = "_c10d_functional.all_to_all_single"
ULYSSES = "xdit.ulysses_attention"
USP, RING = "xdit.usp_attention", "xdit.ring_attention"
SYMM = "xdit.symm_all_to_all"
CE_START, CE_WAIT = "xdit.a2a_start", "xdit.a2a_wait"


# --- unit: the pass on a hand-built graph -------------------------------------------------------------


def _graph(q_shape, k_shape, sizes, mask=False, backend="auto", dtype=torch.float32):
    """placeholder q, k, v (, mask) -> xdit.ulysses_attention -> output, with full-size fake meta."""
    g = fx.Graph()
    q, k, v = (g.placeholder(n) for n in "qkv")
    for node, shape in zip((q, k, v), (q_shape, k_shape, k_shape)):
        node.meta["example_value"] = torch.empty(shape, device="meta", dtype=dtype)
    m = g.placeholder("m") if mask else None
    att = g.call_function(ULYSSES_OP, (q, k, v, m, None, False, "g", sizes, backend))
    g.output(att)
    gm = fx.GraphModule(torch.nn.Module(), g)
    ctx = types.SimpleNamespace(attention_report=[{"node": "sdpa", "op_node": att.name, "became": "ulysses x2"}])
    return gm, ctx


def _targets(gm):
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("q_shape,k_shape,sizes,mask,reason", [
    ((1, 4, 8, 16), (1, 4, 8, 16), [4, 4], True, "mask"),
    ((1, 4, 8, 16), (1, 2, 8, 16), [4, 4], False, "q, k, v differ"),          # GQA
    ((1, 3, 8, 16), (1, 3, 8, 16), [4, 4], False, "not divisible"),           # padded heads
    ((1, 4, 7, 16), (1, 4, 7, 16), [4, 3], False, "uneven"),
])
def test_not_simple_kept(q_shape, k_shape, sizes, mask, reason):
    gm, ctx = _graph(q_shape, k_shape, sizes, mask)
    assert not decompose_ulysses_pass(gm, ctx)
    assert _targets(gm) == [str(ULYSSES_OP)]
    assert reason in ctx.attention_report[0]["kept_op"]


def test_simple_decomposed():
    gm, ctx = _graph((2, 4, 8, 16), (2, 4, 8, 16), [4, 4])
    assert decompose_ulysses_pass(gm, ctx)
    gm.graph.lint()
    targets = _targets(gm)
    assert str(ULYSSES_OP) not in targets
    assert targets.count("_c10d_functional.all_to_all_single.default") == 2   # q/k/v together, then out
    assert targets.count("_c10d_functional.wait_tensor.default") == 2
    assert ctx.attention_report[0]["decomposed"]


@pytest.mark.parametrize("chunks", [1, 2])
def test_decomposed_layout_copies(chunks):
    """The nccl path's layouts (batch 1, with and without head chunks): q/k/v reach SDPA as views of what the
    all-to-all delivered (no copy on arrival), and the result is a (B, H, S, D) view of (B, S, H, D) memory, what
    the out projection reads. Each all-to-all is an identity here (one process): the layouts, not the exchange,
    are under test."""
    gm, ctx = _graph((1, 4, 8, 16), (1, 4, 8, 16), [4, 4])
    ctx.ulysses_chunks = chunks
    assert decompose_ulysses_pass(gm, ctx)
    assert _targets(gm).count("_c10d_functional.all_to_all_single.default") == 2 * chunks
    for n in list(gm.graph.nodes):
        if str(n.target) == "_c10d_functional.wait_tensor.default":
            n.replace_all_uses_with(n.args[0].args[0])      # wait(all_to_all(x)) -> x
            gm.graph.erase_node(n)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    seen = {}

    class Watch(fx.Interpreter):
        def call_function(self, target, args, kwargs):
            out = super().call_function(target, args, kwargs)
            if target is torch.ops.aten.clone.default and "packed" not in seen:
                seen["packed"] = out
            if target is torch.nn.functional.scaled_dot_product_attention:
                seen["sdpa"] = seen.get("sdpa", ()) + tuple(args[:3])
            return out

    q, k, v = (torch.randn(1, 4, 4, 16).transpose(1, 2).contiguous().transpose(1, 2) for _ in range(3))
    out = Watch(gm).run(q, k, v)
    packed = seen["packed"].untyped_storage().data_ptr()
    assert len(seen["sdpa"]) == 3 * chunks
    assert all(x.untyped_storage().data_ptr() == packed for x in seen["sdpa"]), "q/k/v copied on arrival"
    assert out.shape == (1, 4, 4, 16) and out.transpose(1, 2).is_contiguous(), out.stride()


@pytest.mark.parametrize("mode,dtype,swapped", [("nccl", torch.bfloat16, 1), ("copy_engine", torch.bfloat16, 1),
                                                ("nccl", torch.float32, 0)])
def test_fa3_cute_backend_decomposed_then_kernel(mode, dtype, swapped):
    """Backend fa3_cute is decomposed like auto; attention_kernel then puts xdit.fa3_attention in place of the SDPA
    decompose_ulysses emitted (float16 / bfloat16 only: the kernel's dtypes)."""
    from xdit_compile.passes.attention_kernel import attention_kernel_pass

    gm, ctx = _graph((1, 4, 8, 16), (1, 4, 8, 16), [4, 4], backend="fa3_cute", dtype=dtype)
    ctx.all_to_all, ctx.attention_backend, ctx.fuse_report = mode, "fa3_cute", {}
    assert decompose_ulysses_pass(gm, ctx)
    assert attention_kernel_pass(gm, ctx) == bool(swapped)
    gm.graph.lint()
    targets = _targets(gm)
    assert targets.count("xdit.fa3_attention.default") == swapped == ctx.fuse_report["fa3_attention"]
    assert sum("scaled_dot_product_attention" in t for t in targets) == 1 - swapped


def _usp_graph(sizes, mode="nccl"):
    """placeholder q, k, v -> xdit.usp_attention (ulysses 2 x ring 2, groups "u" / "r") -> output."""
    g = fx.Graph()
    q, k, v = (g.placeholder(n) for n in "qkv")
    for node in (q, k, v):
        node.meta["example_value"] = torch.empty(1, 4, 16, 8, device="meta")
    att = g.call_function(USP_OP, (q, k, v, None, 0.5, False, "u", "r", sizes, "auto"))
    g.output(att)
    gm = fx.GraphModule(torch.nn.Module(), g)
    ctx = types.SimpleNamespace(attention_report=[{"node": "sdpa", "op_node": att.name, "became": "usp"}],
                                ulysses=2, ring=2, all_to_all=mode)
    return gm, ctx


@pytest.mark.parametrize("ring_transfer", ["nccl", "copy_engine"])
@pytest.mark.parametrize("mode", ["nccl", "copy_engine"])
def test_usp_decomposed_around_ring(mode, ring_transfer):
    """USP: the two all-to-alls in the Ulysses group become functional collectives (with copy_engine too: the copy
    engines stay with Ulysses-only attention), and the ring attention between them stays the ring op, over the
    ring group, on the Ulysses group's 2 x 4 tokens per ring rank, with k/v moved as compile.ring_transfer says (the
    copy-engine ring's two buffers recorded for the backend to make first)."""
    gm, ctx = _usp_graph([4, 4, 4, 4], mode)
    ctx.ring_transfer, ctx.ce_buffers = ring_transfer, []
    assert decompose_ulysses_pass(gm, ctx)
    gm.graph.lint()
    targets = _targets(gm)
    assert str(USP_OP) not in targets and targets.count(str(RING_OP)) == 1
    assert targets.count("_c10d_functional.all_to_all_single.default") == 2
    a2a = [n for n in gm.graph.nodes if n.target is torch.ops._c10d_functional.all_to_all_single.default]
    assert all(n.args[1:] == ([1, 1], [1, 1], "u") for n in a2a)
    ring = next(n for n in gm.graph.nodes if n.target is RING_OP)
    assert ring.args[3:] == (None, 0.5, False, "r", [8, 8], "auto", ring_transfer)
    assert "ring attention over 2 ranks" in ctx.attention_report[0]["became"]
    ce = ring_transfer == "copy_engine"
    assert ("(k/v by the copy engines)" in ctx.attention_report[0]["became"]) == ce
    assert [spec[1] for spec in ctx.ce_buffers] == (["ring_k", "ring_v"] if ce else [])


@pytest.mark.parametrize("sizes,mode,reason", [
    ([4, 4, 4, 3], "nccl", "uneven"),
    ([4, 4, 4, 4], "symm_mem", "nccl / copy_engine are decomposed"),
])
def test_usp_kept(sizes, mode, reason):
    gm, ctx = _usp_graph(sizes, mode)
    assert not decompose_ulysses_pass(gm, ctx)
    assert _targets(gm) == [str(USP_OP)]
    assert reason in ctx.attention_report[0]["kept_op"]


@pytest.mark.parametrize("mode,collective,count,became", [
    ("symm_mem", SYMM + ".default", 2, "xdit.symm_all_to_all"),        # q/k/v together, then out
    ("allgather_kv", "_c10d_functional.all_gather_into_tensor.default", 1, "all-gather of k, v"),
])
def test_other_collectives(mode, collective, count, became):
    gm, ctx = _graph((1, 4, 8, 16), (1, 4, 8, 16), [4, 4])
    ctx.all_to_all, ctx.symm_buffers = mode, []
    assert decompose_ulysses_pass(gm, ctx)
    gm.graph.lint()
    targets = _targets(gm)
    assert targets.count(collective) == count and str(ULYSSES_OP) not in targets
    assert not any(t.startswith(A2A) for t in targets)
    assert became in ctx.attention_report[0]["became"]
    # symm_mem: the buffers of its two calls (this rank's q, k, v stacked: 3 x 1 x 4 heads x 4 tokens x 16, then
    # the output), recorded so the backend makes them before the first run
    meta = torch.device("meta")
    assert ctx.symm_buffers == ([("g", 768, torch.float32, meta), ("g", 256, torch.float32, meta)]
                                if mode == "symm_mem" else [])


def test_copy_engine_decomposed():
    gm, ctx = _graph((1, 4, 8, 16), (1, 4, 8, 16), [4, 4])
    ctx.all_to_all = "copy_engine"
    assert decompose_ulysses_pass(gm, ctx)
    gm.graph.lint()
    targets = _targets(gm)
    assert targets.count(CE_START + ".default") == targets.count(CE_WAIT + ".default") == 4   # q, k, v, o
    kinds = [n.args[2] for n in gm.graph.nodes if str(n.target).startswith(CE_START)]
    assert sorted(kinds) == ["k", "o", "q", "v"]
    assert "copy-engine" in ctx.attention_report[0]["became"]
    gm, ctx = _graph((1, 8, 8, 16), (1, 8, 8, 16), [4, 4])    # 4 local heads in 2 chunks
    ctx.all_to_all, ctx.ulysses_chunks = "copy_engine", 2
    assert decompose_ulysses_pass(gm, ctx)
    targets = _targets(gm)
    assert targets.count(CE_START + ".default") == 8 and targets.count(CE_WAIT + ".default") == 7   # 6 + 1 (o)
    assert "2 head chunks" in ctx.attention_report[0]["became"]
    gm, ctx = _graph((1, 8, 8, 16), (1, 8, 8, 16), [4, 4, 4, 4])    # 4 ranks, query parts 3 -> 2
    ctx.all_to_all, ctx.query_parts = "copy_engine", 3
    assert decompose_ulysses_pass(gm, ctx)
    gm.graph.lint()
    starts = [n.args[2:] for n in gm.graph.nodes if str(n.target).startswith(CE_START)]
    assert [s[0] for s in starts] == ["v", "k", "qr", "op", "op"] and starts[-1][2:] == (1, 2), starts
    targets = _targets(gm)
    assert targets.count(CE_WAIT + ".default") == 4                               # v, k, qr, op (all parts)
    assert sum("scaled_dot_product_attention" in t for t in targets) == 2          # one per query part
    assert "2 query parts" in ctx.attention_report[0]["became"]


def test_cuts_skip_attention_with_a_partner():
    """An attention output concatenated with a tensor computed before the attention (FLUX's single block:
    proj_out(cat([attention, mlp]))) is not cut (query parts, head chunks): the mlp half of that linear already
    runs beside its output transfer. Concatenated with something computed after it, it is cut."""
    for (partner_first, parts), opt in itertools.product(((True, 1), (False, 2)), ("query_parts", "ulysses_chunks")):
        g = fx.Graph()
        q, k, v = (g.placeholder(n) for n in "qkv")
        for node in (q, k, v):
            node.meta["example_value"] = torch.empty((1, 8, 8, 16), device="meta")
        m = g.placeholder("mlp") if partner_first else None
        att = g.call_function(ULYSSES_OP, (q, k, v, None, None, False, "g", [4, 4], "auto"))
        o = g.call_method("reshape", (g.call_method("permute", (att, 0, 2, 1, 3)), 1, 4, 128))
        if m is None:
            m = g.call_function(torch.relu, (o,))
        g.output(g.call_function(torch.cat, ([o, m], -1)))
        gm = fx.GraphModule(torch.nn.Module(), g)
        ctx = types.SimpleNamespace(attention_report=[{"node": "sdpa", "op_node": att.name, "became": "ulysses x2"}],
                                    all_to_all="copy_engine", **{opt: 2})
        assert decompose_ulysses_pass(gm, ctx)
        kinds = [n.args[2] for n in gm.graph.nodes if str(n.target).startswith(CE_START)]
        if opt == "query_parts":
            assert kinds.count("op") == (parts if parts > 1 else 0) and kinds.count("o") == (parts == 1), kinds
        else:      # head chunks: a q start per chunk
            assert kinds.count("q") == parts and kinds.count("o") == parts, kinds


def test_copy_engine_output_is_copied():
    """A graph that returns the attention output itself returns a copy: the wait's view would be overwritten."""
    from xdit_compile.passes.schedule_transfers import schedule_transfers_pass

    gm, ctx = _graph((1, 4, 8, 16), (1, 4, 8, 16), [4, 4])
    ctx.all_to_all = "copy_engine"
    assert decompose_ulysses_pass(gm, ctx) and schedule_transfers_pass(gm, ctx)
    gm.graph.lint()
    (ret,) = [n for n in gm.graph.nodes if n.op == "output"][0].args
    assert ret.target is torch.clone and str(ret.args[0].target).startswith(CE_WAIT)
    targets = _targets(gm)
    assert targets.index(CE_START + ".default") < targets.index(CE_WAIT + ".default")


def _ce_op(rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    from xdit_compile.runtime import ce_a2a

    g = dist.group.WORLD.group_name
    torch.manual_seed(0)
    b, heads, s, d = 2, 2 * world_size, 3, 5
    full = torch.randn(b, heads, world_size * s, d)      # the same on every rank; this rank holds tokens r*S..
    x = full[:, :, rank * s:(rank + 1) * s]
    h = heads // world_size
    out = {"path": ce_a2a.available(g, x.device)}
    start, wait = torch.ops.xdit.a2a_start, torch.ops.xdit.a2a_wait
    y = wait([start(x, g, "k", 1)], [x], g, "k", 1)
    out["qkv"] = torch.equal(y, full[:, rank * h:(rank + 1) * h]) and y.shape == (b, h, world_size * s, d)
    z = wait([start(y, g, "o", 1)], [y], g, "o", 1)
    out["o"] = torch.equal(z, x)
    # two head chunks of the h = 2 local heads: one head each way per chunk, the output put back whole
    ys = [wait([start(x, g, "q", 0, c, 2)], [x], g, "q", 0, c, 2) for c in range(2)]
    out["chunks"] = all(torch.equal(yc, full[:, rank * h + c:rank * h + c + 1]) for c, yc in enumerate(ys))
    ts = [start(yc.contiguous(), g, "o", 0, c, 2) for c, yc in enumerate(ys)]
    out["chunks_o"] = torch.equal(wait(ts, ys, g, "o", 0, 0, 2), x)
    # query parts: q rotated (block b = rank + 1 + b's tokens), then the "attention" output back in P parts
    rot = [(rank + 1 + blk) % world_size for blk in range(world_size)]
    for parts in (p for p in (2, 4) if world_size % p == 0):
        y = wait([start(x, g, "qr", 0)], [x], g, "qr", 0)
        ok = torch.equal(y, full[:, rank * h:(rank + 1) * h].unflatten(2, (world_size, s))[:, :, rot].flatten(2, 3))
        outs = [o.contiguous() for o in (y * 2).unflatten(2, (parts, -1)).unbind(2)]
        z = wait([start(o, g, "op", 0, p, parts) for p, o in enumerate(outs)], outs, g, "op", 0, 0, parts)
        out[f"parts{parts}"] = ok and torch.equal(z, x * 2) and z.shape == x.shape
    # in-place kinds (compile.ce_in_place): the producer writes into the receive buffer (then only the peers'
    # pieces move) or not (then the start also copies the own piece); the same result either way
    def in_place(grp, kind, slot, src, written):
        if kind == "oi":                    # src: the attention output (B, h, L, D)
            dst = ce_a2a.in_place_out(grp, kind, slot, src.shape, src.dtype, src.device)
        else:                               # src: q / k (B, H, S, D); the producer writes (B, S, H, D)
            dst = ce_a2a.in_place_out(grp, kind, slot, src.transpose(1, 2).shape, src.dtype, src.device)
            dst = dst.transpose(1, 2)
        if written:
            src = dst.copy_(src)
        return wait([start(src, grp, kind, slot)], [], grp, kind, slot)   # the token has the shape
    heads_full = full[:, rank * h:(rank + 1) * h]
    for written in (True, False):
        for kind in ("qi", "ki", "vi"):
            y = in_place(g, kind, 1, x, written)
            out[f"{kind}_{written}"] = torch.equal(y, heads_full) and y.stride(2) == heads * d
        z = in_place(g, "oi", 1, heads_full * 2, written)
        out[f"oi_{written}"] = torch.equal(z, x * 2) and z.shape == x.shape
        y = in_place(g, "qri", 1, x, written)   # query parts' q in place: rotated, like qr
        out[f"qri_{written}"] = torch.equal(y, heads_full.unflatten(2, (world_size, s))[:, :, rot].flatten(2, 3)) \
            and y.stride(2) == heads * d
    # a fake group (profile_step.py --fake-world): only the own piece, where the real transfer puts it
    from torch.testing._internal.distributed import fake_pg  # noqa: F401  (registers the "fake" backend)
    f = dist.new_group(backend="fake").group_name
    mine, heads_mine = slice(rank * s, (rank + 1) * s), slice(rank * h, (rank + 1) * h)
    yk = wait([start(x, g, "k", 1)], [x], g, "k", 1).clone()
    yf = wait([start(x, f, "k", 1)], [x], f, "k", 1)
    own = torch.equal(yf[:, :, mine], yk[:, :, mine])
    # the peers' pieces never arrive: the buffer starts out random (activation-like), not zero memory, which ran a
    # GPU's GEMMs and attention ~10% fast (session 24)
    others = torch.cat([yf[:, :, :rank * s], yf[:, :, (rank + 1) * s:]], dim=2).float()
    out["fake_filled"] = bool(0.5 < others.std().item() < 2.0)
    zf = wait([start(yk, f, "o", 1)], [yk], f, "o", 1)
    own = own and torch.equal(zf[:, heads_mine], x[:, heads_mine])
    for c in range(2):
        yc = wait([start(x, f, "q", 0, c, 2)], [x], f, "q", 0, c, 2)
        own = own and torch.equal(yc[:, :, mine], full[:, rank * h + c:rank * h + c + 1, mine])
    ts = [start(yc.contiguous(), f, "o", 0, c, 2) for c, yc in enumerate(ys)]
    own = own and torch.equal(wait(ts, ys, f, "o", 0, 0, 2)[:, heads_mine], x[:, heads_mine])
    yr = wait([start(x, f, "qr", 0)], [x], f, "qr", 0)      # the own block comes last
    own = own and torch.equal(yr[:, :, -s:], x[:, heads_mine])
    outs = [o.contiguous() for o in (yr * 2).unflatten(2, (2, -1)).unbind(2)]   # 2 query parts
    z = wait([start(o, f, "op", 0, p, 2) for p, o in enumerate(outs)], outs, f, "op", 0, 0, 2)
    own = own and torch.equal(z[:, heads_mine], x[:, heads_mine] * 2)
    for written in (True, False):           # in-place kinds: the own piece in place, the rest random
        yi = in_place(f, "ki", 0, x, written)
        own = own and torch.equal(yi[:, :, mine], x[:, heads_mine]) and 0.5 < yi[:, :, :rank * s].float().std() < 2.0 \
            if rank else own and torch.equal(yi[:, :, mine], x[:, heads_mine])
        zi = in_place(f, "oi", 0, heads_full * 3, written)
        own = own and torch.equal(zi[:, heads_mine], x[:, heads_mine] * 3)
        yq = in_place(f, "qri", 0, x, written)  # the own block last
        own = own and torch.equal(yq[:, :, -s:], x[:, heads_mine])
    out["own_piece"] = own
    for name, args in {"kind": (x, g, "p", 0), "heads": (x[:, :3], g, "q", 0), "dims": (x[0], g, "q", 0),
                       "signal": (x, g, "q", 0), "local": (x, g, "q", 0), "parts": (x, g, "op", 0, 0, 3),
                       "sm": (x, g, "q", 0)}.items():
        os.environ["XDIT_CE_SIGNAL"] = "flags" if name == "signal" else "flag"
        os.environ["XDIT_CE_LOCAL"] = "cuda" if name == "local" else "triton"   # triton: ignored off CUDA
        os.environ["XDIT_CE_SM_PEERS"] = "one" if name == "sm" else "1"       # 1: ignored off CUDA
        try:
            torch.ops.xdit.a2a_start(*args)
            out[name] = ""
        except ValueError as e:
            out[name] = str(e)
    os.environ.pop("XDIT_CE_SIGNAL")
    os.environ.pop("XDIT_CE_LOCAL")
    os.environ.pop("XDIT_CE_SM_PEERS")
    return out


@pytest.mark.parametrize("world_size", [2, 4])
def test_copy_engine_op_on_cpu(world_size):
    """On CPU the start / wait pair is the all_to_all_single fallback, in the same layouts (query parts: 2 of 2
    ranks, 2 and 4 of 4); under a fake group (profile_step.py --fake-world) only the own piece moves, to the same
    place; bad input is named."""
    for rank, r in enumerate(run_distributed(_ce_op, world_size, timeout=120)):
        assert r["qkv"] and r["o"] and r["chunks"] and r["chunks_o"] and not r["path"], f"rank {rank}: {r}"
        assert r["own_piece"], f"rank {rank}: under a fake group the own piece is not where the transfer puts it"
        assert r["fake_filled"], f"rank {rank}: under a fake group the peers' pieces are not random values"
        assert r["parts2"] and r.get("parts4", world_size == 2), f"rank {rank}: {r}"
        assert all(r[f"{kind}_{written}"] for kind in ("qi", "ki", "vi", "oi", "qri") for written in (True, False)), \
            f"rank {rank}: in-place kinds {r}"
        assert "query part 0 of 3: the parts must divide the group size" in r["parts"], r["parts"]
        assert "kind 'p'" in r["kind"] and "heads (3) not divisible" in r["heads"] and "(B, H, S, D)" in r["dims"], r
        assert "XDIT_CE_SIGNAL='flags'" in r["signal"] and "'barrier'" in r["signal"] and "'spin'" in r["signal"], r
        assert "XDIT_CE_LOCAL='cuda'" in r["local"] and "'driver'" in r["local"] and "'triton'" in r["local"], r
        assert "XDIT_CE_SM_PEERS='one'" in r["sm"] and "group size - 1" in r["sm"], r


def test_symm_mem_refuses_chunks():
    gm, ctx = _graph((1, 4, 8, 16), (1, 4, 8, 16), [4, 4])
    ctx.all_to_all, ctx.ulysses_chunks = "symm_mem", 2
    with pytest.raises(ValueError, match="ulysses_chunks"):
        decompose_ulysses_pass(gm, ctx)


@pytest.mark.parametrize("asked,used", [(2, 2), (3, 2), (4, 4), (8, 4)])   # 8 heads / 2 ranks = 4 local heads
def test_head_chunks_pipelined(asked, used):
    gm, ctx = _graph((1, 8, 8, 16), (1, 8, 8, 16), [4, 4])
    ctx.ulysses_chunks = asked
    assert decompose_ulysses_pass(gm, ctx)
    gm.graph.lint()
    targets = _targets(gm)
    starts = [i for i, t in enumerate(targets) if t.startswith(A2A)]
    waits = [i for i, t in enumerate(targets) if t == "_c10d_functional.wait_tensor.default"]
    sdpa = [i for i, t in enumerate(targets) if "scaled_dot_product_attention" in t]
    assert len(starts) == len(waits) == 2 * used and len(sdpa) == used
    assert max(starts[:used]) < min(waits), "every q/k/v all-to-all is started before the first wait"
    for c in range(1, used):   # chunk c's output transfer starts before chunk c + 1's attention
        assert starts[used + c - 1] < sdpa[c]
    assert f"{used} head chunks" in ctx.attention_report[0]["became"]


@pytest.mark.parametrize("lowering,switch,ulysses,expected", [
    ("inductor", True, 2, True),
    ("inductor", False, 2, False),     # compile.decompose_collectives = false: the op stays
    ("eager", True, 2, False),         # the eager lowering runs the op (nothing would fuse the copies)
    ("inductor", True, 1, False),      # ring only: no Ulysses op to decompose
])
def test_in_pipeline_only_when_asked(lowering, switch, ulysses, expected):
    from xdit_compile.passes.manager import build_pipeline

    ctx = types.SimpleNamespace(sp_size=2, cfg_split=False, pipefusion=False, ulysses=ulysses, lowering=lowering,
                                decompose_collectives=switch, cache_config=None, disabled_passes=frozenset())
    names = [name for name, _ in build_pipeline(ctx)]
    assert ("decompose_ulysses" in names) == expected
    if expected:
        assert names[names.index("decompose_ulysses") - 1] == "rewrite_attention"


@pytest.mark.parametrize("mode,lowering,device,ulysses,world,gpus,expected", [
    ("auto", "inductor", "cuda", 4, 4, 4, "copy_engine"),   # Ulysses over one host's GPUs: the plans measured
    ("auto", "inductor", "cuda", 2, 2, 8, "copy_engine"),
    ("auto", "inductor", "cuda", 8, 8, 4, "nccl"),          # more ranks than this host's GPUs: several nodes
    ("auto", "inductor", "cuda", 2, 4, 4, "nccl"),          # Ulysses a subgroup (cfg / ring x ulysses): unmeasured
    ("auto", "inductor", "cuda", 1, 4, 4, "nccl"),          # no Ulysses
    ("auto", "inductor", "cpu", 2, 2, 0, "nccl"),           # gloo
    ("auto", "eager", "cuda", 4, 4, 4, "nccl"),             # nothing decomposed without Inductor
    ("symm_mem", "inductor", "cuda", 8, 8, 4, "symm_mem"),  # an explicit choice is kept
    ("nccl", "inductor", "cuda", 4, 4, 4, "nccl"),
])
def test_all_to_all_auto(mode, lowering, device, ulysses, world, gpus, expected):
    from xdit_compile.backend import _device_type, all_to_all_mode
    from xdit_compile.plan.schema import CompileConfig

    assert all_to_all_mode(mode, lowering, device, ulysses=ulysses, world=world, local_gpus=gpus) == expected
    assert CompileConfig().all_to_all == "auto"
    assert _device_type([torch.zeros(1), 3]) == "cpu"


@pytest.mark.parametrize("mode,device,ring,world,gpus,expected", [
    ("auto", "cuda", 2, 2, 2, "copy_engine"),   # the ring is the whole job on one host: measured (session 29)
    ("auto", "cuda", 4, 4, 8, "copy_engine"),
    ("auto", "cuda", 8, 8, 4, "nccl"),          # several nodes
    ("auto", "cuda", 2, 4, 4, "nccl"),          # ring a subgroup (ulysses x ring): copy_engine only when asked
    ("auto", "cuda", 1, 4, 4, "nccl"),          # no ring
    ("auto", "cpu", 2, 2, 0, "nccl"),           # gloo
    ("copy_engine", "cuda", 2, 4, 4, "copy_engine"),   # an explicit choice is kept
    ("nccl", "cuda", 2, 2, 2, "nccl"),
])
def test_ring_transfer_auto(mode, device, ring, world, gpus, expected):
    from xdit_compile.backend import ring_transfer_mode
    from xdit_compile.plan.schema import CompileConfig

    assert ring_transfer_mode(mode, device, ring=ring, world=world, local_gpus=gpus) == expected
    assert CompileConfig().ring_transfer == "auto"
    with pytest.raises(ValueError, match="compile.ring_transfer"):
        CompileConfig(ring_transfer="p2p")


# --- end to end: two gloo ranks, Inductor -------------------------------------------------------------


CASES = {
    # text_len 8: 8 text + 24 image tokens split 16 / 16 (the default 7 gives uneven shards, which stay on the op)
    "flux": {"model": "flux", "size": {"text_len": 8}, "compile": {}},
    "flux_off": {"model": "flux", "size": {"text_len": 8}, "compile": {"decompose_collectives": False}},
    # 8 heads (4 per rank) in 4 chunks: 4 q/k/v + 4 output all-to-alls per attention, with Inductor's reordering
    "flux_chunks_overlap": {"model": "flux", "size": {"text_len": 8}, "heads": 8,
                            "compile": {"ulysses_chunks": 4, "overlap": True}},
    "wan": {"model": "wan", "size": {}, "compile": {}},
    "flux_ring_ce": {"model": "flux", "size": {"text_len": 8}, "parallel": {"ring": 2},
                     "compile": {"ring_transfer": "copy_engine"}},
    "flux_agkv": {"model": "flux", "size": {"text_len": 8}, "compile": {"all_to_all": "allgather_kv"}},
    # symm_mem: xdit.symm_all_to_all in the same token-major layout (on CPU its all_to_all_single fallback)
    "flux_symm": {"model": "flux", "size": {"text_len": 8}, "compile": {"all_to_all": "symm_mem"}},
    # copy_engine: on CPU the a2a_start / a2a_wait pair falls back to gloo, same layouts; the schedule is real
    # (fuse_linears off: the schedule test checks that k's transfer runs while q is projected)
    # (ce_in_place off: the plain kinds, every own piece copied by the start)
    "flux_ce": {"model": "flux", "size": {"text_len": 8},
                "compile": {"all_to_all": "copy_engine", "fuse_gelu": False, "fuse_linears": False,
                            "ce_in_place": False}},
    "wan_ce": {"model": "wan", "size": {}, "compile": {"all_to_all": "copy_engine", "ce_in_place": False}},
    # 8 heads, 4 per rank, in 2 chunks: per attention 2 x (v, k, q) + 2 output starts, 2 x 3 + 1 waits
    "flux_ce_c2": {"model": "flux", "size": {"text_len": 8}, "heads": 8,
                   "compile": {"all_to_all": "copy_engine", "ulysses_chunks": 2}},
    # Wan's self-attention, 4 heads (2 per rank) in 2 head chunks: its transfers chunked, plain kinds
    "wan_ce_c2": {"model": "wan", "size": {}, "heads": 4,
                  "compile": {"all_to_all": "copy_engine", "ulysses_chunks": 2}},
    # query parts: per attention v, k, qr + 2 output parts started, 3 + 1 waits
    # fuse_gelu (default): the 3 MLP linear + tanh-GELU pairs (double block img / txt ff, single block proj_mlp)
    "flux_ce_qp2": {"model": "flux", "size": {"text_len": 8},
                    "compile": {"all_to_all": "copy_engine", "query_parts": 2}},
    # fuse_linears: q/k/v (and the text stream's) as one GEMM each, before schedule_transfers
    "flux_ce_fl": {"model": "flux", "size": {"text_len": 8},
                   "compile": {"all_to_all": "copy_engine", "fuse_linears": True}},
    # ce_in_place (the default): q / k by xdit::norm_rope_into and the output by xdit::attention_into, into the
    # receive buffers
    "flux_ce_ip": {"model": "flux", "size": {"text_len": 8},
                   "compile": {"all_to_all": "copy_engine", "fuse_gelu": False, "fuse_linears": False}},
    "wan_ce_ip": {"model": "wan", "size": {}, "compile": {"all_to_all": "copy_engine", "fuse_linears": False}},
    # query parts with ce_in_place: k by xdit::norm_rope_into, v by xdit::linears_into; q rotated, the output in parts
    "wan_ce_qp2": {"model": "wan", "size": {},
                   "compile": {"all_to_all": "copy_engine", "fuse_linears": False, "query_parts": 2}},
}


def _run_case(case: dict) -> dict:
    import xdit_compile as xc

    from xdit_compile.runtime import ce_a2a

    torch._dynamo.reset()
    bufs_before = set(ce_a2a._BUFS)
    model_case = MODELS[case["model"]]
    if "heads" in case:
        model_case = dataclasses.replace(model_case, config={**model_case.config, "num_attention_heads": case["heads"]})
    model = model_case.build()
    inputs = model_case.inputs(**case["size"])
    with torch.no_grad():
        ref = model(**inputs)[0]
    plan = xc.Plan.from_dict({"parallel": case.get("parallel", {"ulysses": 2}),
                              "compile": {"lowering": "inductor", **case["compile"]}})
    xc.parallelize(model, plan)
    from torch._inductor import config as inductor_config
    from torch._inductor import ir
    from torch._inductor.graph import GraphLowering
    from torch._inductor.utils import run_and_get_code
    wait, reusable = torch.ops.xdit.a2a_wait.default, []   # a2a_wait outputs Inductor may hand to another buffer

    def codegen(self, *a, **k):
        for b in self.buffers:
            k_ = b.inputs[0] if isinstance(b, ir.MultiOutput) and b.inputs else b
            if getattr(k_, "op_overload", None) is wait and b.get_name() not in self.never_reuse_buffers:
                reusable.append(b.get_name())
        return orig(self, *a, **k)

    orig = GraphLowering.codegen
    GraphLowering.codegen = codegen
    try:
        with torch.no_grad(), inductor_config.patch(fx_graph_cache=False):
            out, codes = run_and_get_code(lambda: model(**inputs)[0])
    finally:
        GraphLowering.codegen = orig
    reports = model._xdit_compiler.reports
    targets = [str(n.target) for r in reports for n in r["graph"].graph.nodes if n.op == "call_function"]
    attention = [a for r in reports for a in r["attention"]]
    order = []     # the graph order, coarse: starts / waits with their kind, linears, attention
    exposed = []   # per start, in graph order: (kind, chunk, whether it says nothing computes beside it)
    unchained = 0  # starts that do not take the previous start's token
    for r in reports:
        prev = None
        for n in r["graph"].graph.nodes:
            t = str(n.target)
            if t.startswith(CE_START):
                unchained += n.kwargs.get("after") is not prev
                chunk = n.args[4] if len(n.args) > 4 else n.kwargs.get("chunk", 0)
                exposed.append((n.args[2], chunk, bool(n.kwargs.get("exposed"))))
                prev = n
            if t.startswith(CE_START) or t.startswith(CE_WAIT):
                start = t.startswith(CE_START)
                order.append(("S:" if start else "W:") + n.args[2 if start else 3])
            elif "linear" in t:
                order.append("lin")
            elif "scaled_dot_product_attention" in t or "attention_into" in t:
                order.append("sdpa")
    code_order = []   # the same, in the order of Inductor's generated code (what runs)
    for code in codes:
        for line in code.splitlines():
            m = re.search(r"xdit\.a2a_(start|wait)\.default\(.*?'(qri|qr|op|[qkvo]i|[qkvo])', \d+", line)
            if m:
                code_order.append(("S:" if m.group(1) == "start" else "W:") + m.group(2))
            elif re.search(r"extern_kernels\.(addmm|mm)\(", line):
                code_order.append("lin")
            elif re.search(r"= torch\.ops\.(aten\._scaled_dot_product_\w+|xdit\.attention_into)\.default\(", line):
                code_order.append("sdpa")
    return {
        "order": order,
        "exposed": exposed,
        "code_exposed": sum(bool(re.search(r"xdit\.a2a_start\.default\(.*(exposed=|, )True\)", line))
                            for code in codes for line in code.splitlines()),
        "code_order": code_order,
        "unchained": unchained,
        # copy-engine buffers made during the run that the backend did not make before it (should be none)
        "ce_late": sorted(map(str, set(ce_a2a._BUFS) - bufs_before - {k for r in reports for k in r["ce_reserved"]})),
        "ce_reserved": sum(len(r["ce_reserved"]) for r in reports),
        "wait_reusable": reusable,
        "n_gelu_fused": sum(t.endswith("linear_gelu_tanh") or "linear_gelu_tanh " in t for t in targets),
        "rel_err": ((out - ref).norm() / ref.norm()).item(),
        "n_a2a": sum(t.startswith(A2A) for t in targets),
        "n_op": sum(t.startswith(ULYSSES) for t in targets),
        "n_usp": sum(t.startswith(USP) for t in targets),
        "n_ring": sum(t.startswith(RING) for t in targets),
        "n_ag": sum(t.startswith("_c10d_functional.all_gather_into_tensor") for t in targets),
        "n_symm": sum(t.startswith(SYMM) for t in targets),
        "n_decomposed": sum(bool(a.get("decomposed")) for a in attention),
        "explain": xc.explain(model),
    }


def _run_cases(rank: int, world_size: int, cases: dict) -> dict:
    """Run every case, catching errors per case."""
    return each_case(_run_case, cases)


# four ranks: ulysses 2 x ring 2 (USP), its Ulysses all-to-alls decomposed around the ring op
CASES4 = {"flux_usp": {"model": "flux", "size": {"text_len": 8}, "parallel": {"ulysses": 2, "ring": 2},
                       "compile": {"fuse_gelu": False, "ring_transfer": "copy_engine"}}}
_RESULTS: dict = {}


def _results(key: str) -> list[dict]:
    world, cases = (4, CASES4) if key in CASES4 else (2, CASES)
    if world not in _RESULTS:
        try:
            _RESULTS[world] = run_distributed(_run_cases, world, cases, timeout=900)
        except Exception as e:  # noqa: BLE001 - every test reports it, none re-runs it
            _RESULTS[world] = e
    if isinstance(_RESULTS[world], Exception):
        pytest.fail(f"the distributed cases did not run: {_RESULTS[world]}", pytrace=False)
    per_rank = [r[key] for r in _RESULTS[world]]
    for rank, r in enumerate(per_rank):
        if "error" in r:
            pytest.fail(f"rank {rank}:\n{r['error']}", pytrace=False)
    return per_rank


@pytest.mark.parametrize("key", ["flux", "flux_chunks_overlap", "wan"])
def test_decomposed_matches(key):
    chunks = CASES[key]["compile"].get("ulysses_chunks", 1)
    for rank, r in enumerate(_results(key)):
        assert r["rel_err"] < REL_TOL, f"{key} rank {rank}: relative error {r['rel_err']:.3e}\n{r['explain']}"
        assert r["n_op"] == 0, f"{key} rank {rank}: {r['n_op']} {ULYSSES} nodes left\n{r['explain']}"
        assert r["n_a2a"] > 0 and r["n_a2a"] == 2 * chunks * r["n_decomposed"], f"{key} rank {rank}: {r}"
        assert "decomposed" in r["explain"]


def test_ring_copy_engine_under_inductor():
    """ring 2 with compile.ring_transfer = "copy_engine" under Inductor: every ring call takes the copy-engine path
    (its gloo fallback here), the output matches one process, and its k / v buffers were made before the first run."""
    for rank, r in enumerate(_results("flux_ring_ce")):
        assert r["rel_err"] < REL_TOL, f"rank {rank}: relative error {r['rel_err']:.3e}\n{r['explain']}"
        assert r["n_ring"] > 0 and "ring x2 (k/v by the copy engines)" in r["explain"], r["explain"]
        assert r["ce_reserved"] == 2 and not r["ce_late"], (r["ce_reserved"], r["ce_late"])


def test_symm_mem_decomposed_matches():
    """compile.all_to_all = "symm_mem" end to end under Inductor: two symm_all_to_all per attention, the output
    of one process."""
    for rank, r in enumerate(_results("flux_symm")):
        assert r["rel_err"] < REL_TOL, f"rank {rank}: relative error {r['rel_err']:.3e}\n{r['explain']}"
        assert r["n_op"] == 0 and r["n_a2a"] == 0 and r["n_symm"] == 2 * r["n_decomposed"] > 0, f"rank {rank}: {r}"


@pytest.mark.parametrize("key", ["flux_agkv"])
def test_allgather_kv_matches(key):
    for rank, r in enumerate(_results(key)):
        assert r["rel_err"] < REL_TOL, f"{key} rank {rank}: relative error {r['rel_err']:.3e}\n{r['explain']}"
        assert r["n_op"] == 0 and r["n_a2a"] == 0, f"rank {rank}: {r}"
        assert r["n_ag"] >= r["n_decomposed"] > 0, f"rank {rank}: {r}"


@pytest.mark.parametrize("key", ["flux_ce", "wan_ce", "flux_ce_c2", "wan_ce_c2", "flux_ce_qp2", "flux_ce_fl",
                                 "flux_ce_ip", "wan_ce_ip", "wan_ce_qp2"])
def test_copy_engine_matches(key):
    c = CASES[key]["compile"].get("ulysses_chunks", 1)
    parts = CASES[key]["compile"].get("query_parts", 1)
    for rank, r in enumerate(_results(key)):
        assert r["rel_err"] < REL_TOL, f"{key} rank {rank}: relative error {r['rel_err']:.3e}\n{r['explain']}"
        assert r["n_op"] == 0 and r["n_a2a"] == 0 and r["n_decomposed"] > 0, f"rank {rank}: {r}"
        starts = [x for x in r["order"] if x.startswith("S:")]
        waits = [x for x in r["order"] if x.startswith("W:")]
        # query parts / head chunks: only the double block's attention (the single block's output meets the mlp
        # in proj_out's cat, its transfers already run beside that)
        parted = r["explain"].count(f"{parts} query parts") if parts > 1 else 0
        chunked = r["explain"].count(f"{c} head chunks") if c > 1 else 0
        n_att = r["n_decomposed"]
        assert len(starts) == 4 * n_att + (parts - 1) * parted + 4 * (c - 1) * chunked, f"rank {rank}: {r['order']}"
        assert len(waits) == 4 * n_att + 3 * (c - 1) * chunked, f"rank {rank}: {r['order']}"
        if c > 1:     # FLUX: the double block's attention only; Wan: its self-attention (its cross-attention is local)
            assert (chunked, n_att) == ((1, 2) if key.startswith("flux") else (1, 1)), f"rank {rank}: {r['explain']}"
        if parts > 1:    # each part's output starts back before the next part's attention
            o = r["order"]
            first = o.index("S:qri")     # q in place (ce_in_place), rotated
            att = [i for i, x in enumerate(o) if x == "sdpa" and i > first][:parts]
            sent = [i for i, x in enumerate(o) if x == "S:op" and i > first][:parts]
            assert att[0] < sent[0] < att[1] < sent[1], f"rank {rank}: {o}"
            # FLUX: the double block's attention only; Wan: its self-attention (its cross-attention is local)
            assert (parted, n_att) == ((1, 2) if key.startswith("flux") else (1, 1)), f"rank {rank}: {r['explain']}"
        assert "copy-engine" in r["explain"] and "schedule_transfers: " in r["explain"]
        # a2a_wait returns a view of a receive buffer peers write into: Inductor must never reuse its memory
        assert r["wait_reusable"] == [], f"rank {rank}: {r['wait_reusable']}"


@pytest.mark.parametrize("which", ["order", "code_order"])
def test_copy_engine_schedule(which):
    """Tiny Flux (1 double + 1 single block): every q/k/v transfer starts before the first wait; v's transfer
    starts before k's and q's projections, k's before q's projection; in the single block proj_mlp runs between
    the q/k/v starts and their waits, and the split-off mlp half of proj_out between the output's start and
    wait. Checked on the fx
    graph our pass wrote ("order") and on the code Inductor generated from it ("code_order": its post-grad
    reorder_for_locality would put every start right before its wait, so the lowering turns it off; its
    horizontal fusion would merge k's norm + rotary into q's, after q's projection, so the lowering forbids
    horizontal fusion of a kernel that feeds a start)."""
    order = _results("flux_ce")[0][which]
    att = [i for i, x in enumerate(order) if x == "sdpa"]
    assert len(att) == 2, order
    for a, lo in zip(att, (0, att[0] + 1)):
        part = order[lo:a]
        qkv_starts = [i for i, x in enumerate(part) if x in ("S:q", "S:k", "S:v")]
        qkv_waits = [i for i, x in enumerate(part) if x in ("W:q", "W:k", "W:v")]
        assert len(qkv_starts) == len(qkv_waits) == 3 and max(qkv_starts) < min(qkv_waits), part
        assert part.index("S:v") < max(qkv_starts), f"v first (smallest cone): {part}"
        assert "lin" in part[part.index("S:k"):part.index("S:q")], f"k moves while q is projected: {part}"
    assert "schedule_transfers: 1 linear(cat) split" in _results("flux_ce")[0]["explain"]
    single = order[att[0] + 1:att[1]]
    single = single[single.index("W:o") + 1:]                 # after the double block's output transfer
    last_start = max(i for i, x in enumerate(single) if x.startswith("S:"))
    first_wait = min(i for i, x in enumerate(single) if x.startswith("W:"))
    assert "lin" in single[last_start:first_wait], f"proj_mlp should fill the q/k/v transfers: {single}"
    tail = order[att[1]:]
    assert "lin" in tail[tail.index("S:o"):tail.index("W:o")], f"mlp half of proj_out during the o transfer: {tail}"


@pytest.mark.parametrize("key", ["flux_ce", "wan_ce", "flux_ce_c2", "wan_ce_c2", "flux_ce_qp2", "flux_ce_fl",
                                 "flux_ce_ip", "wan_ce_ip", "wan_ce_qp2"])
def test_copy_engine_starts_in_one_order(key):
    """The generated code of every rank starts the transfers in the fx graph's order, the same on all ranks:
    schedule_transfers chains the starts (a start queues a barrier, and allocated its buffer collectively, so
    starts in different orders pair the wrong buffers or deadlock). The backend makes every buffer the starts use
    before the graph first runs (Wan 480p deadlocked on 4 x H100 with a rendezvous inside the first run)."""
    rs = _results(key)
    fx_starts = [[x for x in r["order"] if x.startswith("S:")] for r in rs]
    code_starts = [[x for x in r["code_order"] if x.startswith("S:")] for r in rs]
    assert len(fx_starts[0]) >= 4 and all(s == fx_starts[0] for s in fx_starts), fx_starts
    assert all(r["unchained"] == 0 for r in rs), [r["unchained"] for r in rs]
    # and every buffer they use was made before the graph first ran (no rendezvous inside the first run)
    assert all(r["ce_reserved"] >= 4 and not r["ce_late"] for r in rs), [(r["ce_reserved"], r["ce_late"]) for r in rs]
    assert code_starts == fx_starts, f"Inductor's order {code_starts} != the graph's {fx_starts}"


@pytest.mark.parametrize("key,want", [("flux_ce", {"q", "o"}), ("wan_ce", {"q", "o"}),
                                      ("flux_ce_c2", {("q", 0), ("o", 1)}), ("wan_ce_c2", {("q", 0), ("o", 1)}),
                                      ("flux_ce_qp2", set())])
def test_copy_engine_exposed_starts(key, want):
    """Starts say exposed=True (XDIT_CE_SM_PEERS may then put SM kernels on them) only where nothing computes
    beside the transfer: q's and the output's in FLUX's double block (its output has no partner; v and k move while
    k and q are computed) and Wan's self-attention; with head chunks q's first chunk and the last chunk's output
    (the other chunks move beside attention); not FLUX's single block (proj_mlp runs beside), nor query parts. The
    flag reaches the generated code."""
    for rank, r in enumerate(_results(key)):
        exposed = [(kind, c) for kind, c, e in r["exposed"] if e]
        got = {kind for kind, _ in exposed} if key in ("flux_ce", "wan_ce") else set(exposed)
        assert got == want and len(exposed) == len(want), f"rank {rank}: {r['exposed']}"
        assert r["code_exposed"] == len(want), f"rank {rank}: {r['code_exposed']}"


@pytest.mark.parametrize("key,v", [("flux_ce_ip", "vi"), ("wan_ce_ip", "vi"), ("flux_ce_fl", "v")])
def test_copy_engine_in_place(key, v):
    """compile.ce_in_place (the default): every attention's q and k transfers are in-place kinds (xdit::norm_rope_into
    wrote them into the receive buffer), and so is the output (xdit::attention_into; on CPU the same math); v too
    where fuse_linears leaves its projections alone (fuse_linears off: xdit::linears_into writes FLUX's text and image
    projections, Wan's one; flux_ce_fl: tiny Flux's few rows join q/k/v in one GEMM, so v stays plain). The output
    matches one process (test_copy_engine_matches) and the starts still come before the first wait, q's and the
    output's marked exposed where the plain plan marks them."""
    for rank, r in enumerate(_results(key)):
        n_att = r["n_decomposed"]
        starts = [x for x in r["order"] if x.startswith("S:")]
        assert sorted(starts) == sorted([f"S:{v}", "S:ki", "S:qi", "S:oi"] * n_att), f"rank {rank}: {r['order']}"
        written = "q k v o" if v == "vi" else "q k o"
        assert r["explain"].count(f"written in place: {written}") == n_att, r["explain"]
        assert [x for x in r["code_order"] if x.startswith("S:")] == starts, f"rank {rank}: {r['code_order']}"
        plain = _results({"flux_ce_fl": "flux_ce"}.get(key, key.removesuffix("_ip")))[rank]["exposed"]
        assert [(k[0], e) for k, _, e in r["exposed"]] == [(k[0], e) for k, _, e in plain], (r["exposed"], plain)


@pytest.mark.parametrize("key,kv", [("flux_ce_qp2", ["S:v", "S:ki"]), ("wan_ce_qp2", ["S:vi", "S:ki"])])
def test_query_parts_in_place(key, kv):
    """compile.ce_in_place with query parts: k and v travel in place as without parts (v where fuse_linears leaves
    its projection alone: Wan with fuse_linears off; tiny Flux's few rows join q/k/v in one GEMM, so v stays plain),
    q as "qri": rotated, xdit::norm_rope_into writing the own rows into the last block. The output goes back in
    parts (op). Matches one process (test_copy_engine_matches)."""
    for rank, r in enumerate(_results(key)):
        o = r["order"]
        starts = [x for x in o if x.startswith("S:")]
        assert starts[:5] == [*kv, "S:qri", "S:op", "S:op"], f"rank {rank}: {o}"
        written = "q k v" if kv[0] == "S:vi" else "q k"
        assert r["explain"].count(f"2 query parts, written in place: {written}") == 1, r["explain"]
        assert [x for x in r["code_order"] if x.startswith("S:")] == [x for x in o if x.startswith("S:")], \
            f"rank {rank}: {r['code_order']}"


def test_fuse_linears_with_copy_engine():
    """compile.fuse_linears under Inductor with the copy-engine transfers: tiny Flux's 3 q/k/v groups are one GEMM
    each (the explain line says so), the output matches one process (test_copy_engine_matches), and every q/k/v
    start still comes before the attention's first wait."""
    for r in _results("flux_ce_fl"):
        assert "fuse_linears: 3 groups of linears of one input as one GEMM each (9 linears)" in r["explain"], \
            r["explain"]
        order = r["order"]
        att = [i for i, x in enumerate(order) if x == "sdpa"]
        for a, lo in zip(att, (0, att[0] + 1)):
            part = order[lo:a]
            starts = [i for i, x in enumerate(part) if x[:3] in ("S:q", "S:k", "S:v")]   # qi, ki: in place
            waits = [i for i, x in enumerate(part) if x[:3] in ("W:q", "W:k", "W:v")]
            assert len(starts) == 3 and max(starts) < min(waits), part


def test_fuse_gelu():
    """compile.fuse_gelu: every linear + tanh-GELU pair of tiny Flux becomes one linear_gelu_tanh call (on CUDA
    one cuBLASLt GEMM with a GELU epilogue; on CPU the same pair), and the output still matches one process; off
    when the plan says so."""
    for rank, r in enumerate(_results("flux_ce_qp2")):
        assert "fuse_gelu: 3 linear + tanh-GELU pairs" in r["explain"], r["explain"]
        assert r["n_gelu_fused"] == 3 and r["rel_err"] < REL_TOL, f"rank {rank}: {r['n_gelu_fused']} {r['rel_err']}"
    assert "fuse_gelu" not in _results("flux_ce")[0]["explain"]


def test_decompose_off_keeps_op():
    for rank, r in enumerate(_results("flux_off")):
        assert r["rel_err"] < REL_TOL, f"rank {rank}: relative error {r['rel_err']:.3e}"
        assert r["n_op"] > 0 and r["n_a2a"] == 0 and r["n_decomposed"] == 0, f"rank {rank}: {r}"


def _symm_op(rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    from xdit_compile.runtime import symm_a2a

    group = dist.group.WORLD.group_name
    x = torch.arange(world_size * 6, dtype=torch.float32).reshape(world_size, 2, 3) + 100 * rank
    ref = torch.empty_like(x)
    dist.all_to_all_single(ref, x)
    out = torch.ops.xdit.symm_all_to_all(x, group)
    try:
        torch.ops.xdit.symm_all_to_all(x[:1], group)
        err = ""
    except ValueError as e:
        err = str(e)
    return {"equal": torch.equal(out, ref), "symm_path": symm_a2a.available(group, x.device), "err": err}


def test_symm_all_to_all_op_on_cpu():
    """On CPU the op is the all_to_all_single fallback: same result, and a wrong row count is named."""
    for rank, r in enumerate(run_distributed(_symm_op, 2, timeout=120)):
        assert r["equal"] and not r["symm_path"], f"rank {rank}: {r}"
        assert "1 rows, the group has 2 ranks" in r["err"], r["err"]


def test_usp_decomposed_matches():
    """ulysses 2 x ring 2 on four gloo ranks under Inductor: every USP call became the two functional all-to-alls
    around the ring op (compile.ring_transfer = "copy_engine": here its gloo fallback), and the output matches one
    process."""
    for rank, r in enumerate(_results("flux_usp")):
        assert r["rel_err"] < REL_TOL, f"rank {rank}: relative error {r['rel_err']:.3e}\n{r['explain']}"
        assert r["n_usp"] == 0 and r["n_ring"] == r["n_decomposed"] > 0, f"rank {rank}: {r}"
        assert r["n_a2a"] == 2 * r["n_decomposed"], f"rank {rank}: {r}"
        assert "ring attention over 2 ranks (k/v by the copy engines)" in r["explain"]
        # the ring's k / v buffers (runtime/ce_ring.py) were made before the graph first ran
        assert r["ce_reserved"] == 2 and not r["ce_late"], (r["ce_reserved"], r["ce_late"])
