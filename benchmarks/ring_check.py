"""GPU check and timing of ring attention's two k/v transfers: the copy engines (runtime/ce_ring.py) against NCCL
send/recv (runtime/attention._ring).

    torchrun --nproc_per_node=N benchmarks/ring_check.py [--out ring_check.jsonl] [--md ring_check.md]

Correctness, per transfer and shape: ROUNDS calls in a row with fresh bf16 q/k/v (the copy-engine receive buffers
and flags reused from call to call), eagerly and as one CUDA graph of ROUNDS calls replayed twice with fresh inputs;
each rank's output against attention of its queries over the all-gathered k/v (one kernel, the same backend):
rel err (bf16: ~1e-3 expected; a missing or stale block gives ~0.1-1).
Timing: a CUDA graph of REPS calls, ms per call (median of 5), for both transfers and for the rank's attention
alone (its queries over every key in one kernel, no transfer: what the ring must approach), at the ring shapes of
FLUX.1-dev 2048² and Wan2.1-14B 480p on N ranks (batch 1, bf16, attention backend "auto").
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.distributed as dist
from gpu_util import init_nccl, reporter

ROUNDS, REPS = 4, 5
SHAPES = {"flux2048": (24, 16896, 128), "wan480": (40, 32760, 128), "small": (4, 4096, 64)}   # heads, tokens, dim


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    ap.add_argument("--md", default="")
    ap.add_argument("--shapes", default="small,flux2048,wan480")
    args = ap.parse_args()
    dev, rank, n = init_nccl()
    import xdit_compile  # noqa: F401  (registers the ops)
    from xdit_compile.runtime import ce_a2a
    from xdit_compile.runtime._lse import attention_with_lse
    gname = dist.group.WORLD.group_name
    assert ce_a2a.available(gname, dev), "copy-engine path not available on this machine"
    rows, report = reporter(rank)

    for shape in args.shapes.split(","):
        h, total, d = SHAPES[shape]
        s = total // n
        sizes = [s] * n

        def ring(q, k, v, transfer):
            return torch.ops.xdit.ring_attention(q, k, v, None, None, False, gname, sizes, "auto", transfer)

        def fresh(seed):
            g = torch.Generator(device=dev).manual_seed(seed * 1000 + rank)
            return [torch.randn(1, h, s, d, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3)]

        def reference(q, k, v):
            ks, vs = [torch.empty_like(k) for _ in range(n)], [torch.empty_like(v) for _ in range(n)]
            dist.all_gather(ks, k)
            dist.all_gather(vs, v)
            return attention_with_lse(q, torch.cat(ks, 2), torch.cat(vs, 2), None, None, "auto")[0]

        def rel(out, ref):
            err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            t = torch.tensor([err], device=dev)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            return t.item()

        for transfer in ("copy_engine", "nccl"):
            eager = []
            for r in range(ROUNDS):
                q, k, v = fresh(r)
                eager.append(rel(ring(q, k, v, transfer), reference(q, k, v)))
            # one CUDA graph of ROUNDS calls on static inputs, replayed with fresh values
            static = [fresh(100 + r) for r in range(ROUNDS)]
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                for _ in range(2):
                    [ring(*x, transfer) for x in static]
            torch.cuda.current_stream(dev).wait_stream(side)
            torch.cuda.synchronize(dev)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outs = [ring(*x, transfer) for x in static]
            replay = []
            for it in range(2):
                for r, x in enumerate(static):
                    for dst, src in zip(x, fresh(200 + 10 * it + r)):
                        dst.copy_(src)
                graph.replay()
                replay += [rel(o, reference(*x)) for o, x in zip(outs, static)]
            report(check=shape, transfer=transfer, n=n, eager_rel_err=max(eager), graph_rel_err=max(replay),
                   ok=max(eager + replay) < 2e-2)
            del graph, outs, static
        # timing: REPS calls per graph
        q, k, v = fresh(7)
        kk, vv = [torch.empty_like(k) for _ in range(n)], [torch.empty_like(v) for _ in range(n)]
        dist.all_gather(kk, k)
        dist.all_gather(vv, v)
        k_all, v_all = torch.cat(kk, 2), torch.cat(vv, 2)
        steps = {"copy_engine": lambda: ring(q, k, v, "copy_engine"), "nccl": lambda: ring(q, k, v, "nccl"),
                 "attention alone": lambda: attention_with_lse(q, k_all, v_all, None, None, "auto")[0]}
        for name, step in steps.items():
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                for _ in range(2):
                    step()
            torch.cuda.current_stream(dev).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(REPS):
                    step()
            times = []
            for _ in range(6):
                dist.barrier()
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                graph.replay()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / REPS)
            t = torch.tensor([statistics.median(times[1:])], device=dev)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            report(time=shape, what=name, n=n, ms_per_call=round(t.item(), 3))
            del graph
    if rank == 0:
        if args.out:
            with open(args.out, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        if args.md:
            lines = [f"# ring attention transfers on {n} x {torch.cuda.get_device_name(dev)}", "",
                     "| shape | transfer | eager rel err | CUDA-graph rel err | ok |", "|---|---|---|---|---|"]
            lines += [f"| {r['check']} | {r['transfer']} | {r['eager_rel_err']:.2e} | {r['graph_rel_err']:.2e} | "
                      f"{r['ok']} |" for r in rows if "check" in r]
            lines += ["", "| shape | what | ms per call (slowest rank) |", "|---|---|---|"]
            lines += [f"| {r['time']} | {r['what']} | {r['ms_per_call']} |" for r in rows if "time" in r]
            with open(args.md, "w") as f:
                f.write("\n".join(lines) + "\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
