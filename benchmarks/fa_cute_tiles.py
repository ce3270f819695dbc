"""flash_attn.cute's Hopper forward at other tilings than its own, one GPU, at the per-GPU shapes of the parallel
plans: which (m_block, n_block, stages, threads, intra-warpgroup overlap) is fastest for FLUX / Wan.

The kernel's default (flash_cute.CONFIG) is flash_attn.cute's choice for non-causal sm90: 128 x 192 tiles, 2 K/V
stages. FlashAttention-3's C++ build uses 128 x 176 for head dim 128. Every tiling's output is checked against
cuDNN's (relative error) before it is timed; a tiling that fails to compile or run is a row.

    source benchmarks/fa_cute_env.sh; python3 benchmarks/fa_cute_tiles.py --out $OUT/fa_cute_tiles.md
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attn_kernels import SHAPES  # noqa: E402
from gpu_util import timed_us  # noqa: E402
from xdit_compile.runtime import flash_cute  # noqa: E402

CONFIGS = [flash_cute.CONFIG,
           (128, 176, 2, 384, True), (128, 160, 2, 384, True), (128, 144, 2, 384, True),
           (128, 128, 2, 384, True), (128, 128, 3, 384, True), (128, 112, 3, 384, True),
           (128, 192, 2, 384, False), (128, 176, 2, 384, False), (128, 128, 2, 384, False)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="flux2048:4,wan480:4,flux1024:4,flux2048:2,wan480:2",
                    help="shape:ulysses degree pairs (heads per GPU = heads / degree)")
    ap.add_argument("--default-only", action="store_true",
                    help="only flash_cute.CONFIG (e.g. head-chunk shapes: flux2048:8 is 3 heads, a u4 rank's chunk of 2)")
    ap.add_argument("--lse", action="store_true", help="time the kernel with its LSE (the ring steps' form)")
    ap.add_argument("--out", default="fa_cute_tiles.md")
    a = ap.parse_args()
    dev = torch.device("cuda")
    if not flash_cute.available(dev):
        sys.exit("flash_attn.cute does not import here (source benchmarks/fa_cute_env.sh on an H100/H200)")
    aten = torch.ops.aten
    cases = [(n, int(u)) for n, u in (c.split(":") for c in a.cases.split(","))]
    torch.manual_seed(0)
    data = {}
    for name, u in cases:
        S, H0 = SHAPES[name]
        qkv = [torch.randn(1, H0 // u, S, 128, device=dev, dtype=torch.bfloat16) for _ in range(3)]
        ref = aten._scaled_dot_product_cudnn_attention(*qkv, None, False, 0.0, False, False)[0]
        us = timed_us(lambda: aten._scaled_dot_product_cudnn_attention(*qkv, None, False, 0.0, False, False),
                      reps=3, samples=7)
        data[(name, u)] = (qkv, ref, us)
        print(f"{name} u{u}: cudnn {us:.0f} us", flush=True)
    results = {}
    configs = CONFIGS[:1] if a.default_only else CONFIGS
    for cfg in configs:
        for name, u in cases:
            qkv, ref, _ = data[(name, u)]
            S, H0 = SHAPES[name]
            flop = 4 * (H0 // u) * S * S * 128
            try:
                t0 = time.time()
                out = flash_cute.attention(*qkv, with_lse=a.lse, config=cfg)[0]
                torch.cuda.synchronize()
                comp = time.time() - t0
                err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                if err > 2e-2:
                    results[(cfg, name, u)] = f"wrong ({err:.1e})"
                else:
                    us = timed_us(lambda: flash_cute.attention(*qkv, with_lse=a.lse, config=cfg), reps=3, samples=7)
                    results[(cfg, name, u)] = f"{us:.0f} ({flop / us / 1e6:.0f})"
                print(f"{cfg} {name} u{u}: {results[(cfg, name, u)]} err {err:.1e} first call {comp:.1f}s",
                      flush=True)
            except Exception as e:  # noqa: BLE001  (a tiling that does not build is a row)
                results[(cfg, name, u)] = f"fail: {type(e).__name__}"
                print(f"{cfg} {name} u{u}: {type(e).__name__}: {str(e)[:300]}", flush=True)
    gpu = torch.cuda.get_device_name(dev)
    head = " | ".join(f"{n} u{u} (H {SHAPES[n][1] // u}, S {SHAPES[n][0]})" for n, u in cases)
    lines = [f"# flash_attn.cute tilings, one {gpu}, torch {torch.__version__}",
             "", f"bf16, D = 128, q/k/v (1, H, S, D) contiguous, {'with' if a.lse else 'without'} the LSE. us per "
             "call (TFLOP/s = 4 H S^2 D / time). Tiling: (m_block, n_block, K/V stages, threads, intra-warpgroup "
             f"overlap); the first row is flash_cute.CONFIG.", "",
             f"| tiling | {head} |", "|---" * (len(cases) + 1) + "|",
             "| cuDNN | " + " | ".join(f"{data[c][2]:.0f}" for c in cases) + " |"]
    lines += [f"| {cfg} | " + " | ".join(results[(cfg, *c)] for c in cases) + " |" for cfg in configs]
    with open(a.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
