"""Memory of compile.fuse_linears on one GPU: FLUX.1-dev config (random bf16 weights), 1024², Inductor (--lowering), without and
with the joined q/k/v weights (each setting in its own process: peaks are per process).

    CUDA_VISIBLE_DEVICES=0 python benchmarks/fuse_linears_memory.py --md $OUT/fuse_linears_memory.md

Prints, per setting: GiB allocated after building the model, after compile + 3 calls, the peak over all of it,
ms per call (CUDA events, median of 5 after the compile) and the relative error against the model's own eager
output in the same process.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def one(fuse: bool, model: str, lowering: str) -> dict:
    import torch

    import xdit_compile
    from bench import build_model, make_inputs
    gib = 2 ** 30
    m = build_model(model, False, "cuda", torch.bfloat16)
    kw = make_inputs(model, False, "cuda", torch.bfloat16)
    built = torch.cuda.memory_allocated() / gib
    with torch.no_grad():
        ref = m(**kw)[0]
        xdit_compile.parallelize(m, {"compile": {"lowering": lowering, "fuse_linears": fuse}})
        times = []
        for i in range(8):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            out = m(**kw)[0]
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
    rep = m._xdit_compiler.reports[0]["fused"]
    return {"fuse_linears": fuse, "built_gib": round(built, 2),
            "after_gib": round(torch.cuda.memory_allocated() / gib, 2),
            "peak_gib": round(torch.cuda.max_memory_allocated() / gib, 2),
            "ms": round(statistics.median(times[3:]), 1),
            "rel_err": float((out.float() - ref.float()).norm() / ref.float().norm()),
            "groups": len(rep.get("linears") or [])}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--md", default="fuse_linears_memory.md")
    ap.add_argument("--model", default="flux1024")
    ap.add_argument("--one", choices=["on", "off"])
    ap.add_argument("--lowering", default="inductor")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one == "on", args.model, args.lowering)))
        return
    rows = []
    for s in ("off", "on"):
        p = subprocess.run([sys.executable, __file__, "--one", s, "--model", args.model, "--lowering", args.lowering], capture_output=True,
                           text=True, timeout=280)
        if p.returncode:
            print(p.stderr[-3000:])
            continue
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
    import torch
    lines = [f"# compile.fuse_linears: memory, one {torch.cuda.get_device_name()} ({args.model}, lowering {args.lowering}, 1 GPU)", "",
             "| fuse_linears | groups joined | GiB after build | GiB after compile + calls | peak GiB | ms/call | "
             "rel err vs eager |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['fuse_linears']} | {r['groups']} | {r['built_gib']} | {r['after_gib']} | {r['peak_gib']} | "
                     f"{r['ms']} | {r['rel_err']:.2e} |")
    open(args.md, "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
