"""The modulation linears of one FLUX.1-dev step on one GPU: one GEMV per linear (what shard_modulation leaves,
this rank's rows) against one GEMV over their rows concatenated (compile.fuse_modulation). Shapes per rank at
N sequence ranks: 19 double blocks x 2 x (18432 / N, 3072), 38 single blocks x (9216 / N, 3072), norm_out
(6144 / N, 3072); bf16, input (1, 3072). Timed as CUDA graphs (as Inductor + cudagraphs runs them), median of
20 replays.   python benchmarks/modulation_gemv.py [--ranks 4] [--out FILE.md]"""
import argparse
import json

import torch
import torch.nn.functional as F


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    n, dev, dt = args.ranks, torch.device("cuda"), torch.bfloat16
    rows = [18432 // n] * 38 + [9216 // n] * 38 + [6144 // n]
    ws = [torch.randn(r, 3072, device=dev, dtype=dt) * 0.02 for r in rows]
    bs = [torch.randn(r, device=dev, dtype=dt) for r in rows]
    w_cat, b_cat = torch.cat(ws), torch.cat(bs)
    x = torch.randn(1, 3072, device=dev, dtype=dt)
    gb = sum(w.numel() for w in ws) * 2 / 1e9

    def separate():
        return torch.cat([F.linear(x, w, b) for w, b in zip(ws, bs)], -1)

    def fused():
        return F.linear(x, w_cat, b_cat)

    res = {"gpu": torch.cuda.get_device_name(0), "ranks": n, "linears": len(rows), "weight_gb_per_rank": round(gb, 3)}
    assert torch.allclose(separate().float(), fused().float(), atol=2e-2, rtol=2e-2)
    for name, fn in (("separate", separate), ("fused", fused)):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        times = []
        for _ in range(20):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        ms = sorted(times)[len(times) // 2]
        res[f"{name}_ms"] = round(ms, 4)
        res[f"{name}_tb_s"] = round(gb / ms, 2)
    print(json.dumps(res))
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"# Modulation GEMVs of one FLUX.1-dev step, per rank at N = {n} ({res['gpu']})\n\n"
                    f"`python benchmarks/modulation_gemv.py --ranks {n}`: {len(rows)} linears, {gb:.2f} GB of bf16 "
                    "weights per rank, input (1, 3072), CUDA-graph replays, median of 20.\n\n"
                    "| variant | ms | TB/s |\n|---|---|---|\n"
                    f"| one GEMV per linear + cat (shard_modulation) | {res['separate_ms']:.3f} | {res['separate_tb_s']} |\n"
                    f"| one GEMV over the concatenated rows (fuse_modulation) | {res['fused_ms']:.3f} | "
                    f"{res['fused_tb_s']} |\n")


if __name__ == "__main__":
    main()
