"""Attention kernels at the shapes the parallel plans run them, one GPU: cuDNN (what SDPA picks on H100/H200, with
and without the LSE), torch's flash kernel (FlashAttention-2), and flash_attn.cute's Hopper forward
(FlashAttention-3 design, xdit_compile/runtime/flash_cute.py) where it imports.

q/k/v are (B, H, S, D) contiguous bf16, as the Ulysses all-to-all delivers them; the FLUX sequence includes its
512 text tokens. Each kernel's output is checked against cuDNN's (relative error of the output, max abs LSE gap).

    source benchmarks/fa_cute_env.sh; python3 benchmarks/attn_kernels.py --out $OUT/attn_kernels.md
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_util import timed_us  # noqa: E402
from xdit_compile.runtime import flash_cute  # noqa: E402

# name -> (tokens, heads at 1 GPU); per-GPU heads for Ulysses degree u are heads / u
SHAPES = {"flux1024": (4608, 24), "flux2048": (16896, 24), "wan480": (32760, 40)}
aten = torch.ops.aten


def kernels(with_cute: bool):
    def cudnn(q, k, v, lse=True):
        out, l = aten._scaled_dot_product_cudnn_attention(q, k, v, None, lse, 0.0, False, False)[:2]
        return out, (l[..., 0] if l.dim() == 4 else l) if lse else None
    ks = {"cudnn+lse": lambda q, k, v: cudnn(q, k, v, True),
          "cudnn": lambda q, k, v: cudnn(q, k, v, False),
          "flash2+lse": lambda q, k, v: aten._scaled_dot_product_flash_attention(q, k, v)[:2]}
    if with_cute:
        ks["fa3_cute+lse"] = lambda q, k, v: flash_cute.attention(q, k, v, with_lse=True)
        ks["fa3_cute"] = lambda q, k, v: flash_cute.attention(q, k, v, with_lse=False)
    return ks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="flux1024,flux2048,wan480")
    ap.add_argument("--degrees", default="1,2,4")
    ap.add_argument("--out", default="attn_kernels.md")
    a = ap.parse_args()
    dev = torch.device("cuda")
    with_cute = flash_cute.available(dev)
    print(f"flash_cute available: {with_cute}", flush=True)
    if not with_cute:
        try:
            import flash_attn.cute.flash_fwd  # noqa: F401  (say why)
        except Exception as e:  # noqa: BLE001
            print(f"flash_attn.cute import failed: {type(e).__name__}: {e}", flush=True)
    ks = kernels(with_cute)
    rows = []
    torch.manual_seed(0)
    for name in a.shapes.split(","):
        S, H0 = SHAPES[name]
        for u in map(int, a.degrees.split(",")):
            H = H0 // u
            q, k, v = (torch.randn(1, H, S, 128, device=dev, dtype=torch.bfloat16) for _ in range(3))
            flop = 4 * H * S * S * 128
            ref, ref_lse = ks["cudnn+lse"](q, k, v)
            for kname, fn in ks.items():
                try:
                    out, lse = fn(q, k, v)
                    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                    lerr = (lse.float() - ref_lse).abs().max().item() if lse is not None else float("nan")
                    reps = max(1, int(20e-3 / (flop / 600e12)))
                    us = timed_us(lambda: fn(q, k, v), reps=reps, samples=7)
                    rows.append((name, u, H, S, kname, f"{us:.0f}", f"{flop / us / 1e6:.0f}", f"{err:.1e}",
                                 f"{lerr:.1e}"))
                except Exception as e:  # noqa: BLE001  (a kernel that refuses the shape is a row, not the end)
                    rows.append((name, u, H, S, kname, "fail", "-", f"{type(e).__name__}: {str(e)[:80]}", "-"))
                print(" | ".join(map(str, rows[-1])), flush=True)
    graph_note = ""
    if with_cute:   # the kernel inside a CUDA graph, as the compiled plans replay it
        q, k, v = (torch.randn(1, 12, 4608, 128, device=dev, dtype=torch.bfloat16) for _ in range(3))
        want = flash_cute.attention(q, k, v, with_lse=True)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            got = flash_cute.attention(q, k, v, with_lse=True)
        for t in (q, k, v):
            t.normal_()
        want = flash_cute.attention(q, k, v, with_lse=True)
        g.replay()
        torch.cuda.synchronize()
        same = all(torch.equal(x, y) for x, y in zip(want, got))
        graph_note = f"fa3_cute captured in a CUDA graph and replayed on new inputs: bitwise equal to eager: {same}"
        print(graph_note, flush=True)
    gpu = torch.cuda.get_device_name(dev)
    lines = [f"# Attention kernels, one {gpu}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}",
             "", "B = 1, D = 128, bf16, q/k/v (B, H, S, D) contiguous; H = heads per GPU at Ulysses degree u; "
             "TFLOP/s = 4 H S^2 D / time. err: relative error of the output against cudnn+lse; lse: max abs LSE gap.",
             "", "| shape | u | H | S | kernel | us | TFLOP/s | err | lse |", "|---|---|---|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    lines += ["", graph_note] if graph_note else []
    with open(a.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
