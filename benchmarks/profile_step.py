"""Where one parallel transformer step spends its time: torch.profiler over 3 steps, GPU kernel time by kind.

    torchrun --nproc_per_node=4 benchmarks/profile_step.py --model flux1024 --ulysses 4 --lowering inductor \
        --out $OUT/profile_flux1024.md
    torchrun --nproc_per_node=2 benchmarks/profile_step.py --tiny --model flux1024 --ulysses 2 --out /tmp/p.md
    python benchmarks/profile_step.py --model flux2048 --fake-world 4 --cudagraphs --out $OUT/rank.md   # one GPU:
        # a ulysses-4 rank's kernels alone (benchmarks/gpu_rank_kernels.sh)

Kinds (by kernel name): communication (nccl), attention (flash / cudnn / fmha kernels), matmul (gemm, cutlass,
nvjet, sm90 kernels, Inductor's triton_tem GEMM templates), fused elementwise (Inductor's other triton kernels),
other. "idle" = wall time per step minus
the GPU kernel time of rank 0's stream work: time the GPU waited on the CPU (launches) or on nothing. "no compute
running" = wall time per step minus the union of compute kernels over all streams (CUDA graphs spread one stream's
kernels over several, so the plain sum can exceed the wall time).
The NCCL kernel time includes waiting for the slowest rank, so it is an upper bound of the wire time.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CE = "copy engine (memcpy; runs beside kernels, not in the busy sum)"
KINDS = [("communication (NCCL)", ("nccl",)),
         (CE, ("memcpy",)),
         ("symm-mem barrier", ("barrier",)),
         ("attention", ("flash", "cudnn", "fmha", "attention", "sdpa")),
         ("layout copies (aten copy / cat)", ("copy_kernel", "catarraybatchedcopy", "direct_copy")),
         ("matmul", ("gemm", "cutlass", "nvjet", "sm90_x", "sm80_x", "matmul", "cublas")),
         ("fused elementwise (triton)", ("triton_",))]


def kind(name: str) -> str:
    low = name.lower()
    if low.startswith("triton_tem"):   # Inductor's Triton GEMM templates (compile.max_autotune), epilogue fused in
        return "matmul"
    if low.startswith("triton_"):   # Inductor names kernels after the ops it fused (e.g. "..._ulysses_attention_...")
        return "fused elementwise (triton)"
    if low.startswith("memcpydtod"):  # the driver's 2-D copy inside one GPU is a kernel on the SMs, not a copy engine
        return "layout copies (aten copy / cat)"
    for k, keys in KINDS:
        if any(s in low for s in keys):
            return k
    return "other"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="flux1024")
    ap.add_argument("--ulysses", type=int, default=0, help="default: world size")
    ap.add_argument("--ring", type=int, default=1)
    ap.add_argument("--lowering", default="inductor")
    ap.add_argument("--cudagraphs", action="store_true")
    ap.add_argument("--all-to-all", default="", help="compile.all_to_all (nccl, symm_mem, allgather_kv, copy_engine)")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--layers", type=int, default=0, help="keep only this many blocks (Flux: and 2x single blocks)")
    ap.add_argument("--compile-json", default="", help='more compile options, e.g. \'{"fuse_modulation": true}\'')
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default="profile.md")
    ap.add_argument("--trace", default="", help="also write rank 0's chrome trace here (.json.gz); "
                    "a path with {rank} makes every rank write its own")
    ap.add_argument("--ops", action="store_true", help="add the CPU ops that launched the most GPU time "
                    "(with input shapes; meaningful without --cudagraphs, where kernels keep their launcher)")
    ap.add_argument("--skew", action="store_true", help="every rank's compute kernels, matched by position, and "
                    "each GPU's SM clock and power (nvidia-smi) while profiling: how much of a step is one rank "
                    "waiting for a slower one")
    ap.add_argument("--fake-world", type=int, default=0, help="one process on one device standing for rank 0 of a "
                    "world of this size: torch's fake process group makes every collective a no-op, so the profile is "
                    "a rank's compute kernels at that degree's shapes with zero-cost communication (outputs are "
                    "meaningless). --all-to-all nccl (default) or copy_engine (then only the own piece of each "
                    "transfer is copied, by the SMs as on GPUs; the peers' pieces are the copy engines' work)")
    ap.add_argument("--top", type=int, default=15, help="how many kernels the top-kernel table lists")
    ap.add_argument("--dump-after", type=float, default=0, help="print every thread's Python stack after this many "
                    "seconds (where a stuck run waits)")
    args = ap.parse_args()
    if args.dump_after:
        import faulthandler
        faulthandler.dump_traceback_later(args.dump_after, exit=False)

    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    import bench
    import xdit_compile

    lr = int(os.environ.get("LOCAL_RANK", 0))
    if args.tiny:
        device, dtype, backend = torch.device("cpu"), torch.float32, "gloo"
    else:
        torch.cuda.set_device(lr)
        device, dtype, backend = torch.device("cuda", lr), torch.bfloat16, "nccl"
    if args.fake_world:
        from torch.testing._internal.distributed.fake_pg import FakeStore
        if args.all_to_all not in ("", "nccl", "copy_engine"):
            sys.exit(f"--fake-world runs the collectives as no-ops; --all-to-all {args.all_to_all} needs real peers "
                     "(use nccl or copy_engine)")
        dist.init_process_group("fake", rank=0, world_size=args.fake_world, store=FakeStore())
        args.all_to_all = args.all_to_all or "nccl"
    else:
        dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    m = bench.build_model(args.model, args.tiny, device, dtype, layers=args.layers)
    inputs = bench.make_inputs(args.model, args.tiny, device, dtype)
    comp = {"lowering": args.lowering}
    if args.cudagraphs:
        comp["cudagraphs"] = True
    if args.all_to_all:
        comp["all_to_all"] = args.all_to_all
    if args.compile_json:
        comp.update(json.loads(args.compile_json))
    plan = {"parallel": {"ulysses": args.ulysses or world // args.ring, "ring": args.ring}, "compile": comp}
    xdit_compile.parallelize(m, plan)
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        t = time.perf_counter()
        m(**inputs)
        sync()
        first_s = time.perf_counter() - t
        if rank == 0:
            print(f"first call (compile): {first_s:.1f} s", flush=True)
        for _ in range(2):
            m(**inputs)
        sync()
        dist.barrier()
        # CPU time of one call (no sync): above the GPU time, the step is launch-bound
        cpu_ms = []
        for _ in range(5):
            sync()
            t = time.perf_counter()
            m(**inputs)
            cpu_ms.append((time.perf_counter() - t) * 1e3)
            sync()
        sync()
        t = time.perf_counter()
        for _ in range(5):
            m(**inputs)
        sync()
        loop_ms = (time.perf_counter() - t) / 5 * 1e3
        dist.barrier()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        smi = start_smi() if args.skew and rank == 0 and device.type == "cuda" else None
        with profile(activities=acts, record_shapes=args.ops) as prof:
            t = time.perf_counter()
            for _ in range(args.steps):
                m(**inputs)
            sync()
            wall = (time.perf_counter() - t) / args.steps * 1e3
    skew_lines = skew(prof, device, args.steps, smi) if args.skew else []
    if args.trace and "{rank}" in args.trace:
        prof.export_chrome_trace(args.trace.format(rank=rank))
    if rank == 0:
        per: dict[str, float] = {}
        top: dict[str, float] = {}
        for e in prof.events():
            if device.type == "cuda" and e.device_type.name != "CUDA":
                continue
            if e.name.startswith("## "):   # GPU-side ranges (Inductor's "## Call CompiledFxGraph ..."), not kernels
                continue
            if device.type == "cpu" and e.cpu_parent is not None:
                continue
            us = (e.device_time if device.type == "cuda" else e.cpu_time) / args.steps
            per[kind(e.name)] = per.get(kind(e.name), 0.0) + us
            top[e.name] = top.get(e.name, 0.0) + us
        busy = sum(us for k, us in per.items() if k != CE) / 1e3
        layers = f" ({args.layers} layers)" if args.layers else ""
        if args.fake_world:
            layers += " (fake process group: rank 0's kernels, every collective a no-op)"
        lines = [f"# Profile: {args.model}{layers}, plan {plan}, {world} ranks, {torch.cuda.get_device_name(0) if device.type == 'cuda' else 'cpu'}",
                 "", f"first call (compile, CUDA-graph capture): {first_s:.1f} s", "", f"wall per step (profiled, rank 0): {wall:.1f} ms; GPU kernel time {busy:.1f} ms; "
                 f"idle {max(wall - busy, 0):.1f} ms", "", "| kind | ms/step | share of wall |", "|---|---|---|"]
        for k, us in sorted(per.items(), key=lambda kv: -kv[1]):
            lines.append(f"| {k} | {us / 1e3:.1f} | {us / 1e3 / wall:.0%} |")
        lines.append(f"| idle (GPU waits) | {max(wall - busy, 0):.1f} | {max(wall - busy, 0) / wall:.0%} |")
        if device.type == "cuda":
            union = compute_union([(e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                                   if e.device_type.name == "CUDA" and not e.name.startswith("## ")]) / 1e3 / args.steps
            lines += ["", f"compute kernels on any stream, as a union: {union:.1f} ms/step; no compute running: "
                      f"{max(wall - union, 0):.1f} ms/step (transfers and barrier waits with nothing beside them, "
                      "launch gaps)"]
        lines += ["", f"CPU time of one call (no sync, median of 5): {sorted(cpu_ms)[2]:.1f} ms; "
                  f"5 calls back to back: {loop_ms:.1f} ms/call (unprofiled)"]
        lines += gaps(prof, device, args.steps) + skew_lines
        if args.ops:
            lines += ["", "CPU ops by the GPU time they launched (self), top 25:", "",
                      "| op | input shapes | calls/step | GPU ms/step |", "|---|---|---|---|"]
            for e in sorted(prof.key_averages(group_by_input_shape=True),
                            key=lambda e: -e.self_device_time_total)[:25]:
                lines.append(f"| `{e.key[:60]}` | `{str(e.input_shapes)[:100]}` | {e.count / args.steps:.0f} | "
                             f"{e.self_device_time_total / 1e3 / args.steps:.2f} |")
        lines += ["", "Top kernels:", "", "| kernel | kind | ms/step |", "|---|---|---|"]
        for name, us in sorted(top.items(), key=lambda kv: -kv[1])[:args.top]:
            lines.append(f"| `{name[:90]}` | {kind(name)} | {us / 1e3:.2f} |")
        text = "\n".join(lines) + "\n"
        if args.trace and "{rank}" not in args.trace:
            prof.export_chrome_trace(args.trace)
        print(text, flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
    # No barrier / destroy: on 4 H100s the ranks waiting for rank 0's event analysis hung in NCCL teardown
    # until the time limit; nothing is left to communicate, so every rank just leaves.
    sys.stdout.flush()
    os._exit(0)


def physical_gpu(device) -> int | None:
    """nvidia-smi's index of this process's GPU (it ignores CUDA_VISIBLE_DEVICES, which renumbers the GPUs torch
    sees); None where CUDA_VISIBLE_DEVICES names GPUs by UUID. Assumes CUDA numbers the GPUs in PCI bus order, as
    nvidia-smi does (CUDA_DEVICE_ORDER=PCI_BUS_ID, or a machine of identical GPUs)."""
    import os
    vis = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    idx = device.index if device.index is not None else 0
    if not vis:
        return idx
    ids = [v.strip() for v in vis.split(",")]
    return int(ids[idx]) if idx < len(ids) and ids[idx].isdigit() else None


def start_smi():
    """Sample every GPU's SM clock, power and temperature every 100 ms (nvidia-smi) until stop_smi."""
    import subprocess
    import tempfile
    f = tempfile.TemporaryFile("w+")
    try:
        p = subprocess.Popen(["nvidia-smi", "--query-gpu=index,clocks.sm,power.draw,temperature.gpu",
                              "--format=csv,noheader,nounits", "-lms", "100"], stdout=f, stderr=subprocess.DEVNULL)
    except OSError:
        return None
    return p, f


def stop_smi(smi) -> dict:
    """{gpu index: (mean SM MHz, mean W, max C, samples)} from start_smi's samples."""
    if smi is None:
        return {}
    p, f = smi
    p.terminate()
    p.wait()
    f.seek(0)
    acc: dict = {}
    for line in f:
        try:
            i, mhz, w, c = (float(v) for v in line.split(","))
        except ValueError:
            continue
        acc.setdefault(int(i), []).append((mhz, w, c))
    return {i: (sum(v[0] for v in vs) / len(vs), sum(v[1] for v in vs) / len(vs), max(v[2] for v in vs), len(vs))
            for i, vs in acc.items()}


def skew(prof, device, steps, smi) -> list[str]:
    """Every rank's compute kernels (attention, matmul, Inductor's triton) in launch order, gathered on rank 0.

    The ranks run the same graph, so kernel i is the same work everywhere; a rank that runs it slower makes the
    others wait at the next transfer. Reported per rank: compute ms/step; and two bounds of what the slower ranks
    cost rank 0 per step: sum_i max_r d_ri - sum_i d_0i (kernel by kernel, the most) and
    max_r sum_i d_ri - sum_i d_0i (the whole step, the least)."""
    import torch.distributed as dist
    if device.type != "cuda":
        return []
    want = ("attention", "matmul", "fused elementwise (triton)")
    ks = sorted((e.time_range.start, e.time_range.end - e.time_range.start, kind(e.name)) for e in prof.events()
                if e.device_type.name == "CUDA" and kind(e.name) in want and not e.name.startswith("## "))
    mine = (physical_gpu(device), [(d, k) for _, d, k in ks])
    allr = [None] * dist.get_world_size()
    dist.all_gather_object(allr, mine)
    clocks = stop_smi(smi)
    if dist.get_rank() != 0:
        return []
    gpus = [g for g, _ in allr]
    allr = [ker for _, ker in allr]
    n = min(len(r) for r in allr)
    lines = ["", f"Rank skew ({n // steps} compute kernels per step matched by position; ms/step):", "",
             "| rank | GPU (nvidia-smi index) | compute | attention | matmul | SM clock MHz (mean) | power W (mean) | "
             "max temp C |", "|---|---|---|---|---|---|---|---|"]
    for r, ker in enumerate(allr):
        tot = sum(d for d, _ in ker[:n]) / 1e3 / steps
        att = sum(d for d, k in ker[:n] if k == "attention") / 1e3 / steps
        mm = sum(d for d, k in ker[:n] if k == "matmul") / 1e3 / steps
        c = clocks.get(gpus[r]) if gpus[r] is not None else None
        cs = f"{c[0]:.0f} | {c[1]:.0f} | {c[2]:.0f}" if c else "- | - | -"
        lines.append(f"| {r} | {'?' if gpus[r] is None else gpus[r]} | {tot:.2f} | {att:.2f} | {mm:.2f} | {cs} |")
    mine0 = sum(d for d, _ in allr[0][:n])
    per_kernel = sum(max(r[i][0] for r in allr) for i in range(n)) - mine0
    whole = max(sum(d for d, _ in r[:n]) for r in allr) - mine0
    lines += ["", f"slower ranks cost rank 0 between {whole / 1e3 / steps:.2f} (whole step) and "
              f"{per_kernel / 1e3 / steps:.2f} ms/step (kernel by kernel)"]
    return lines


NOT_COMPUTE = (CE, "symm-mem barrier")


def compute_union(kernels) -> float:
    """us covered by at least one compute kernel: kernels = (start us, end us, name) on any stream; copies, memsets
    and barrier kernels (they wait) do not count. Under CUDA graphs the kernels of one logical stream run on several
    streams, so the sum of kernel times is not the busy time; this is."""
    iv = sorted((a, b) for a, b, name in kernels
                if b > a and kind(name) not in NOT_COMPUTE and not name.lower().startswith("memset"))
    total, cur_a, cur_b = 0.0, None, None
    for a, b in iv:
        if cur_b is not None and a <= cur_b:
            cur_b = max(cur_b, b)
            continue
        if cur_b is not None:
            total += cur_b - cur_a
        cur_a, cur_b = a, b
    return total + (cur_b - cur_a if cur_b is not None else 0.0)


def gaps(prof, device, steps):
    """Where the GPU sat idle: gaps between consecutive kernels on rank 0's device (any stream)."""
    if device.type != "cuda":
        return []
    ks = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()   # kernels, not memcpys
                if e.device_type.name == "CUDA" and e.time_range.end > e.time_range.start and kind(e.name) != CE)
    out, end, prev, small = [], None, None, 0.0
    for start, stop, name in ks:
        if end is not None and start - end > 5:   # us
            out.append((start - end, prev, name))
        elif end is not None and start > end:
            small += start - end
        if end is None or stop > end:
            end, prev = stop, name
    total = sum(g for g, _, _ in out) / 1e3 / steps
    lines = ["", f"kernels per step: {len(ks) / steps:.0f}; gaps of <= 5 us between them (a CUDA graph's kernel to "
             f"kernel latency): {small / 1e3 / steps:.2f} ms/step", "",
             f"GPU gaps > 5 us between kernels: {len(out) / steps:.0f} per step, {total:.2f} ms/step; "
             "the largest (us, kernel before -> kernel after):", ""]
    for g, a, b in sorted(out, reverse=True)[:12]:
        lines.append(f"- {g:.0f} us: `{a[:60]}` -> `{b[:60]}`")
    buckets = {}
    for g, a, b in out:
        key = (a[:40], b[:40])
        buckets[key] = buckets.get(key, 0.0) + g
    lines += ["", "gap time by (kernel before, kernel after), top 8, ms/step:", ""]
    for (a, b), g in sorted(buckets.items(), key=lambda kv: -kv[1])[:8]:
        lines.append(f"- {g / 1e3 / steps:.2f}: `{a}` -> `{b}`")
    return lines


if __name__ == "__main__":
    main()
