"""Linear + tanh-GELU: Inductor (cuBLAS mm, then a Triton kernel for bias + GELU) against cuBLASLt's fused
bias + GELU epilogue (``torch._addmm_activation(..., use_gelu=True)``, which Inductor keeps as one extern call),
at the MLP shapes of one rank (FLUX.1-dev, Wan2.1-14B; ulysses 4). One GPU.

    python benchmarks/gelu_epilogue.py --out $OUT/gelu_epilogue.md
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

SHAPES = [  # (name, tokens per rank, in, out)
    ("flux1024 u4 single-block proj_mlp", 1152, 3072, 12288),
    ("flux1024 u4 double-block img ff", 1024, 3072, 12288),
    ("flux1024 u4 double-block txt ff", 128, 3072, 12288),
    ("flux2048 u4 single-block proj_mlp", 4224, 3072, 12288),
    ("wan480 u4 ffn", 8190, 5120, 13824),
]


def bench(fn, iters=50):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(iters):
            fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) / iters)
    return sorted(ts)[2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gelu_epilogue.md")
    args = ap.parse_args()
    dev, dt = "cuda", torch.bfloat16

    def unfused(x, w, b):
        return F.gelu(F.linear(x, w, b), approximate="tanh")

    def fused(x, w, b):
        return torch._addmm_activation(b, x.flatten(0, -2), w.t(), use_gelu=True).unflatten(0, x.shape[:-1])

    ind_unfused = torch.compile(unfused)
    ind_fused = torch.compile(fused)
    lines = [f"# Linear + tanh-GELU, {torch.cuda.get_device_name(0)}, torch {torch.__version__}", "",
             "| shape (M x K -> N) | mm alone | Inductor mm + bias/GELU | cuBLASLt bias+GELU epilogue (eager) | "
             "same under Inductor | rel err vs float32: fused (Inductor unfused) |", "|---|---|---|---|---|---|"]
    for name, m, k, n in SHAPES:
        torch.manual_seed(0)
        x = torch.randn(1, m, k, device=dev, dtype=dt)
        w = torch.randn(n, k, device=dev, dtype=dt) / k ** 0.5
        b = torch.randn(n, device=dev, dtype=dt)
        ref = F.gelu(F.linear(x.float(), w.float(), b.float()), approximate="tanh")
        e = [((f(x, w, b).float() - ref).norm() / ref.norm()).item() for f in (fused, ind_unfused)]
        t_mm = bench(lambda: torch.mm(x[0], w.t()))
        t_u = bench(lambda: ind_unfused(x, w, b))
        t_f = bench(lambda: fused(x, w, b))
        t_fi = bench(lambda: ind_fused(x, w, b))
        lines.append(f"| {name} ({m} x {k} -> {n}) | {t_mm * 1e3:.1f} us | {t_u * 1e3:.1f} us | {t_f * 1e3:.1f} us | "
                     f"{t_fi * 1e3:.1f} us | {e[0]:.2e} ({e[1]:.2e}) |")
        print(lines[-1], flush=True)
    open(args.out, "w").write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
