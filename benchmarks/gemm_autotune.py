"""Would Inductor's max-autotune GEMM templates (Triton, incl. the persistent TMA one) beat cuBLAS at the linears
of a FLUX step? One GPU, bf16, each shape alone: F.linear (cuBLAS / cuBLASLt, what the shipped plan runs), the
cuBLASLt bias+GELU epilogue (compile.fuse_gelu), and torch.compile(max-autotune-no-cudagraphs) restricted to
Triton templates (with the bias, and the GELU where the layer has one, fused into the template's epilogue).

    python3 benchmarks/gemm_autotune.py [--ms 4224,16896] [--model flux|wan] [--out gemm_autotune.md]

M = tokens per rank: 4224 = (16384 + 512) / 4 (FLUX 2048² Ulysses 4), 16896 (one GPU), 1152 (1024² Ulysses 4); Wan 480p: 8190 = 32760 / 4, 32760.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gpu_util import timed_us  # noqa: E402

LAYERS = {"flux": [("to_q / to_k / to_v / to_out / proj_out attn half", 3072, 3072, False),
                   ("proj_mlp / ff up (+GELU)", 3072, 12288, True),
                   ("proj_out mlp half / ff down", 12288, 3072, False)],
          "wan": [("to_q / to_k / to_v / to_out", 5120, 5120, False),
                  ("ffn up (+GELU)", 5120, 13824, True),
                  ("ffn down", 13824, 5120, False)]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="4224,16896")
    ap.add_argument("--model", choices=sorted(LAYERS), default="flux")
    ap.add_argument("--out", default="gemm_autotune.md")
    args = ap.parse_args()
    import torch._inductor.config as ic
    ic.max_autotune_gemm_backends = "TRITON"
    ic.triton.enable_persistent_tma_matmul = True
    ic.fx_graph_cache = False
    dev = torch.device("cuda")
    lines = [f"# cuBLAS against Inductor's Triton GEMM templates, {torch.cuda.get_device_name()}, torch "
             f"{torch.__version__}", "", "us per GEMM (median of 20 timings of 10 calls), TFLOP/s in brackets", "",
             "| layer | M x K -> N | F.linear (cuBLAS) | cuBLASLt bias+GELU epilogue | "
             "Triton template (max-autotune) | "
             "best Triton / cuBLAS | autotune s |", "|---|---|---|---|---|---|---|"]
    for m in [int(v) for v in args.ms.split(",")]:
        for name, k, n, gelu in LAYERS[args.model]:
            torch.manual_seed(0)
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k ** 0.5
            b = torch.randn(n, device=dev, dtype=torch.bfloat16)

            def eager():
                y = F.linear(x, w, b)
                return F.gelu(y, approximate="tanh") if gelu else y
            fl = 2 * m * k * n
            t_cublas = timed_us(lambda: F.linear(x, w, b))
            t_lt = timed_us(lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True)) if gelu else None
            torch._dynamo.reset()
            comp = torch.compile(eager, mode="max-autotune-no-cudagraphs", fullgraph=True)
            t0 = time.time()
            out = comp()
            torch.cuda.synchronize()
            tune = time.time() - t0
            err = ((out.float() - eager().float()).norm() / eager().float().norm()).item()
            t_tr = timed_us(comp)
            ref = t_lt if gelu else t_cublas
            f = lambda t: f"{t:.1f} ({fl / t / 1e6:.0f})"  # noqa: E731
            lines.append(f"| {name} | {m} x {k} -> {n} | {f(t_cublas)} | {f(t_lt) if t_lt else '-'} | {f(t_tr)} "
                         f"(rel err {err:.1e}) | {t_tr / ref:.3f} | {tune:.0f} |")
            print(lines[-1], flush=True)
    lines += ["", "The GELU row's ratio is against the cuBLASLt epilogue (what fuse_gelu runs); the others against "
              "F.linear with bias. Triton's time includes its fused epilogue (bias, GELU)."]
    open(args.out, "w").write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
