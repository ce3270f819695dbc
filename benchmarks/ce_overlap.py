"""Does an all-to-all hide behind a matmul? NCCL vs xdit.symm_all_to_all (SM stores) vs copy-engine copies into
the peers' symmetric-memory buffers (cudaMemcpyAsync, one stream per peer, then a signal-pad barrier).

    torchrun --nproc_per_node=4 benchmarks/ce_overlap.py [--out ce.jsonl]

The pattern is a FLUX single block at 1024² on 4 ranks: q/k/v all-to-all (21 MB) beside proj_mlp
(1152 x 3072 @ 3072 x 12288), output all-to-all (7 MB) beside the mlp half of proj_out (1152 x 12288 @ 12288 x 3072).
Each case runs ITERS rounds back to back (as a denoising loop does) and reports ms per round: matmul alone,
all-to-all alone, both (all-to-all on side streams, joined before the next round), eager and in a CUDA graph.
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.distributed as dist
from gpu_util import init_nccl

ITERS = 20


def timed(fn, reps=10):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        dist.barrier()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / ITERS)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    dev, rank, n = init_nccl()
    import torch.distributed._symmetric_memory as symm
    import xdit_compile  # noqa: F401  (registers xdit::symm_all_to_all)
    gname = dist.group.WORLD.group_name
    bf = torch.bfloat16
    rows = []

    def report(**kw):
        rows.append(kw)
        if rank == 0:
            print(json.dumps(kw), flush=True)

    streams = [torch.cuda.Stream() for _ in range(n)]
    side = torch.cuda.Stream()
    for mb, (m, k, nn) in ((21, (1152, 3072, 12288)), (7, (1152, 12288, 3072))):
        a = torch.randn(m, k, device=dev, dtype=bf)
        w = torch.randn(k, nn, device=dev, dtype=bf)
        numel = int(mb * 2**20 / 2) // n * n
        chunk = numel // n
        x = torch.randn(numel, device=dev, dtype=bf)
        y = torch.empty_like(x)
        ref = torch.empty_like(x)
        dist.all_to_all_single(ref, x)
        bufs = [symm.empty(numel, dtype=bf, device=dev) for _ in range(2)]
        hdls = [symm.rendezvous(b, gname) for b in bufs]
        peers = [[h.get_buffer(j, (numel,), bf) for j in range(n)] for h in hdls]
        state = {"i": 0}
        out = {}

        def ce_par():
            """one stream per destination; returns after queuing; joins into `side`."""
            i = state["i"]
            state["i"] = 1 - i
            ev = torch.cuda.current_stream().record_event()
            for j in range(n):
                s = streams[j]
                s.wait_event(ev)
                with torch.cuda.stream(s):
                    peers[i][j][rank * chunk:(rank + 1) * chunk].copy_(x[j * chunk:(j + 1) * chunk])
                side.wait_stream(s)
            with torch.cuda.stream(side):
                hdls[i].barrier(channel=i)
            out["y"] = bufs[i]

        def ce_seq():
            i = state["i"]
            state["i"] = 1 - i
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for j in range(n):
                    peers[i][j][rank * chunk:(rank + 1) * chunk].copy_(x[j * chunk:(j + 1) * chunk])
                hdls[i].barrier(channel=i)
            out["y"] = bufs[i]

        def nccl():
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                dist.all_to_all_single(y, x)
            out["y"] = y

        def symm_op():
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out["y"] = torch.ops.xdit.symm_all_to_all(x.view(n, -1), gname).view(-1)

        def mm_loop():
            for _ in range(ITERS):
                a @ w

        for name, fn in (("nccl", nccl), ("symm_op", symm_op), ("ce_seq", ce_seq), ("ce_par", ce_par)):
            def alone():
                for _ in range(ITERS):
                    fn()
                    torch.cuda.current_stream().wait_stream(side)

            def both():
                for _ in range(ITERS):
                    fn()
                    a @ w
                    torch.cuda.current_stream().wait_stream(side)

            try:
                both()
                torch.cuda.synchronize()
                same = bool(torch.equal(out["y"].view(-1), ref))
                t_mm, t_a2a, t_both = timed(mm_loop), timed(alone), timed(both)
                row = dict(mb=mb, mm=f"{m}x{k}x{nn}", a2a=name, equal=same, mm_ms=round(t_mm, 4),
                           a2a_ms=round(t_a2a, 4), both_ms=round(t_both, 4),
                           hidden=round((t_mm + t_a2a - t_both) / t_a2a, 2))
                try:  # the same rounds captured in one CUDA graph (how Inductor's cudagraphs replays them)
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g):
                        both()
                    g2 = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g2):
                        alone()
                    row.update(graph_a2a_ms=round(timed(g2.replay), 4), graph_both_ms=round(timed(g.replay), 4))
                    g.replay()
                    torch.cuda.synchronize()
                    row["graph_equal"] = bool(torch.equal(out["y"].view(-1), ref))
                except Exception as e:  # noqa: BLE001
                    row["graph_error"] = f"{type(e).__name__}: {e}"[:300]
                report(**row)
            except Exception as e:  # noqa: BLE001
                report(mb=mb, a2a=name, error=f"{type(e).__name__}: {e}"[:400])
    # the ops decompose_ulysses emits with compile.all_to_all = "copy_engine": FLUX 1024² shapes, (B, H, S, D)
    # in (B, S, H, D) memory as the projections leave q/k/v, each checked against a full-size reference
    H, S, D = 24, 4608 // n, 128
    torch.manual_seed(0)
    full = [torch.randn(1, n * S, H, D, device=dev, dtype=bf) for _ in range(3)]   # same on every rank
    xs = [f[:, rank * S:(rank + 1) * S].contiguous().transpose(1, 2) for f in full]
    h = H // n
    refs = [f[:, :, rank * h:(rank + 1) * h].transpose(1, 2) for f in full]
    a = torch.randn(S, 3072, device=dev, dtype=bf)
    w = torch.randn(3072, 12288, device=dev, dtype=bf)
    start, wait = torch.ops.xdit.a2a_start, torch.ops.xdit.a2a_wait

    def qkv(with_mm: bool):
        out = []
        for _ in range(ITERS):
            ts = [start(x, gname, kd, 0) for x, kd in zip(xs, "qkv")]
            if with_mm:
                a @ w
            out = [wait([t], [x], gname, kd, 0) for t, x, kd in zip(ts, xs, "qkv")]
            o = out[0] * 1     # "attention output" (B, h, L, D), (B, L, h, D) memory like SDPA's
            o = o.transpose(1, 2).contiguous().transpose(1, 2)
            back = wait([start(o, gname, "o", 0)], [o], gname, "o", 0)
            out.append(back)
        return out

    from xdit_compile.runtime import ce_a2a
    try:
        got = qkv(False)
        torch.cuda.synchronize()
        row = dict(a2a="xdit.a2a_start/wait q,k,v (7 MB each) + o", ce_path=ce_a2a.available(gname, dev),
                   equal=all(torch.equal(g, r) for g, r in zip(got[:3], refs)) and torch.equal(got[3], xs[0]),
                   mm_ms=timed(lambda: [a @ w for _ in range(ITERS)]), a2a_ms=timed(lambda: qkv(False)),
                   both_ms=timed(lambda: qkv(True)))
        g1, g2 = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(g1):
            got = qkv(False)
        with torch.cuda.graph(g2):
            qkv(True)
        g1.replay()
        torch.cuda.synchronize()
        row.update(graph_equal=all(torch.equal(g, r) for g, r in zip(got[:3], refs)) and torch.equal(got[3], xs[0]),
                   graph_a2a_ms=timed(g1.replay), graph_both_ms=timed(g2.replay))
        # head chunks (compile.ulysses_chunks = 2): per chunk q/k/v start + wait, output chunks back, one wait
        def chunked():
            res = []
            for c in range(2):
                ts = [start(x, gname, kd, 1, c, 2) for x, kd in zip(xs, "qkv")]
                res.append([wait([t], [x], gname, kd, 1, c, 2) for t, x, kd in zip(ts, xs, "qkv")])
            os_ = [r[0] * 1 for r in res]
            back = wait([start(o, gname, "o", 1, c, 2) for c, o in enumerate(os_)], os_, gname, "o", 1, 0, 2)
            return res, back
        res, back = chunked()
        g3 = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g3):
            res3, back3 = chunked()
        g3.replay()
        torch.cuda.synchronize()
        ok = all(torch.equal(res3[c][i], refs[i][:, c * (h // 2):(c + 1) * (h // 2)]) for c in range(2) for i in range(3))
        row.update(chunks2_equal=ok and torch.equal(back3, xs[0]) and torch.equal(back, xs[0]))
        report(**row)
    except Exception as e:  # noqa: BLE001
        import traceback
        report(a2a="xdit.a2a_start/wait", error=traceback.format_exc()[-1500:])
    if rank == 0 and args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
