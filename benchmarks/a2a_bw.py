"""All-to-all bandwidth on this machine at the sizes a Ulysses step moves: NCCL all_to_all_single vs a
copy-engine all-to-all through torch symmetric memory (each rank copies its pieces straight into the peers'
buffers with cudaMemcpyAsync, no SMs used, then a barrier).

    torchrun --nproc_per_node=4 benchmarks/a2a_bw.py [--sizes-mb 7 21 28 78] [--out a2a.json]

Sizes are per-rank send buffers: 21 MB = q, k, v of one FLUX block at 1024² on 4 ranks (3 x 1152 tokens x 3072
x bf16), 7 MB = its output; 78 MB = q, k, v at 2048². Also times an all-to-all issued on a side stream while
an 8192x3072x3072 matmul runs (does NCCL slow the matmul / does the matmul slow NCCL). Prints one line a case.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
import torch.distributed as dist
from gpu_util import init_nccl


def timed(fn, iters=20, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        dist.barrier()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes-mb", type=float, nargs="+", default=[7, 21, 28, 78])
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    dev, rank, n = init_nccl()
    rows = []
    env = {k: v for k, v in os.environ.items() if k.startswith("NCCL_") and "NVLS" not in k}

    def report(case, mb, ms, extra=None):
        gbs = mb * (n - 1) / n / ms  # bytes leaving this rank per ms = GB/s
        row = {"case": case, "mb": mb, "ms": round(ms, 4), "GB/s sent": round(gbs, 1), "env": env, **(extra or {})}
        rows.append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)

    symm = None
    try:
        import torch.distributed._symmetric_memory as symm_mem
        symm = symm_mem
    except Exception as e:  # noqa: BLE001
        if rank == 0:
            print(f"no symmetric memory: {e}")
    import xdit_compile  # noqa: F401  (registers xdit::symm_all_to_all)
    from xdit_compile.runtime import symm_a2a
    gname = dist.group.WORLD.group_name
    for mb in args.sizes_mb:
        numel = int(mb * 2**20 / 2) // n * n
        x = torch.randn(numel, device=dev, dtype=torch.bfloat16)
        y = torch.empty_like(x)
        report("nccl all_to_all_single", mb, timed(lambda: dist.all_to_all_single(y, x)))
        try:
            xs = x.view(n, -1)
            op = torch.ops.xdit.symm_all_to_all
            ms = timed(lambda: op(xs, gname))
            dist.all_to_all_single(y, x)
            same = bool(torch.equal(op(xs, gname).view(-1), y)) and bool(torch.equal(op(xs, gname).view(-1), y))
            g = torch.cuda.CUDAGraph()   # captured in a CUDA graph, as Inductor's cudagraphs replays it
            with torch.cuda.graph(g):
                z = op(xs, gname)
            g.replay()
            torch.cuda.synchronize()
            same_graph = bool(torch.equal(z.view(-1), y))
            ms_graph = timed(g.replay)
            report("xdit.symm_all_to_all (Triton stores + barrier + copy out)", mb, ms,
                   {"equal_to_nccl": same, "symm_path": symm_a2a.available(gname, dev)})
            report("xdit.symm_all_to_all in a CUDA graph", mb, ms_graph, {"equal_to_nccl": same_graph})
        except Exception as e:  # noqa: BLE001
            if rank == 0:
                print(f"xdit.symm_all_to_all failed: {type(e).__name__}: {e}"[:600], flush=True)
        if symm is not None:
            try:
                buf = symm.empty(numel, dtype=torch.bfloat16, device=dev)
                hdl = symm.rendezvous(buf, dist.group.WORLD.group_name)
                chunk = numel // n
                peers = [hdl.get_buffer(j, (numel,), torch.bfloat16) for j in range(n)]
                side = torch.cuda.Stream()

                def ce():
                    for j in range(n):
                        peers[j][rank * chunk:(rank + 1) * chunk].copy_(x[j * chunk:(j + 1) * chunk])
                    hdl.barrier()

                ms = timed(ce)
                ref = torch.empty_like(x)
                dist.all_to_all_single(ref, x)
                ce()
                torch.cuda.synchronize()
                same = bool(torch.equal(buf, ref))
                report("symm_mem copy-engine all-to-all", mb, ms, {"equal_to_nccl": same})
                del side
            except Exception as e:  # noqa: BLE001
                if rank == 0:
                    print(f"symm_mem all-to-all failed: {type(e).__name__}: {e}"[:400], flush=True)
                symm = None
    # overlap: matmul alone, a2a alone, both (a2a on a side stream)
    a = torch.randn(8192, 3072, device=dev, dtype=torch.bfloat16)
    w = torch.randn(3072, 3072, device=dev, dtype=torch.bfloat16)
    numel = int(21 * 2**20 / 2) // n * n
    x = torch.randn(numel, device=dev, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    side = torch.cuda.Stream()

    def mm():
        for _ in range(4):
            a @ w

    def both():
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            dist.all_to_all_single(y, x)
        mm()
        torch.cuda.current_stream().wait_stream(side)

    t_mm, t_a2a, t_both = timed(mm), timed(lambda: dist.all_to_all_single(y, x)), timed(both)
    if rank == 0:
        print(json.dumps({"case": "overlap 21MB a2a || 4 x (8192x3072x3072 mm)", "mm ms": round(t_mm, 3),
                          "a2a ms": round(t_a2a, 3), "both ms": round(t_both, 3),
                          "sum ms": round(t_mm + t_a2a, 3)}), flush=True)
        rows.append({"case": "overlap", "mm": t_mm, "a2a": t_a2a, "both": t_both})
        if args.out:
            with open(args.out, "a") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
