"""GPU check of the copy-engine all-to-all ops (runtime/ce_a2a.py) in both completion modes, then their cost in
a block-shaped loop.

    torchrun --nproc_per_node=N benchmarks/ce_check.py [--out ce_check.jsonl]

Correctness: for kinds q, k, v, o, with 1 and 2 head chunks, and qr, op (query parts 2 and N), and the in-place
kinds qi, ki, vi, oi and, with query parts, qri (compile.ce_in_place: flag, barrier, barrier with one SM peer),
XDIT_CE_SIGNAL = flag, barrier and spin (and barrier with XDIT_CE_LOCAL=triton: the own piece by
runtime/local_copy.py's kernel; barrier with XDIT_CE_SM_PEERS=1 and flag with every peer's piece stored by SMs,
on starts marked exposed), eagerly and
as a CUDA graph replayed with fresh inputs (ROUNDS rounds of q/k/v -> "attention" -> o that alternate slots, as
decompose_ulysses emits them), every result is compared exactly with the same all-to-all computed from an
all-gather. Timing (CUDA graph, FLUX single block at 1024² on N ranks): per round the q/k/v transfers beside
proj_mlp's matmul, SDPA, the output transfer beside the mlp half of proj_out; ms per round for NCCL
(all_to_all_single, no overlap), copy_engine + barrier / flags / spin, and the compute alone; and the
copies of one block (4 transfers) alone, as the op's 2-D pieces and as 1-D pieces of the same bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
import torch.distributed as dist
import torch.nn.functional as F
from gpu_util import init_nccl, reporter

ROUNDS = 8


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    ap.add_argument("--exact-only", action="store_true", help="the correctness checks only, no timing")
    args = ap.parse_args()
    dev, rank, n = init_nccl()
    import xdit_compile  # noqa: F401  (registers the ops)
    from xdit_compile.runtime import ce_a2a
    gname = dist.group.WORLD.group_name
    ops = torch.ops.xdit
    assert ce_a2a.available(gname, dev), "copy-engine path not available on this machine"
    rows, report = reporter(rank)

    def gather(x):
        xs = [torch.empty_like(x) for _ in range(n)]
        dist.all_gather(xs, x.contiguous())
        return xs

    def ref_qkv(x):      # (B, H, S, D) -> (B, H/N, N*S, D)
        h = x.shape[1] // n
        return torch.cat([xr[:, rank * h:(rank + 1) * h] for xr in gather(x)], dim=2)

    def ref_o(x):        # (B, h, L, D) -> (B, h*N, L/N, D)
        s = x.shape[2] // n
        return torch.cat([xr[:, :, rank * s:(rank + 1) * s] for xr in gather(x)], dim=1)

    # ---- correctness
    B, H, S, D = 1, 8 * n, 96, 64
    bf = torch.bfloat16

    def attend(q, k, v):
        """stands in for attention: row by row in q, independent of the order of the keys (as SDPA without a
        mask), exact in any order of evaluation."""
        return (q.float() * k.float().amax(2, keepdim=True) + v.float().amin(2, keepdim=True)).to(bf)

    ex = {}   # a2a_start's keyword arguments: {"exposed": True} for the XDIT_CE_SM_PEERS cases

    def into(t, kind, slot):
        """a producer writing into the in-place receive buffer (compile.ce_in_place): t where its own piece sits"""
        if kind == "oi":
            return ce_a2a.in_place_out(gname, kind, slot, t.shape, t.dtype, t.device).copy_(t)
        dst = ce_a2a.in_place_out(gname, kind, slot, t.transpose(1, 2).shape, t.dtype, t.device)
        return dst.copy_(t.transpose(1, 2)).transpose(1, 2)

    def block(q, k, v, slot, chunks, parts=1):
        """what decompose_ulysses emits for one attention (head chunks, or query parts of the rotated q; in place:
        q, k and the output written into their receive buffers, compile.ce_in_place)."""
        if in_place and parts > 1:   # q rotated in place (qri), k and v in place, the output in parts
            q, k, v = into(q, "qri", slot), into(k, "ki", slot), into(v, "vi", slot)
            toks = [ops.a2a_start(t, gname, kd, slot, **ex) for t, kd in ((v, "vi"), (k, "ki"), (q, "qri"))]
            vv, kk, qq = (ops.a2a_wait([tk], [], gname, kd, slot) for tk, kd in zip(toks, ("vi", "ki", "qri")))
            outs = [attend(qp, kk, vv) for qp in qq.unflatten(2, (parts, -1)).unbind(2)]
            toks = [ops.a2a_start(o, gname, "op", slot, p, parts, **ex) for p, o in enumerate(outs)]
            return ops.a2a_wait(toks, outs, gname, "op", slot, 0, parts).clone()
        if in_place:
            q, k, v = into(q, "qi", slot), into(k, "ki", slot), into(v, "vi", slot)
            toks = [ops.a2a_start(t, gname, kd, slot, **ex) for t, kd in ((v, "vi"), (k, "ki"), (q, "qi"))]
            vv, kk, qq = (ops.a2a_wait([tk], [], gname, kd, slot) for tk, kd in zip(toks, ("vi", "ki", "qi")))
            o = into(attend(qq, kk, vv), "oi", slot)
            return ops.a2a_wait([ops.a2a_start(o, gname, "oi", slot, **ex)], [], gname, "oi", slot).clone()
        if parts > 1:
            toks = [ops.a2a_start(t, gname, kd, slot, **ex) for t, kd in ((v, "v"), (k, "k"), (q, "qr"))]
            vv, kk, qq = (ops.a2a_wait([tk], [t], gname, kd, slot)
                          for tk, t, kd in zip(toks, (v, k, q), ("v", "k", "qr")))
            outs = [attend(qp, kk, vv) for qp in qq.unflatten(2, (parts, -1)).unbind(2)]
            toks = [ops.a2a_start(o, gname, "op", slot, p, parts, **ex) for p, o in enumerate(outs)]
            return ops.a2a_wait(toks, outs, gname, "op", slot, 0, parts).clone()
        outs = []
        for c in range(chunks):
            toks = [ops.a2a_start(t, gname, kd, slot, c, chunks, **ex) for t, kd in ((q, "q"), (k, "k"), (v, "v"))]
            qq, kk, vv = (ops.a2a_wait([tk], [t], gname, kd, slot, c, chunks)
                          for tk, t, kd in zip(toks, (q, k, v), "qkv"))
            o = attend(qq, kk, vv)
            outs.append((ops.a2a_start(o, gname, "o", slot, c, chunks, **ex), o))
        return ops.a2a_wait([t for t, _ in outs], [o for _, o in outs], gname, "o", slot, 0, chunks).clone()

    def rounds(xs, chunks, parts=1):
        out, res = xs[0], []
        for i in range(ROUNDS):
            q, k, v = ((out * (1 + j) + xs[1][j]).to(bf) for j in range(3))
            out = block(q, k, v, i % 2, chunks, parts)
            res.append(out)
        return res

    def ref_rounds(xs, chunks):
        out, res = xs[0], []
        for i in range(ROUNDS):
            q, k, v = ((out * (1 + j) + xs[1][j]).to(bf) for j in range(3))
            # chunk c covers local heads [c*h/C, (c+1)*h/C) of every rank's head group: concatenating the chunks'
            # outputs in chunk order inside each rank's group gives back the plain all-to-all.
            o = attend(ref_qkv(q), ref_qkv(k), ref_qkv(v))
            out = ref_o(o)
            res.append(out)
        return res

    in_place = False
    for mode, local, sm, in_place in (("flag", "driver", 0, False), ("barrier", "driver", 0, False),
                                      ("spin", "driver", 0, False), ("barrier", "triton", 0, False),
                                      ("barrier", "driver", 1, False), ("flag", "driver", n - 1, False),
                                      ("barrier", "driver", 0, True), ("flag", "driver", 0, True),
                                      ("barrier", "driver", 1, True)):
        os.environ["XDIT_CE_SIGNAL"], os.environ["XDIT_CE_LOCAL"] = mode, local
        os.environ["XDIT_CE_SM_PEERS"] = str(sm)
        ex.clear()
        ex.update({"exposed": True} if sm else {})
        for chunks, parts in ((1, 1),) + ((() if in_place else ((2, 1),)) +
                                          tuple((1, p) for p in (2, n) if p > 1 and n % p == 0)):
            gen = torch.Generator(device=dev).manual_seed(rank)
            mk = lambda: (torch.randn(B, H, S, D, device=dev, generator=gen).to(bf),  # noqa: E731
                          torch.randn(3, B, H, S, D, device=dev, generator=gen).to(bf))
            xs = mk()
            err_eager = max((a.float() - b.float()).abs().max().item()
                            for a, b in zip(rounds(xs, chunks, parts), ref_rounds(xs, chunks)))
            # graph: warm up on a side stream, capture, replay with fresh inputs
            static = mk()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                rounds(static, chunks, parts)
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                outs = rounds(static, chunks, parts)
            err_graph = 0.0
            for _ in range(5):
                fresh = mk()
                static[0].copy_(fresh[0])
                static[1].copy_(fresh[1])
                g.replay()
                ref = ref_rounds(fresh, chunks)
                err_graph = max(err_graph, max((a.float() - b.float()).abs().max().item() for a, b in zip(outs, ref)))
            torch.cuda.synchronize()
            ok = err_eager == 0 and err_graph == 0
            report(check="exact", signal=mode, local=local, sm_peers=sm, in_place=in_place, chunks=chunks, parts=parts,
                   err_eager=err_eager, err_graph=err_graph, ok=ok)
            del g
    os.environ["XDIT_CE_SM_PEERS"] = "0"
    ex.clear()
    in_place = False
    if args.exact_only:
        return _finish(rows, args.out, rank)
    # ---- timing: FLUX single block at 1024² (4608 tokens, 24 x 128 heads) on n ranks
    T, Hh, Dh = 4608 // n * n, 24, 128
    hs = Hh // n
    Sl = T // n
    a_mlp = torch.randn(Sl, 3072, device=dev, dtype=bf)
    w_mlp = torch.randn(3072, 12288, device=dev, dtype=bf) * 0.01
    a_out = torch.randn(Sl, 12288, device=dev, dtype=bf)
    w_out = torch.randn(12288, 3072, device=dev, dtype=bf) * 0.01
    q0, k0, v0 = (torch.randn(1, Hh, Sl, Dh, device=dev, dtype=bf) for _ in range(3))

    def step_nccl(slot):
        outs = []
        for t in (q0, k0, v0):
            send = t.transpose(1, 2).reshape(1, Sl, n, hs, Dh).permute(2, 0, 1, 3, 4).contiguous()
            recv = torch.empty_like(send)
            dist.all_to_all_single(recv, send)
            outs.append(recv.permute(1, 3, 0, 2, 4).reshape(1, hs, T, Dh))
        m = a_mlp @ w_mlp
        o = F.scaled_dot_product_attention(*outs)
        send = o.reshape(1, hs, n, Sl, Dh).permute(2, 0, 1, 3, 4).contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send)
        r = a_out @ w_out
        return recv, m, r

    def step_ce(slot):
        toks = [ops.a2a_start(t, gname, kd, slot) for t, kd in ((v0, "v"), (k0, "k"), (q0, "q"))]
        m = a_mlp @ w_mlp
        vv, kk, qq = (ops.a2a_wait([tk], [t], gname, kd, slot) for tk, t, kd in zip(toks, (v0, k0, q0), "vkq"))
        o = F.scaled_dot_product_attention(qq, kk, vv)
        tok = ops.a2a_start(o, gname, "o", slot)
        r = a_out @ w_out
        return ops.a2a_wait([tok], [o], gname, "o", slot), m, r

    def step_compute(slot):
        m = a_mlp @ w_mlp
        o = F.scaled_dot_product_attention(q0[:, :hs].repeat(1, 1, n, 1), k0[:, :hs].repeat(1, 1, n, 1),
                                           v0[:, :hs].repeat(1, 1, n, 1))
        return o, m, a_out @ w_out

    def timed(step, env):
        os.environ.update(env)
        fn = lambda: [step(i % 2) for i in range(20)]  # noqa: E731
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        ts = []
        for _ in range(12):
            dist.barrier()
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b) / 20)
        return statistics.median(ts[2:])

    # the copies alone (no completion signal): 2-D pieces as the op sends q/k/v (rows of h * D elements out of
    # H * D) against 1-D pieces of the same bytes, one stream per peer, joined back
    import torch.distributed._symmetric_memory as symm_mem
    rbuf = symm_mem.empty(Sl * Hh * Dh, dtype=bf, device=dev)
    hdl = symm_mem.rendezvous(rbuf, gname)
    off = rbuf.data_ptr() - hdl.buffer_ptrs[rank]
    dptr = [p + off for p in hdl.buffer_ptrs]
    src = torch.randn(Sl, Hh * Dh, device=dev, dtype=bf)
    streams = [torch.cuda.Stream() for _ in range(n)]
    piece = Sl * hs * Dh * 2

    def copies(two_d, split=1):
        """split > 1: the same bytes in rows split times narrower (what more ranks / head chunks give)."""
        w, rows = hs * Dh * 2 // split, Sl * split

        def step(slot):
            ev = torch.cuda.current_stream().record_event()
            for _ in range(4):          # q, k, v, o
                for j in range(n):
                    streams[j].wait_event(ev)
                    dst = dptr[j] + rank * piece
                    if two_d:
                        ce_a2a._memcpy2d(dst, w, src.data_ptr() + j * w, n * w, w, rows, streams[j])
                    else:
                        ce_a2a._memcpy2d(dst, piece, src.data_ptr() + j * piece, piece, piece, 1, streams[j])
            for j in range(n):
                torch.cuda.current_stream().wait_stream(streams[j])
        return step

    cases = [(f"copies 2-D alone, rows of {hs * Dh * 2 // k} B", copies(True, k), {}) for k in (1, 2, 4)]
    # the own piece (a copy inside this GPU) at FLUX 2048² on n ranks: q, k, v, o pieces of 16896 / n tokens x
    # 24 / n heads out of 24, the driver's 2-D copy kernel (XDIT_CE_LOCAL=driver) against local_copy.copy2d
    from xdit_compile.runtime.local_copy import copy2d
    rows2, w2 = 16896 // n, 24 // n * Dh
    own_src = torch.randn(rows2, 24 * Dh, device=dev, dtype=bf)
    own_dst = torch.empty(4, n * rows2, w2, device=dev, dtype=bf)

    def own(triton_kernel):
        def step(slot):
            for p in range(4):
                if triton_kernel:
                    copy2d(own_dst, (p * n + rank) * rows2 * w2, w2, own_src, rank * w2, 24 * Dh, w2, rows2)
                else:
                    ce_a2a._memcpy2d(own_dst[p, rank * rows2:].data_ptr(), w2 * 2,
                                     own_src.data_ptr() + rank * w2 * 2, 24 * Dh * 2, w2 * 2, rows2,
                                     torch.cuda.current_stream())
        return step
    cases += [("own piece x4 at FLUX 2048², driver 2-D copy", own(False), {}),
              ("own piece x4 at FLUX 2048², local_copy.copy2d", own(True), {})]
    for name, step, env in (*cases, ("copies 1-D alone", copies(False), {}),
                            ("compute only", step_compute, {}), ("nccl", step_nccl, {}),
                            ("ce barrier", step_ce, {"XDIT_CE_SIGNAL": "barrier", "XDIT_CE_LOCAL": "driver"}),
                            ("ce barrier, triton own piece", step_ce, {"XDIT_CE_SIGNAL": "barrier",
                                                                       "XDIT_CE_LOCAL": "triton"}),
                            ("ce flag", step_ce, {"XDIT_CE_SIGNAL": "flag", "XDIT_CE_LOCAL": "driver"}),
                            ("ce spin", step_ce, {"XDIT_CE_SIGNAL": "spin", "XDIT_CE_LOCAL": "driver"})):
        ms = timed(step, env)
        report(timing=name, ranks=n, ms_per_block=round(ms, 4), gpu=torch.cuda.get_device_name())
    _finish(rows, args.out, rank)


def _finish(rows, out, rank):
    if rank == 0 and out:
        with open(out, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    bad = [r for r in rows if r.get("ok") is False]
    dist.destroy_process_group()
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
